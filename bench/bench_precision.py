"""NLL and FID drift of bf16 / tf32 against fp32 on a trained checkpoint: the evidence behind ``eval.precision``
(issue 9).

    python bench/bench_precision.py --ckpt RUN/checkpoints/last.ckpt --out precision.json [--budget-s 300]

Only the network call changes between precisions: :func:`analytic_dpm.accel.prepare_eps_model` runs it at fp32
(TF32 off), tf32 (TF32 matmuls and cuDNN convolutions) or bf16 (autocast); the sampler, the NELBO sums and the
Inception network are the same float32 / float64 code at every precision. The checkpoint's EMA network and Gamma
(calibrated here with ``--calibration-M`` draws per timestep, and said so, when the checkpoint has none) and its
own data config (``--data-override key=value`` replaces keys, e.g. a data directory on another machine) are read as
``evaluate.py ckpt_path=...`` reads them, through the same functions.

* **NLL**: the first ``--nll-images`` held-out images, the NELBO in bits/dim (spec section 8) of ddpm_beta,
  ddpm_beta_tilde and analytic_ddpm (one network pass serves all three) on the even trajectory for each K, in
  evaluate.py's blocks of ``--nll-batch`` images with evaluate.py's seeds (``cell_seed(seed, "nll", "even", K)``, one
  generator per block): every precision sees the same images and the same forward noise eps, so the per-image values
  are paired. Each (method, K) row gives the mean bits/dim and its standard error (the evaluation's own Monte-Carlo
  noise) per precision and, against fp32, the mean paired difference, the mean and max |difference| and the
  standard error of the mean difference.
* **FID**: ``--fid-samples`` samples of ``--fid-method`` at K = ``--fid-K`` (even trajectory, x0hat clipped to the
  data range as evaluate.py does) per precision at seed 0, seeded as evaluate.py with ``eval.seed = --seed + s``
  (one generator per block of ``--fid-batch`` samples): the same x_T and the same z at every precision. FID against
  the training split's Inception statistics (evaluate.py's reference, computed once and cached in
  ``--reference-cache``). fp32 also runs seeds 1..S-1: the standard deviation of the fp32 FIDs over seeds is the
  yardstick. The first block's samples give the pixel RMS / max difference against fp32 (and the fraction of 8-bit
  values that change).
* ``bf16-attn``: bf16 with the UNet's self-attention in bf16 as well (``eval.attention_float32=false``; a copy of
  the network), measured after the other precisions.
* **Recommendation** (printed and in the JSON), speed order bf16-attn > bf16 > tf32 > fp32: for NLL the fastest
  precision whose max over (method, K) of |mean paired difference| is <= ``--nll-tolerance`` (0.005 bits/dim); for
  FID sampling the fastest precision whose |FID - FID(fp32)| at seed 0 is below the fp32 seed-to-seed standard
  deviation (``inconclusive`` with fewer than 2 fp32 seeds). The two are set apart: ``eval.precision`` (NLL,
  Gamma) and ``eval.fid.precision`` (sampling for FID); ``bf16-attn`` means ``bf16`` plus
  ``eval.attention_float32=false``. Wall seconds of every part are recorded, for information only.

``--compile`` is off by default: what is measured is the numeric precision, and torch.compile would add a second
change (fused kernels round differently) and minutes of compilation to the budget.

Time budget: the parts run in priority order (NLL fp32, NLL bf16, FID fp32 seed 0, FID bf16 seed 0, FID fp32 seed 1,
NLL tf32, FID tf32 seed 0, NLL and FID bf16-attn, further fp32 seeds; the FID reference statistics before the first
FID part), and a part
that would not fit in what is left of ``--budget-s`` (estimated from the rates measured so far, or a short probe)
is recorded as skipped. The JSON is rewritten atomically after every part, so a run killed by an outer timeout keeps
what it finished; a readable table is printed at the end and written as markdown next to the JSON. Progress lines
go to stderr.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from bench_gpu import Budget, sync  # noqa: E402

from analytic_dpm import accel, make_trajectory, nll_bpd, sample  # noqa: E402
from analytic_dpm.files import atomic_write_text  # noqa: E402
from analytic_dpm.methods import METHODS  # noqa: E402
from analytic_dpm.pixels import from_model_space  # noqa: E402

DDPM_METHODS = ("ddpm_beta", "ddpm_beta_tilde", "analytic_ddpm")  # the NLL is finite for these (DDPM forward)
# accel's ("fp32", "tf32", "bf16") and bf16-attn: bf16 with the UNet's self-attention in bf16 too (eval.precision=bf16
# eval.attention_float32=false, recorded as precision bf16-attn)
PRECISIONS = (*accel.PRECISIONS, "bf16-attn")
def accel_precision(precision: str) -> str:
    """The :mod:`analytic_dpm.accel` precision of a measured one (``bf16-attn`` is bf16 with bf16 attention)."""
    return "bf16" if precision == "bf16-attn" else precision


SPEED_ORDER = ("bf16-attn", "bf16", "tf32", "fp32")  # fastest first: the recommendation takes the first that qualifies
TRAJECTORY = "even"
DEFAULT_WEIGHTS = ROOT / "weights" / "pt_inception-2015-12-05.pth"
DEFAULT_REFERENCE_CACHE = ROOT / "outputs" / "fid_reference"  # evaluate.py's default (paths.log_dir/fid_reference)


def log(budget: Budget, message: str) -> None:
    print(f"[{budget.seconds - budget.left():7.1f}s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- arguments
def _csv(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return sorted(set(values))


def _precisions(text: str) -> list[str]:
    values = [v.lower() for v in _csv(text)]
    bad = [v for v in values if v not in PRECISIONS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"unknown precision(s) {bad or text!r}; choose from {', '.join(PRECISIONS)}")
    if "fp32" not in values:
        values.insert(0, "fp32")  # the baseline every difference is taken against
    return [p for p in PRECISIONS if p in values]


def _compile(text: str) -> str:
    value = str(text).strip().lower()
    if value not in ("false", "true", "auto"):
        raise argparse.ArgumentTypeError(f"--compile must be false, true or auto, got {text!r}")
    return value


def _override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value (``null``, numbers, booleans; anything else stays a string)."""
    import yaml

    key, sep, value = str(text).partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--data-override wants key=value, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a training checkpoint of train.py (EMA weights, Gamma)")
    ap.add_argument("--out", default="bench_precision.json", help="JSON results (markdown table: same name, .md)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--precisions", type=_precisions, default="fp32,tf32,bf16,bf16-attn",
                    help="comma list of fp32, tf32, bf16, bf16-attn (fp32, the baseline, is always included)")
    ap.add_argument("--K", type=_positive_ints, default="10,100", help="NLL: numbers of steps (even trajectory)")
    ap.add_argument("--nll-images", type=int, default=1000, help="the first n held-out images")
    ap.add_argument("--nll-batch", type=int, default=100, help="images per nll_bpd call (evaluate's nll.batch_size)")
    ap.add_argument("--network-batch", type=int, default=1000,
                    help="(timestep, image) pairs per network call (evaluate's nll.network_batch)")
    ap.add_argument("--fid-samples", type=int, default=10000)
    ap.add_argument("--fid-K", type=int, default=10)
    ap.add_argument("--fid-method", default="analytic_ddpm", choices=list(METHODS))
    ap.add_argument("--fid-seeds", type=int, default=3,
                    help="fp32 runs seeds 0..S-1 (spread); the other precisions seed 0; 0 = no FID")
    ap.add_argument("--no-fid", action="store_true", help="NLL only (same as --fid-seeds 0)")
    ap.add_argument("--fid-batch", type=int, default=500, help="samples per sampler call (evaluate's fid.batch_size)")
    ap.add_argument("--feature-batch", type=int, default=200, help="images per Inception call")
    ap.add_argument("--fid-weights", default=str(DEFAULT_WEIGHTS),
                    help="Inception weights (make fid-weights); 'none' lets torch-fidelity download them (online)")
    ap.add_argument("--reference-cache", default=str(DEFAULT_REFERENCE_CACHE),
                    help="directory of the cached training-split Inception statistics (evaluate's fid.reference_cache)")
    ap.add_argument("--reference-images", type=int, default=None,
                    help="FID reference: this many training images (fixed random subset); default: the whole split")
    ap.add_argument("--inception-rate", type=float, default=None,
                    help="Inception images/s assumed before one is measured (default: 2000 on cuda, 10 on cpu)")
    ap.add_argument("--compile", type=_compile, default="false",
                    help="torch.compile the network (false: the measurement isolates the precision)")
    ap.add_argument("--compile-guess-s", type=float, default=90.0,
                    help="seconds reserved for compiling a network before a part, with --compile true/auto")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no part that would end after this")
    ap.add_argument("--nll-tolerance", type=float, default=0.005, help="bits/dim")
    ap.add_argument("--seed", type=int, default=0, help="evaluate's eval.seed of the NLL and of FID seed 0")
    ap.add_argument("--calibration-M", type=int, default=100,
                    help="M draws per timestep when the checkpoint holds no Gamma (evaluate's calibration.num_samples)")
    ap.add_argument("--calibration-batch", type=int, default=1000)
    ap.add_argument("--data-override", type=_override, action="append", default=[], metavar="KEY=VALUE",
                    help="replace a key of the checkpoint's data config (repeatable), e.g. train_dir=/data/train")
    args = ap.parse_args(argv)
    for name in ("nll_images", "nll_batch", "network_batch", "fid_batch", "feature_batch", "fid_K",
                 "calibration_M", "calibration_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.fid_seeds < 0:
        ap.error(f"--fid-seeds must be >= 0, got {args.fid_seeds}")
    if args.no_fid:
        args.fid_seeds = 0
    if args.fid_seeds and args.fid_samples < 2:
        ap.error(f"--fid-samples must be >= 2, got {args.fid_samples}")
    if not args.nll_tolerance >= 0:
        ap.error(f"--nll-tolerance must be >= 0, got {args.nll_tolerance}")
    return args


# ------------------------------------------------------------------------------------------- the plan
@dataclass
class Part:
    """One unit of work in the priority list; ``kind`` is ``nll``, ``fid_reference`` or ``fid``."""

    kind: str
    precision: str | None = None
    seed: int | None = None
    status: str = "pending"  # pending -> done | skipped | error | not_applicable
    estimate_s: float | None = None
    seconds: float | None = None
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.kind == "nll":
            return f"nll {self.precision}"
        if self.kind == "fid":
            return f"fid {self.precision} seed {self.seed}"
        return "fid reference"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


def plan_parts(precisions: Sequence[str], fid_seeds: int) -> list[Part]:
    """The priority order of issue 9's measurement; the FID reference statistics come before the first FID part."""
    order = [("nll", "fp32", None), ("nll", "bf16", None), ("fid", "fp32", 0), ("fid", "bf16", 0),
             ("fid", "fp32", 1), ("nll", "tf32", None), ("fid", "tf32", 0), ("nll", "bf16-attn", None),
             ("fid", "bf16-attn", 0)]
    order += [("fid", "fp32", s) for s in range(2, fid_seeds)]
    parts = [Part(k, p, s) for k, p, s in order if p in precisions and (k == "nll" or s < fid_seeds)]
    first_fid = next((i for i, part in enumerate(parts) if part.kind == "fid"), None)
    if first_fid is not None:
        parts.insert(first_fid, Part("fid_reference"))
    return parts


# ------------------------------------------------------------------------------------------- statistics
def _finite(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def sem(values: torch.Tensor) -> float | None:
    """Standard error of the mean (unbiased std / sqrt(n)); None for fewer than 2 values."""
    n = values.numel()
    return _finite(values.double().std() / math.sqrt(n)) if n >= 2 else None


def nll_rows(per_image: Mapping[str, Mapping[tuple[str, int], torch.Tensor]]) -> list[dict[str, Any]]:
    """One row per (method, K, precision): mean bits/dim, its s.e., and the paired differences against fp32."""
    base = per_image.get("fp32")
    keys = sorted({key for values in per_image.values() for key in values},
                  key=lambda mk: (mk[1], DDPM_METHODS.index(mk[0]) if mk[0] in DDPM_METHODS else 99))
    rows = []
    for method, K in keys:
        for p in PRECISIONS:
            v = per_image.get(p, {}).get((method, K))
            if v is None:
                continue
            v = v.double()
            row = {"method": method, "K": K, "precision": p, "n_images": v.numel(), "mean_bpd": float(v.mean()),
                   "sem": sem(v)}
            if base is not None and (method, K) in base:
                ref = base[(method, K)].double()
                d = v - ref  # paired: the same image and the same eps in both
                row.update(mean_diff=float(d.mean()), mean_abs_diff=float(d.abs().mean()),
                           max_abs_diff=float(d.abs().max()), sem_diff=sem(d))
                ref_sem = sem(ref)
                row["drift_over_sem"] = abs(row["mean_diff"]) / ref_sem if ref_sem else None
            rows.append(row)
    return rows


def max_abs_mean_diff(rows: Sequence[Mapping[str, Any]], keys: set) -> dict[str, float | None]:
    """Per precision: max over (method, K) of |mean paired difference|; None unless every (method, K) has one."""
    out: dict[str, float | None] = {}
    for p in PRECISIONS:
        mine = {(r["method"], r["K"]): r.get("mean_diff") for r in rows if r["precision"] == p}
        if keys and set(mine) == keys and all(v is not None for v in mine.values()):
            out[p] = max(abs(v) for v in mine.values())
        else:
            out[p] = None
    return out


def worst_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per precision: the (method, K) row with the largest |mean paired difference| (which row sets the verdict)."""
    out = {}
    for r in rows:
        d = r.get("mean_diff")
        if d is not None and (r["precision"] not in out or abs(d) > abs(out[r["precision"]]["mean_diff"])):
            out[r["precision"]] = {k: r.get(k) for k in ("method", "K", "mean_diff", "mean_bpd", "sem",
                                                         "drift_over_sem")}
    return out


def pixel_drift(x: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """RMS and max of x - ref (model space, [-1, 1]) and the fraction of 8-bit values that differ."""
    d = x.double() - ref.double()
    changed = (from_model_space(x) != from_model_space(ref)).double().mean()
    return {"rms": float(d.pow(2).mean().sqrt()), "max": float(d.abs().max()),
            "uint8_changed_fraction": float(changed), "values": d.numel()}


# ------------------------------------------------------------------------------------------- the rules
def recommend_nll(max_diff: Mapping[str, float | None], tolerance: float) -> dict[str, Any]:
    """The fastest precision whose max over (method, K) of |mean paired difference vs fp32| <= ``tolerance``.

    ``max_diff[p]`` is None for a precision that was not measured; fp32 (difference 0 by construction) always
    qualifies once measured, so the answer is ``inconclusive`` only when fp32 itself is missing.
    """
    if max_diff.get("fp32") is None:
        return {"precision": "inconclusive", "reason": "the fp32 NLL (the baseline) was not measured",
                "tolerance": tolerance, "max_abs_mean_diff": dict(max_diff)}
    notes = []
    for p in SPEED_ORDER:
        d = max_diff.get(p)
        if p == "fp32" or (d is not None and d <= tolerance):
            what = "the baseline" if p == "fp32" else f"max |mean difference| {d:.5f} <= {tolerance} bits/dim"
            return {"precision": p, "reason": "; ".join(notes + [f"{p}: {what}"]), "tolerance": tolerance,
                    "max_abs_mean_diff": dict(max_diff)}
        notes.append(f"{p}: not measured" if d is None else
                     f"{p}: max |mean difference| {d:.5f} > {tolerance} bits/dim")
    raise AssertionError("unreachable: fp32 always qualifies")


def recommend_fid(fid_seed0: Mapping[str, float | None], fp32_fids: Sequence[float | None]) -> dict[str, Any]:
    """The fastest precision whose |FID(p) - FID(fp32)| at seed 0 is below the std of the fp32 FIDs over seeds.

    ``fp32_fids``: the fp32 FIDs of seeds 0..S-1 (seed 0 included); fewer than 2 -> ``inconclusive``.
    """
    fids = [f for f in (_finite(v) for v in fp32_fids) if f is not None]
    base = _finite(fid_seed0.get("fp32"))
    diffs = {p: abs(_finite(fid_seed0[p]) - base) for p in PRECISIONS
             if base is not None and _finite(fid_seed0.get(p)) is not None}
    out: dict[str, Any] = {"abs_diff_vs_fp32": diffs, "fp32_seeds": len(fids), "spread": None}
    if base is None:
        return {**out, "precision": "inconclusive", "reason": "the fp32 FID at seed 0 (the baseline) was not measured"}
    if len(fids) < 2:
        return {**out, "precision": "inconclusive",
                "reason": f"{len(fids)} fp32 seed(s): the seed-to-seed spread needs at least 2"}
    spread = statistics.stdev(fids)
    out["spread"] = spread
    notes = []
    for p in SPEED_ORDER:
        d = diffs.get(p)
        if p == "fp32" or (d is not None and d < spread):
            what = "the baseline" if p == "fp32" else f"|dFID| {d:.4f} < seed spread {spread:.4f}"
            return {**out, "precision": p, "reason": "; ".join(notes + [f"{p}: {what}"])}
        notes.append(f"{p}: not measured" if d is None else f"{p}: |dFID| {d:.4f} >= seed spread {spread:.4f}")
    raise AssertionError("unreachable: fp32 always qualifies")


# ------------------------------------------------------------------------------------------- setup
@dataclass
class Bench:
    """The loaded checkpoint and evaluate.py's context for it, plus what the parts produce."""

    args: argparse.Namespace
    device: torch.device
    settings: Any  # analytic_dpm.evaluation.settings.EvalSettings
    ctx: Any  # analytic_dpm.evaluation.grid.EvalContext (held-out images, nll_options, data range, shape)
    datamodule: Any
    meta: dict[str, Any]
    nets: dict[tuple[str, str], Any] = field(default_factory=dict)
    metric: Any = None  # InceptionFID with the reference loaded (after the fid_reference part)
    nll: dict[str, dict[tuple[str, int], torch.Tensor]] = field(default_factory=dict)  # precision -> per image bpd
    fid: dict[tuple[str, int], float] = field(default_factory=dict)  # (precision, seed) -> FID
    first_batch: dict[str, torch.Tensor] = field(default_factory=dict)  # precision -> seed-0 first block (CPU)
    reference_cache: Path | None = None  # reference_cache_file's answer, once computed

    @property
    def schedule(self):
        return self.ctx.schedule

    def network(self, phase: str, precision: str):
        """The EMA network at ``precision``, one wrapper per (phase, precision) as evaluate's GridRunner keeps."""
        key = (phase, precision)
        if key not in self.nets:
            batch = self.args.network_batch if phase == "nll" else self.args.fid_batch
            net = self.ctx.eps_model
            if precision == "bf16-attn":  # a copy with bf16 attention; the shared network keeps float32 attention
                from analytic_dpm.nets import set_attention_float32

                net = copy.deepcopy(net)
                if not set_attention_float32(net, False):
                    raise ValueError("bf16-attn: the network has no self-attention blocks of this package's UNet")
            self.nets[key] = accel.prepare_eps_model(net, precision=accel_precision(precision),
                                                     compile=self.args.compile, device=self.device,
                                                     static_batch=batch)
        return self.nets[key]


def eval_config(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """evaluate.py's ``eval`` config for this measurement (its defaults wherever the bench has no option)."""
    weights = None if str(args.fid_weights).lower() == "none" else str(Path(args.fid_weights).expanduser())
    return {
        "K": list(args.K), "trajectory": [TRAJECTORY], "method": list(dict.fromkeys([*DDPM_METHODS, args.fid_method])),
        "metrics": ["nll", "fid"], "seed": int(args.seed), "device": str(device), "precision": "fp32",
        "compile": args.compile,
        "calibration": {"num_samples": args.calibration_M, "batch_size": args.calibration_batch},
        "nll": {"num_images": args.nll_images, "batch_size": args.nll_batch, "network_batch": args.network_batch},
        "fid": {"num_samples": max(args.fid_samples, 2), "K": [args.fid_K], "method": [args.fid_method],
                "batch_size": args.fid_batch, "feature_batch_size": args.feature_batch, "weights_path": weights,
                "skip_if_missing_weights": True, "reference_images": args.reference_images,
                "reference_cache": str(Path(args.reference_cache).expanduser()), "save_grid": False},
    }


def load_bench(args: argparse.Namespace, device: torch.device, budget: Budget) -> Bench:
    """Checkpoint, data, Gamma and evaluate.py's context, built by evaluate.py's own public path: an
    :class:`~analytic_dpm.evaluation.EvalRequest` for this checkpoint, then :func:`~analytic_dpm.evaluation.
    build_context` (FID off here: its reference is a part of its own, :func:`run_fid_reference`)."""
    from omegaconf import OmegaConf

    from analytic_dpm.errors import UserError
    from analytic_dpm.evaluation import EvalRequest, EvalSettings, build_context
    from analytic_dpm.training.checkpoint import read_checkpoint

    eval_cfg = eval_config(args, device)
    settings = EvalSettings.from_config(eval_cfg)
    try:
        stored = read_checkpoint(args.ckpt)["hyper_parameters"].get("data")
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    if not isinstance(stored, Mapping):
        raise UserError(f"{args.ckpt} has no data config (hyper_parameters.data); this bench needs the training data")
    overrides = dict(args.data_override)
    cfg = OmegaConf.create({"ckpt_path": str(args.ckpt), "data": {**stored, **overrides} if overrides else None,
                            "paths": {"output_dir": str(Path(args.out).expanduser().parent)},
                            "wandb": {"mode": "disabled"}, "eval": {**eval_cfg, "metrics": ["nll"]}})
    request = EvalRequest.from_config(cfg)
    gamma_source = "checkpoint"
    try:
        ctx = build_context(request)
    except UserError as e:
        if "holds no Gamma" not in str(e):
            raise
        log(budget, f"{args.ckpt} holds no Gamma: calibrating it here with M = {args.calibration_M} draws per "
                    f"timestep on the training split, fp32 (evaluate.py's eval.recalibrate path)")
        request = dataclasses.replace(request, settings=dataclasses.replace(request.settings, recalibrate=True))
        ctx = build_context(request)
        gamma_source = "calibrated by bench_precision (the checkpoint has none)"
    net = ctx.eps_model
    meta = {
        "checkpoint": {"path": str(Path(args.ckpt).resolve()), "step": ctx.identity.get("model_step"),
                       "weights": ctx.conventions.get("weights"), "model_id": ctx.identity.get("model_id"),
                       "parameters": sum(p.numel() for p in net.parameters())},
        "gamma": {"source": gamma_source, "M": ctx.gamma_M},
        "schedule": {"name": ctx.schedule.name, "N": ctx.schedule.N},
        "data": {"dataset": ctx.dataset, "config": request.data or stored, "overrides": overrides,
                 "num_heldout": ctx.num_heldout, "is_image": ctx.is_image, "data_range": ctx.data_range,
                 "sample_shape": list(ctx.sample_shape)},
        "nll_options": ctx.nll_options,
        "sampling": {"eta": settings.eta, "clip_x0": settings.clip_x0,
                     "clip_sigma_y": settings.fid.clip_sigma_y.get(args.fid_method)},
        "identity": ctx.identity,
    }
    return Bench(args=args, device=device, settings=settings, ctx=ctx, datamodule=ctx.datamodule, meta=meta)


# ------------------------------------------------------------------------------------------- the parts
def run_nll(b: Bench, precision: str) -> dict[str, Any]:
    """NELBO per held-out image for every DDPM method and K, evaluate.py's blocks and seeds (module docstring)."""
    from analytic_dpm.evaluation.modules import block_generator, block_ranges
    from analytic_dpm.seeding import cell_seed

    net = b.network("nll", precision)
    x_all = b.ctx.heldout(b.args.nll_images)
    per_image: dict[tuple[str, int], torch.Tensor] = {}
    evals = 0
    for K in b.args.K:
        taus = make_trajectory(TRAJECTORY, b.schedule.N, K)
        seed = cell_seed(b.args.seed, "nll", TRAJECTORY, K)  # the seed evaluate.py gives this NLL cell
        chunks: dict[str, list[torch.Tensor]] = {m: [] for m in DDPM_METHODS}
        for j, start, n in block_ranges(len(x_all), b.args.nll_batch):
            bpd = nll_bpd(net, b.schedule, taus, x_all[start:start + n].to(b.device), list(DDPM_METHODS),
                          gamma=b.ctx.gamma, generator=block_generator(seed, j, b.device),
                          batch_size=b.args.network_batch, **b.ctx.nll_options)
            for m in DDPM_METHODS:
                chunks[m].append(bpd[m])
            evals += n * K  # one network call per (image, tau_k), shared by the three methods
        for m in DDPM_METHODS:
            per_image[(m, K)] = torch.cat(chunks[m])
    sync(b.device)
    b.nll[precision] = per_image
    return {"network_evals": evals, "n_images": len(x_all), "network": net.record()}


def run_fid_reference(b: Bench) -> dict[str, Any]:
    """evaluate.py's FID metric with the training split's statistics (computed once, cached)."""
    from analytic_dpm.evaluation.reference import fid_context

    fid_ctx = fid_context(b.settings, b.datamodule, b.device)
    if fid_ctx is None:
        raise RuntimeError(f"no Inception weights at {b.settings.fid.weights_path} (make fid-weights)")
    b.metric = fid_ctx.metric
    return {"reference_path": fid_ctx.reference_path, "reference": fid_ctx.identity.get("reference"),
            "weights": fid_ctx.identity.get("weights"),
            "reference_images": int(b.metric.real_features_num_samples)}


def run_fid(b: Bench, precision: str, seed: int) -> dict[str, Any]:
    """FID of ``--fid-samples`` samples at ``precision``, seeded as evaluate.py with eval.seed = --seed + seed."""
    from analytic_dpm.evaluation.modules import block_generator, block_ranges
    from analytic_dpm.seeding import cell_seed

    a, s = b.args, b.settings
    net = b.network("fid", precision)
    taus = make_trajectory(TRAJECTORY, b.schedule.N, a.fid_K)
    cseed = cell_seed(a.seed + seed, "fid", a.fid_method, TRAJECTORY, a.fid_K)  # evaluate.py's FID cell seed
    b.metric.reset()  # the fake statistics only: reset_real_features=False keeps the reference
    sample_s = inception_s = 0.0
    for j, _, n in block_ranges(a.fid_samples, a.fid_batch):
        sync(b.device)
        t0 = time.perf_counter()
        # x_T and every z come from this block's generator: the same numbers at every precision
        x = sample(net, b.schedule, taus, a.fid_method, (n, *b.ctx.sample_shape), gamma=b.ctx.gamma, eta=s.eta,
                   clip_x0=s.clip_x0, clip_sigma_y=s.fid.clip_sigma_y.get(a.fid_method),
                   generator=block_generator(cseed, j, b.device), device=b.device, data_range=b.ctx.data_range)
        sync(b.device)
        t1 = time.perf_counter()
        if j == 0 and seed == 0:
            b.first_batch[precision] = x.detach().cpu()
        b.metric.update(x)
        sync(b.device)
        sample_s += t1 - t0
        inception_s += time.perf_counter() - t1
    t0 = time.perf_counter()
    value = float(b.metric.compute())  # two 2048-d symmetric eigendecompositions, on the CPU
    b.fid[(precision, seed)] = value
    return {"fid": value, "num_samples": a.fid_samples, "cell_seed": cseed, "trajectory": taus,
            "network_evals": a.fid_samples * a.fid_K, "sample_s": sample_s, "inception_s": inception_s,
            "compute_s": time.perf_counter() - t0, "network": net.record()}


# ------------------------------------------------------------------------------------------- estimates
def reference_cache_file(b: Bench) -> Path:
    """Where evaluate.py's ``fid_context`` caches the reference statistics (its own rule), to size that part."""
    if b.reference_cache is None:
        from analytic_dpm.evaluation.reference import reference_cache_path, reference_images
        from analytic_dpm.fid import data_fingerprint

        images = reference_images(b.settings, b.datamodule)
        b.reference_cache = reference_cache_path(b.settings.fid.reference_cache, getattr(b.datamodule, "name", "data"),
                                                 data_fingerprint(images), len(images))
    return b.reference_cache


class Rates:
    """Measured throughputs that size the next parts: network evaluations per second per (kind, precision) and
    Inception images per second. Before any measurement: a short probe of the fp32 network, and the
    ``--inception-rate`` guess."""

    def __init__(self, b: Bench, inception_guess: float):
        self.b = b
        self.net: dict[tuple[str, str], float] = {}
        self.inception: float | None = None
        self.fid_compute_s = 5.0  # FID from the sums; replaced by the measured seconds
        self.inception_guess = inception_guess
        self._probe: float | None = None

    def network(self, kind: str, precision: str) -> float:
        other = "fid" if kind == "nll" else "nll"
        for key in ((kind, precision), (kind, "fp32"), (other, precision), (other, "fp32")):
            if key in self.net:
                return self.net[key]
        if self._probe is None:
            self._probe = self.probe()
        return self._probe

    def probe(self) -> float:
        """Network evaluations/s of the eager fp32 network: one warm-up call, then two timed calls."""
        b = self.b
        batch = min(b.args.network_batch, b.args.fid_batch, 256)
        net = accel.prepare_eps_model(b.ctx.eps_model, precision="fp32", compile=False, device=b.device)
        x = torch.randn(batch, *b.ctx.sample_shape, device=b.device)
        t = torch.randint(1, b.schedule.N + 1, (batch,), device=b.device)
        with torch.no_grad():
            net(x, t)
            sync(b.device)
            t0 = time.perf_counter()
            net(x, t)
            net(x, t)
            sync(b.device)
        return 2 * batch / max(time.perf_counter() - t0, 1e-6)

    def inception_rate(self) -> float:
        return self.inception or self.inception_guess

    def compile_reserve(self, phase: str, precision: str) -> float:
        b = self.b
        wants = accel.resolve_settings(precision=accel_precision(precision), compile=b.args.compile,
                                       device=b.device).compile
        return b.args.compile_guess_s if wants and (phase, precision) not in b.nets else 0.0

    def estimate(self, part: Part) -> float:
        """Seconds the part should take (with a 15 % margin and a few seconds of fixed cost)."""
        a = self.b.args
        if part.kind == "nll":
            n = min(a.nll_images, self.b.ctx.num_heldout)
            work = n * sum(a.K) / self.network("nll", part.precision)
            return 1.15 * work + 2.0 + self.compile_reserve("nll", part.precision)
        if part.kind == "fid":
            work = a.fid_samples * a.fid_K / self.network("fid", part.precision) + a.fid_samples / self.inception_rate()
            return 1.15 * work + 1.0 + self.fid_compute_s + self.compile_reserve("fid", part.precision)
        n_ref = a.reference_images or self.b.datamodule.num_train
        return 5.0 if reference_cache_file(self.b).is_file() else 1.15 * n_ref / self.inception_rate() + 5.0

    def update(self, part: Part) -> None:
        d = part.detail
        if part.kind == "nll" and part.seconds:
            self.net[("nll", part.precision)] = d["network_evals"] / part.seconds
        elif part.kind == "fid":
            if d.get("sample_s"):
                self.net[("fid", part.precision)] = d["network_evals"] / d["sample_s"]
            if d.get("inception_s"):
                self.inception = d["num_samples"] / d["inception_s"]
            self.fid_compute_s = d.get("compute_s", self.fid_compute_s)
        elif part.kind == "fid_reference" and d.get("computed") and part.seconds and part.seconds > 1.0:
            self.inception = d["reference_images"] / part.seconds


# ------------------------------------------------------------------------------------------- results
def fid_summary(b: Bench) -> dict[str, Any]:
    seed0 = {p: b.fid.get((p, 0)) for p in PRECISIONS if (p, 0) in b.fid}
    fp32_seeds = {s: v for (p, s), v in sorted(b.fid.items()) if p == "fp32"}
    rows = []
    for p in PRECISIONS:
        if (p, 0) not in b.fid:
            continue
        row = {"precision": p, "seed": 0, "fid": b.fid[(p, 0)],
               "abs_diff_vs_fp32": abs(b.fid[(p, 0)] - seed0["fp32"]) if "fp32" in seed0 else None}
        if p in b.first_batch and "fp32" in b.first_batch:
            row["pixels_first_batch"] = pixel_drift(b.first_batch[p], b.first_batch["fp32"])
        rows.append(row)
    spread = statistics.stdev(fp32_seeds.values()) if len(fp32_seeds) >= 2 else None
    return {"method": b.args.fid_method, "K": b.args.fid_K, "trajectory": TRAJECTORY, "num_samples": b.args.fid_samples,
            "rows": rows, "fp32_by_seed": {str(s): v for s, v in fp32_seeds.items()}, "fp32_seed_std": spread}


def summarize(b: Bench | None) -> dict[str, Any]:
    """The comparisons and the recommendation from whatever has been measured so far."""
    if b is None:
        return {"nll": {}, "fid": {}, "recommendation": {
            "nll": recommend_nll({}, 0.0), "fid_sampling": recommend_fid({}, [])}}
    rows = nll_rows(b.nll)
    keys = {(m, K) for m in DDPM_METHODS for K in b.args.K}
    worst = max_abs_mean_diff(rows, keys)
    # the same rule per method: shows whether one method (e.g. ddpm_beta_tilde, whose small sigma^2 magnifies any
    # change of x0hat) alone decides the verdict
    per_method = {m: recommend_nll(max_abs_mean_diff([r for r in rows if r["method"] == m],
                                                     {k for k in keys if k[0] == m}), b.args.nll_tolerance)["precision"]
                  for m in DDPM_METHODS}
    fid = fid_summary(b)
    seed0 = {r["precision"]: r["fid"] for r in fid["rows"]}
    return {
        "nll": {"trajectory": TRAJECTORY, "K": list(b.args.K), "methods": list(DDPM_METHODS), "rows": rows,
                "max_abs_mean_diff": worst, "worst_row": worst_rows(rows)},
        "fid": fid,
        "recommendation": {
            "speed_order": list(SPEED_ORDER),
            "nll": {**recommend_nll(worst, b.args.nll_tolerance), "per_method": per_method},
            "fid_sampling": recommend_fid(seed0, list(fid["fp32_by_seed"].values())),
            "rule": (f"NLL: fastest precision with max over (method, K) of |mean paired difference vs fp32| <= "
                     f"{b.args.nll_tolerance} bits/dim. FID sampling: fastest precision with |FID - FID(fp32)| at seed "
                     "0 below the std of the fp32 FIDs over seeds (inconclusive with fewer than 2 seeds)."),
        },
    }


def _plain(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None (strict JSON has no NaN), tuples lists, other objects strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return _plain(obj.item())
    return str(obj)


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def markdown(res: Mapping[str, Any]) -> str:
    """The readable tables: NLL drift, FID drift, the recommendation, the parts and their seconds."""
    meta, nll, fid, rec = res["meta"], res.get("nll") or {}, res.get("fid") or {}, res.get("recommendation") or {}
    ck = meta.get("checkpoint") or {}
    lines = [f"# Precision drift: {ck.get('path', meta['args'].get('ckpt'))} (step {ck.get('step')})", "",
             f"{meta['device_name']} ({meta['device']}), torch {meta['torch']}, compile {meta['args'].get('compile')}; "
             f"Gamma: {(meta.get('gamma') or {}).get('source')}", ""]
    if nll.get("rows"):
        n = nll["rows"][0]["n_images"]
        lines += [f"## NLL (bits/dim), {n} held-out images, {nll['trajectory']} trajectory, same images and eps", "",
                  "| method | K | precision | mean bpd | s.e. | mean diff vs fp32 | mean abs diff | max abs diff | "
                  "s.e. of diff | abs(mean diff) / s.e. |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in nll["rows"]:
            lines.append(f"| {r['method']} | {r['K']} | {r['precision']} | {_fmt(r['mean_bpd'], '.5f')} | "
                         f"{_fmt(r['sem'], '.5f')} | {_fmt(r.get('mean_diff'), '+.6f')} | "
                         f"{_fmt(r.get('mean_abs_diff'), '.6f')} | {_fmt(r.get('max_abs_diff'), '.6f')} | "
                         f"{_fmt(r.get('sem_diff'), '.6f')} | {_fmt(r.get('drift_over_sem'), '.3f')} |")
        for p, w in (nll.get("worst_row") or {}).items():
            if p != "fp32":
                lines.append(f"- {p}: largest drift {w['method']} K={w['K']}: {_fmt(w['mean_diff'], '+.6f')} bits/dim "
                             f"({_fmt(w['drift_over_sem'], '.3f')} s.e. of the fp32 mean)")
        lines.append("")
    if fid.get("rows"):
        lines += [f"## FID, {fid['method']} K={fid['K']} ({fid['trajectory']}), {fid['num_samples']} samples, same "
                  "x_T and z", "",
                  "| precision | seed | FID | abs diff vs fp32 | pixel RMS (1st batch) | pixel max | uint8 changed |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in fid["rows"]:
            px = r.get("pixels_first_batch") or {}
            lines.append(f"| {r['precision']} | {r['seed']} | {_fmt(r['fid'], '.4f')} | "
                         f"{_fmt(r['abs_diff_vs_fp32'], '.4f')} | {_fmt(px.get('rms'), '.5f')} | "
                         f"{_fmt(px.get('max'), '.4f')} | {_fmt(px.get('uint8_changed_fraction'), '.4f')} |")
        seeds = ", ".join(f"seed {s}: {v:.4f}" for s, v in (fid.get("fp32_by_seed") or {}).items())
        lines += ["", f"fp32 over seeds: {seeds}; std {_fmt(fid.get('fp32_seed_std'), '.4f')}", ""]
    if rec:
        lines += ["## Recommendation", ""]
        for key, label, setting in (("nll", "NLL", "eval.precision"), ("fid_sampling", "FID sampling",
                                                                         "eval.fid.precision")):
            r = rec.get(key) or {}
            lines.append(f"- {label} (`{setting}`): **{r.get('precision')}** ({r.get('reason')})")
            if r.get("per_method"):
                lines.append("  - the same rule per method: " +
                             ", ".join(f"{m} {v}" for m, v in r["per_method"].items()))
        if rec.get("rule"):
            lines.append(f"- rule: {rec['rule']}")
        lines.append("")
    lines += ["## Parts (seconds are informative only)", "", "| part | status | estimate s | seconds | note |",
              "|---|---|---:|---:|---|"]
    for p in res.get("parts") or []:
        lines.append(f"| {p['name']} | {p['status']} | {_fmt(p['estimate_s'], '.1f')} | {_fmt(p['seconds'], '.1f')} | "
                     f"{str(p['note']).replace('|', '/')} |")
    if res.get("errors"):
        lines += ["", "Errors: " + "; ".join(res["errors"])]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- driver
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def _run_part(b: Bench, part: Part) -> dict[str, Any]:
    if part.kind == "nll":
        return run_nll(b, part.precision)
    if part.kind == "fid":
        return run_fid(b, part.precision, part.seed)
    cached = reference_cache_file(b).is_file()
    return {**run_fid_reference(b), "computed": not cached}


def _fid_not_applicable(b: Bench) -> str | None:
    if not b.ctx.is_image:
        return f"FID needs image data; {b.ctx.dataset} is not (data_range None)"
    weights = b.settings.fid.weights_path
    if weights is not None and not Path(weights).is_file():
        return f"no Inception weights at {weights} (make fid-weights, or --fid-weights FILE)"
    return None


def run_parts(b: Bench, parts: list[Part], budget: Budget, rates: Rates, save) -> None:
    """Every part in priority order: skipped when the budget cannot hold its estimate, errors recorded, JSON after
    each."""
    reference: Part | None = next((p for p in parts if p.kind == "fid_reference"), None)
    for part in parts:
        if part.status != "pending":
            continue
        if part.kind == "fid" and b.metric is None:
            part.status, part.note = "skipped", f"needs the FID reference ({reference.status}: {reference.note})"
            continue
        if budget.left() <= 0:
            part.status, part.note = "skipped", "time budget: nothing left"
            log(budget, f"{part.name}: skipped ({part.note})")
            continue
        need = rates.estimate(part)
        part.estimate_s = round(need, 1)
        if not budget.allows(need):
            part.status, part.note = "skipped", f"time budget: {budget.left():.0f}s left, needs ~{need:.0f}s"
            log(budget, f"{part.name}: skipped ({part.note})")
            save()
            continue
        log(budget, f"{part.name}: start (estimate {need:.0f}s, {budget.left():.0f}s left)")
        t0 = time.perf_counter()
        try:
            part.detail = _run_part(b, part)
            part.status = "done"
        except Exception as e:  # noqa: BLE001 - record it (e.g. bf16 overflow: NonFiniteOutputError) and go on
            part.status, part.note = "error", f"{type(e).__name__}: {e}"
            traceback.print_exc()
            if b.device.type == "cuda":
                torch.cuda.empty_cache()  # after an out-of-memory error the next part may still fit
        part.seconds = round(time.perf_counter() - t0, 2)
        if part.status == "done":
            rates.update(part)
            summary = f"FID {part.detail['fid']:.4f}" if part.kind == "fid" else ""
            log(budget, f"{part.name}: done in {part.seconds:.1f}s {summary}".rstrip())
        else:
            log(budget, f"{part.name}: {part.note}")
        save()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    out_path = Path(args.out)
    md_path = out_path.with_suffix(".md")
    res: dict[str, Any] = {
        "meta": {"script": "bench/bench_precision.py", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                 "threads": torch.get_num_threads(), "argv": list(sys.argv[1:] if argv is None else argv),
                 "args": vars(args), "device": None, "device_name": None},
        "parts": [], "errors": [],
    }
    state: dict[str, Any] = {"bench": None, "parts": []}

    def save() -> None:
        res["parts"] = [p.as_dict() for p in state["parts"]]
        res.update(summarize(state["bench"]))
        res["timings_s"] = {p.name: p.seconds for p in state["parts"] if p.seconds is not None}
        res["meta"]["elapsed_s"] = round(budget.seconds - budget.left(), 1)
        atomic_write_text(out_path, json.dumps(_plain(res), indent=1, allow_nan=False))

    from analytic_dpm.errors import UserError
    from analytic_dpm.evaluation.sources import pick_device

    try:
        device = pick_device(args.device or "auto")
        res["meta"].update(device=str(device), device_name=_device_name(device),
                           cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None)
        log(budget, f"loading {args.ckpt} on {device}")
        b = load_bench(args, device, budget)
    except (UserError, OSError, ValueError, RuntimeError) as e:
        if not isinstance(e, UserError):  # a missing data dir, an unreadable file ...
            traceback.print_exc()
        res["errors"].append(f"setup: {type(e).__name__}: {e}")
        save()
        print(f"bench_precision: {e}", file=sys.stderr)
        return 2
    state["bench"] = b
    res["meta"].update(b.meta)
    parts = plan_parts(args.precisions, args.fid_seeds)
    state["parts"] = parts
    reason = _fid_not_applicable(b)
    for part in parts:
        if reason and part.kind in ("fid", "fid_reference"):
            part.status, part.note = "not_applicable", reason
    guess = args.inception_rate or (2000.0 if device.type == "cuda" else 10.0)
    save()
    run_parts(b, parts, budget, Rates(b, guess), save)
    res["errors"] = [f"{p.name}: {p.note}" for p in parts if p.status == "error"]
    save()
    text = markdown(_plain(res))
    atomic_write_text(md_path, text)
    print(text, flush=True)
    print(f"wrote {out_path} and {md_path} ({res['meta']['elapsed_s']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
