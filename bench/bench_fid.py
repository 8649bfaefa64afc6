"""FID: where torchmetrics' default and the torch-fidelity path differ, and what the new metric costs.

    python bench/bench_fid.py explain [--n-test 200 --n-train 200] [--device cpu] [--features F.npz]
    python bench/bench_fid.py speed [--n 32] [--batch-size 16] [--device cpu]

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
"""

from __future__ import annotations

import argparse
import io
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from analytic_dpm.fid import inception_weights as iw
from analytic_dpm.fid.metrics import FeatureStats, InceptionFeatures, fid_from_stats
from analytic_dpm.fid.sums import FeatureSums
from analytic_dpm.fid.tm import InceptionFID

DATA = "/work/shared/data/cifar10/jpeg_q75.npz"


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
        return FeatureStats.from_features(f)

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
                st = FeatureStats()
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["explain", "speed"])
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
    ap.add_argument("--out", default=None, help="write the figures as JSON")
    args = ap.parse_args()
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default; InceptionFeatures turns it off itself
    out = explain(args) if args.mode == "explain" else speed(args)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
