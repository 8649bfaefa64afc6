"""FID: where torchmetrics' default and the torch-fidelity path differ, and what the new metric costs.

    python bench/bench_fid.py explain [--n-test 200 --n-train 200] [--device cpu] [--features F.npz]
    python bench/bench_fid.py speed [--n 32] [--batch-size 16] [--device cpu]
    python bench/bench_fid.py features [--variants fp32:200,bf16+cl:500] [--n-test 10000 --n-train 50000]
                                       [--device cuda] [--max-fid-shift 0.01] [--budget-s 420] [--out F.json]

``explain`` decodes the first images of the CIFAR-10 JPEG copy (``--data``, see
``/work/shared/data/README.md``), computes Inception features with the real weights
(``make fid-weights``) in four ways and isolates each candidate cause of a difference between
``torchmetrics.image.fid.FrechetInceptionDistance`` (defaults) and the torch-fidelity path:

- preprocessing: torch-fidelity's TF1 bilinear resize vs torchmetrics' default ``antialias=True`` resize;
- network dtype: float32 vs float64 (what ``set_dtype(torch.float64)`` does to the network);
- statistics: covariance from raw float64 sums vs centred updates; ``eigvals(S1 S2)`` vs the symmetric
  form; the final float32 cast of torchmetrics' result.

On a GPU, ``--n-test 10000 --n-train 50000`` reproduces the full CIFAR-10 numbers (about a minute per
feature variant on an H200; TF32 is also compared there). Features are cached in ``--features``.

``speed`` times the old path (InceptionFeatures + FeatureStats) against InceptionFID.update per image.

``features`` measures the Inception's speed options (issue 9: TF32, bf16, channels_last, batch size) and
what they do to FID. Each variant ``PRECISION[+cl]:BATCH`` (``--variants``; ``+cl`` = channels_last) gets
a fresh :class:`InceptionFeatures` and runs the ``--n-test`` test images, then the ``--n-train`` train
images (both moved to ``--device`` first, as generated samples already are in an evaluation), in batches of
BATCH. Steady-state images/s: every call timed (CUDA events on a GPU, no synchronisation per call;
``perf_counter`` on a CPU), the first ``--warmup`` calls left out. FID: test vs train features of the
same variant, and its shift from the plain fp32 variant (the baseline, run first), with a verdict: "ok"
when ``|dFID| <= --max-fid-shift``, else "moves FID". Also the features' mean relative L2 distance to the
baseline's (test images). The JSON (``--out``) is rewritten after every variant, so a timeout keeps what
was measured; with ``--budget-s`` a variant that would not fit (estimated as the slowest variant so far)
is skipped and recorded as such. ``recommended`` is the fastest variant whose verdict is ok.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analytic_dpm.fid import inception_weights as iw
from analytic_dpm.fid.metrics import FEATURE_PRECISIONS, FeatureStats, InceptionFeatures, fid_from_stats
from analytic_dpm.fid.sums import FeatureSums
from analytic_dpm.fid.tm import InceptionFID

# the earlier streaming (centred, Chan) statistics, kept as the test suite's oracle: the "old path" compared here
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from fid_oracle import StreamingStats  # noqa: E402

DATA = "/work/shared/data/cifar10/jpeg_q75.npz"
#: ``features``: the variants measured unless ``--variants`` says otherwise (PRECISION[+cl]:BATCH)
VARIANTS = "fp32:200,tf32:200,bf16:200,fp32+cl:200,bf16+cl:500,tf32:500"


def cifar_jpeg(path: str, split: str, n: int) -> torch.Tensor:
    from PIL import Image

    with np.load(path, allow_pickle=False) as z:
        h, b, o = z[f"{split}_header"].tobytes(), z[f"{split}_bodies"].tobytes(), z[f"{split}_offsets"]
        n = min(n, len(o) - 1)
        imgs = [np.asarray(Image.open(io.BytesIO(h + b[o[i] : o[i + 1]])).convert("RGB")) for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run_net(fn, x: torch.Tensor, bs: int, device) -> np.ndarray:
    out = []
    for i in range(0, len(x), bs):
        f = fn(x[i : i + bs].to(device))
        out.append((f[0] if isinstance(f, tuple) else f).double().cpu())
    return torch.cat(out).numpy()


def compute_features(args) -> dict[str, np.ndarray]:
    from torchmetrics.image.fid import NoTrainInceptionV3

    w = args.weights
    test, train = cifar_jpeg(args.data, "test", args.n_test), cifar_jpeg(args.data, "train", args.n_train)
    small = min(args.n_small, len(test))
    feats: dict[str, np.ndarray] = {}
    dev = torch.device(args.device)
    variants = {
        # torch-fidelity's forward, float32, TF32 off (today's InceptionFeatures = InceptionFID's network)
        "tf": (InceptionFeatures(w, device=dev, batch_size=args.batch_size), None),
        # torchmetrics' default network (antialias=True), float32
        "aa": (NoTrainInceptionV3("inception-v3-compat", ["2048"], w, antialias=True).to(dev), None),
        # torchmetrics with set_dtype(float64): the network in float64 (TF1 resize / default resize)
        "tf64": (NoTrainInceptionV3("inception-v3-compat", ["2048"], w, antialias=False).to(dev).double(), small),
        "aa64": (NoTrainInceptionV3("inception-v3-compat", ["2048"], w, antialias=True).to(dev).double(), small),
    }
    for name in ("tf64", "aa64"):
        variants[name][0]._dtype = torch.float64
    if dev.type == "cuda":  # TF32 convolutions, PyTorch's default for cuDNN
        variants["tf_tf32"] = (InceptionFeatures(w, device=dev, batch_size=args.batch_size, allow_tf32=True), None)
    for name, (net, limit) in variants.items():
        sync(dev)
        t0 = time.perf_counter()
        feats[f"{name}_test"] = run_net(net, test[:limit], args.batch_size, dev)
        if limit is None:
            feats[f"{name}_train"] = run_net(net, train, args.batch_size, dev)
        sync(dev)
        print(f"features {name:8s}: {time.perf_counter() - t0:7.1f} s", flush=True)
        del net
    return feats


def tm_fid(f1: np.ndarray, f2: np.ndarray) -> tuple[float, float]:
    """torchmetrics' own compute() on features: raw float64 sums, eigvals(S1 S2), then float32 cast."""
    from torchmetrics.image.fid import _compute_fid

    def mean_cov(f):
        x = torch.from_numpy(f)
        n = x.shape[0]
        mu = x.sum(0) / n
        return mu, (x.T @ x - n * torch.outer(mu, mu)) / (n - 1)

    (m1, c1), (m2, c2) = mean_cov(f1), mean_cov(f2)
    value = _compute_fid(m2, c2, m1, c1)  # torchmetrics passes (real, fake)
    return float(value), float(value.to(torch.float32))


def explain(args) -> dict:
    cache = Path(args.features)
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            feats = {k: z[k] for k in z.files}
        print(f"features from {cache}")
    else:
        feats = compute_features(args)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **feats)

    def stats(f):
        return StreamingStats.from_features(f)

    def fid(fa, fb):  # today's path: centred (Chan) float64 statistics + symmetric eigh
        a, b = stats(fa), stats(fb)
        return fid_from_stats(a.mean, a.cov, b.mean, b.cov)

    def rel_l2(a, b):
        return float(np.mean(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))

    tf_te, tf_tr, aa_te, aa_tr = feats["tf_test"], feats["tf_train"], feats["aa_test"], feats["aa_train"]
    small = len(feats["tf64_test"])
    out: dict = {"n_test": len(tf_te), "n_train": len(tf_tr), "n_small": small}
    out["feat_rel_l2_antialias"] = rel_l2(aa_te, tf_te)
    out["feat_rel_l2_float64_net"] = rel_l2(feats["tf64_test"], tf_te[:small])
    out["feat_rel_l2_float64_net_aa"] = rel_l2(feats["aa64_test"], aa_te[:small])
    out["feat_max_abs_float64_net"] = float(np.abs(feats["tf64_test"] - tf_te[:small]).max())
    if "tf_tf32_test" in feats:
        out["feat_rel_l2_tf32"] = rel_l2(feats["tf_tf32_test"], tf_te)

    t0 = time.perf_counter()
    out["fid_old_path"] = fid(tf_te, tf_tr)
    out["seconds_fid_from_stats"] = time.perf_counter() - t0
    out["fid_antialias"] = fid(aa_te, aa_tr)
    t0 = time.perf_counter()
    out["fid_tm_formula_tf"], out["fid_tm_formula_tf_f32"] = tm_fid(tf_te, tf_tr)
    out["seconds_tm_formula"] = time.perf_counter() - t0
    out["fid_tm_default"], out["fid_tm_default_f32"] = tm_fid(aa_te, aa_tr)
    # ours: raw float64 sums (torchmetrics' states) + fid_from_stats
    s_te, s_tr = FeatureSums.from_features(tf_te), FeatureSums.from_features(tf_tr)
    out["fid_inception_fid"] = fid_from_stats(s_te.mean, s_te.cov, s_tr.mean, s_tr.cov)
    c_chan, c_raw = stats(tf_te).cov, s_te.cov
    out["cov_raw_vs_centred_max_rel"] = float(np.abs(c_raw - c_chan).max() / np.abs(c_chan).max())
    # a float64 network on the first n_small test images (the rest float32): FID shift
    mixed = tf_te.copy()
    mixed[:small] = feats["tf64_test"]
    out["fid_float64_net_on_first_small"] = fid(mixed, tf_tr)
    if "tf_tf32_test" in feats:
        out["fid_tf32"] = fid(feats["tf_tf32_test"], feats["tf_tf32_train"])
    ref = out["fid_old_path"]
    print(f"\nCIFAR-10 JPEG: test {out['n_test']} vs train {out['n_train']} (float64 network on {small})")
    for k, v in out.items():
        extra = f"   (vs old path: {v - ref:+.3e}, rel {abs(v - ref) / ref:.1e})" if k.startswith("fid_") else ""
        print(f"  {k:34s} {v:.9g}{extra}" if isinstance(v, float) else f"  {k:34s} {v}")
    return out


def speed(args) -> dict:
    dev = torch.device(args.device)
    x = cifar_jpeg(args.data, "test", args.n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", iw.InceptionWeightsWarning)
        old = InceptionFeatures(args.weights, device=dev, batch_size=args.batch_size)
        new = InceptionFID(args.weights, batch_size=args.batch_size).to(dev)
    res = {}
    for _ in range(args.repeat):  # alternate, keep the best of each
        for name in ("old", "new"):
            sync(dev)
            t0 = time.perf_counter()
            if name == "old":
                st = StreamingStats()
                for i in range(0, len(x), args.batch_size):
                    st.update(old(x[i : i + args.batch_size]))
            else:
                new.reset()
                for i in range(0, len(x), args.batch_size):
                    new.update(x[i : i + args.batch_size])
            sync(dev)
            per = (time.perf_counter() - t0) / len(x)
            res[name] = min(res.get(name, float("inf")), per)
    print(
        f"{args.n} images, batch {args.batch_size}, {dev}: old {1e3 * res['old']:.1f} ms/img, "
        f"new {1e3 * res['new']:.1f} ms/img (best of {args.repeat})"
    )
    return {"ms_per_image_old": 1e3 * res["old"], "ms_per_image_new": 1e3 * res["new"], "n": args.n}


# --------------------------------------------------------------------------------------------- features
FEATURES_OUT = "outputs/bench_fid_variants.json"


@dataclass(frozen=True)
class Variant:
    """One measured configuration of the Inception: precision, memory format, images per forward."""

    precision: str
    channels_last: bool
    batch_size: int

    @property
    def label(self) -> str:
        return f"{self.precision}{'+cl' if self.channels_last else ''}:{self.batch_size}"

    @property
    def is_baseline(self) -> bool:
        """Plain fp32 (channels first): today's default, what FID shifts are measured against."""
        return self.precision == "fp32" and not self.channels_last


def parse_variant(item: str) -> Variant:
    """``"bf16+cl:500"`` -> ``Variant("bf16", True, 500)``; ``ValueError`` saying what to write otherwise."""
    opts, _, batch = item.strip().partition(":")
    precision, *flags = opts.split("+")
    if precision not in FEATURE_PRECISIONS or flags not in ([], ["cl"]) or not batch.isdigit() or int(batch) < 1:
        raise ValueError(
            f"--variants: cannot read {item.strip()!r}; write PRECISION[+cl]:BATCH with PRECISION one of "
            f"{', '.join(FEATURE_PRECISIONS)} and BATCH a positive integer, e.g. fp32:200,bf16+cl:500"
        )
    return Variant(precision, bool(flags), int(batch))


def parse_variants(text: str) -> list[Variant]:
    """The ``--variants`` list, baseline (the first plain fp32 variant) first, duplicates refused."""
    variants = [parse_variant(item) for item in text.split(",") if item.strip()]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--variants: {', '.join(sorted({x for x in labels if labels.count(x) > 1}))} given twice")
    baseline = next((v for v in variants if v.is_baseline), None)
    if baseline is None:
        raise ValueError("--variants needs a plain fp32 variant (e.g. fp32:200): FID shifts are measured against it")
    return [baseline] + [v for v in variants if v is not baseline]


class CallTimer:
    """Images and seconds of every timed call: CUDA events on a GPU (recorded on the stream, no synchronisation per
    call), ``perf_counter`` on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.calls: list[tuple[int, object, object]] = []  # (images, start, end)

    @contextlib.contextmanager
    def measure(self, images: int):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.calls.append((images, start, end))

    def images_per_s(self, warmup: int) -> tuple[float, int]:
        """Steady-state rate over the calls after the first ``warmup`` (at least one call is kept), and that count."""
        if self.cuda:
            torch.cuda.synchronize()
        kept = self.calls[min(warmup, len(self.calls) - 1) :]
        seconds = sum(s.elapsed_time(e) * 1e-3 if self.cuda else e - s for _, s, e in kept)
        return sum(n for n, _, _ in kept) / seconds, len(kept)


def feature_pass(feats: InceptionFeatures, images: torch.Tensor, timer: CallTimer, keep: list | None = None
                 ) -> FeatureStats:
    """Statistics of ``images`` (already on the device), one timed call per batch; ``keep`` collects the features
    (left on the device: a copy to the host per call would synchronise)."""
    def batches():
        for start in range(0, len(images), feats.batch_size):
            batch = images[start : start + feats.batch_size]
            with timer.measure(len(batch)):
                f = feats(batch)
            if keep is not None:
                keep.append(f)
            yield f

    return FeatureSums.accumulate(batches()).to_feature_stats()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of ``|a - b| / |b|``."""
    return float(((a.double() - b.double()).norm(dim=1) / b.double().norm(dim=1)).mean())


def measure_variant(v: Variant, args, test: torch.Tensor, train: torch.Tensor, base_test: torch.Tensor | None
                    ) -> tuple[dict, torch.Tensor]:
    """Speed and FID of one variant; returns its record and its test features (CPU float32)."""
    dev = test.device
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", iw.InceptionWeightsWarning)  # test weights are not the recorded file
        feats = InceptionFeatures(args.weights, device=dev, batch_size=v.batch_size, precision=v.precision,
                                  channels_last=v.channels_last)
    timer, kept = CallTimer(dev), []
    s_test = feature_pass(feats, test, timer, kept)
    s_train = feature_pass(feats, train, timer)
    rate, calls = timer.images_per_s(args.warmup)
    fid = fid_from_stats(s_test.mean, s_test.cov, s_train.mean, s_train.cov)
    test_feats = torch.cat(kept).cpu()
    rec = {"images_per_s": rate, "timed_calls": calls, "fid": fid, "name": feats.name,
           "seconds": time.perf_counter() - t0}
    if base_test is not None:
        rec["feat_rel_l2_vs_fp32"] = rel_l2(test_feats, base_test)
        rec["feat_max_abs_vs_fp32"] = float((test_feats - base_test).abs().max())
    if dev.type == "cuda":
        rec["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    del feats
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rec, test_feats


def verdict(dfid: float | None, max_shift: float) -> str | None:
    if dfid is None:
        return None
    return "ok" if abs(dfid) <= max_shift else "moves FID"


def estimate_seconds(done: list[dict]) -> float | None:
    """Seconds the next variant should take: the slowest finished one (every variant runs the same images)."""
    seconds = [r["seconds"] for r in done if r.get("status") == "done"]
    return max(seconds) if seconds else None


def skip_reason(budget_s: float | None, elapsed: float, need: float | None) -> str | None:
    """Why the next variant does not fit in ``--budget-s`` (None: it does, or nothing is known against it)."""
    if budget_s is None:
        return None
    left = budget_s - elapsed
    if left <= 0 or (need is not None and need > left):
        return f"~{need or 0:.0f} s needed, {max(left, 0):.0f} s of --budget-s left"
    return None


def write_json(path: str, out: dict) -> None:
    """Atomically, so an interrupted run leaves the previous complete file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)


def print_table(out: dict) -> None:
    base = next((r for r in out["variants"] if r.get("baseline") and r["status"] == "done"), None)
    print(f"\nInception features on {out['device']}: test {out['n_test']} vs train {out['n_train']}, "
          f"ok if |dFID| <= {out['max_fid_shift']}")
    print(f"  {'variant':12s} {'img/s':>8s} {'x fp32':>7s} {'FID':>11s} {'dFID':>10s} {'feat relL2':>10s}  verdict")
    for r in out["variants"]:
        if r["status"] != "done":
            print(f"  {r['variant']:12s} {r['status']}: {r.get('reason', '')}")
            continue
        speedup = f"{r['images_per_s'] / base['images_per_s']:7.2f}" if base else f"{'-':>7s}"
        dfid = f"{r['dfid']:+10.5f}" if r.get("dfid") is not None else f"{'-':>10s}"
        l2 = f"{r['feat_rel_l2_vs_fp32']:10.2e}" if "feat_rel_l2_vs_fp32" in r else f"{'-':>10s}"
        print(f"  {r['variant']:12s} {r['images_per_s']:8.1f} {speedup} {r['fid']:11.5f} {dfid} {l2}  "
              f"{r.get('verdict') or '-'}")
    print(f"  recommended (fastest with an ok verdict): {out.get('recommended')}")


def recommend(records: list[dict]) -> str | None:
    ok = [r for r in records if r["status"] == "done" and r.get("verdict") in ("baseline", "ok")]
    return max(ok, key=lambda r: r["images_per_s"])["variant"] if ok else None


def features(args) -> dict:
    start = time.perf_counter()
    variants = parse_variants(args.variants)
    out_path = args.out or FEATURES_OUT
    dev = torch.device(args.device)
    test = cifar_jpeg(args.data, "test", args.n_test).to(dev)
    train = cifar_jpeg(args.data, "train", args.n_train).to(dev)
    records = [{"variant": v.label, "precision": v.precision, "channels_last": v.channels_last,
                "batch_size": v.batch_size, "baseline": v.is_baseline, "status": "pending"} for v in variants]
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
           "data": args.data, "n_test": len(test), "n_train": len(train), "max_fid_shift": args.max_fid_shift,
           "budget_s": args.budget_s, "warmup_calls": args.warmup, "seconds_loading": time.perf_counter() - start,
           "variants": records, "recommended": None}
    write_json(out_path, out)
    base_fid, base_test = None, None
    for v, rec in zip(variants, records):
        reason = skip_reason(args.budget_s, time.perf_counter() - start, estimate_seconds(records))
        if reason:
            rec.update(status="skipped", reason=reason)
        else:
            try:
                measured, test_feats = measure_variant(v, args, test, train, base_test)
            except Exception as e:  # noqa: BLE001 - recorded (e.g. out of memory); the other variants still run
                rec.update(status="failed", reason=f"{type(e).__name__}: {e}")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                rec.update(status="done", **measured)
                if v.is_baseline:
                    base_fid, base_test = measured["fid"], test_feats
                rec["dfid"] = None if base_fid is None else measured["fid"] - base_fid
                rec["verdict"] = "baseline" if v.is_baseline else verdict(rec["dfid"], args.max_fid_shift)
        print(f"{rec['variant']:12s} {rec['status']}: " + (
            f"{rec['images_per_s']:.1f} img/s, FID {rec['fid']:.5f}" if rec["status"] == "done" else rec["reason"]),
            flush=True)
        out["recommended"] = recommend(records)
        out["seconds_total"] = time.perf_counter() - start
        write_json(out_path, out)
    print_table(out)
    return out


MODES = {"explain": explain, "speed": speed, "features": features}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=list(MODES))
    ap.add_argument("--weights", default=iw.DEFAULT_WEIGHTS_PATH)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-small", type=int, default=24, help="images run through the float64 network")
    ap.add_argument("--features", default="outputs/bench_fid_features.npz", help="feature cache (explain)")
    ap.add_argument("--n", type=int, default=32, help="images (speed)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--variants", default=VARIANTS, help="features: PRECISION[+cl]:BATCH,... (+cl = channels_last; "
                    "PRECISION fp32 | tf32 | bf16); a plain fp32 one is the FID baseline")
    ap.add_argument("--max-fid-shift", type=float, default=0.01, help="features: largest |dFID| that is ok")
    ap.add_argument("--budget-s", type=float, default=None, help="features: skip variants that would not fit")
    ap.add_argument("--warmup", type=int, default=2, help="features: first calls left out of images/s")
    ap.add_argument("--out", default=None, help="write the figures as JSON (features: rewritten after each variant; "
                    f"default {FEATURES_OUT})")
    args = ap.parse_args(argv)
    if args.mode == "features":
        try:
            parse_variants(args.variants)
        except ValueError as e:
            ap.error(str(e))
        if args.warmup < 0:
            ap.error(f"--warmup must be >= 0, got {args.warmup}")
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default; InceptionFeatures turns it off itself
    out = MODES[args.mode](args)
    if args.out and args.mode != "features":  # features writes its JSON itself
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
