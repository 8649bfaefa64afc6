"""Typed, validated settings of an evaluation run (``conf/eval/*.yaml``), checked once before anything costly.

``EvalSettings.from_config(cfg.eval)`` turns the Hydra config into frozen dataclasses and raises
:class:`SettingsError` (a ``ValueError`` whose message names the key, the bad value and what to write instead)
for unknown method / trajectory / metric names, K that is not a positive integer (``10.7``, ``"abc"``, ``[]``),
non-positive image or sample counts, and so on. Values are never coerced silently: ``K=10.7`` is an error, not
``10``. The K <= N check needs the model's N and is :meth:`EvalSettings.check_against`.

The runner reads attributes of these objects only; nothing downstream looks up nested config keys.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..accel import parse_flag
from ..errors import UserError
from ..likelihood import CDFS, DECODER_VARIANCES, DECODERS
from ..methods import ALL_METHODS
from ..registry import plain
from ..trajectory import GAMMA_POLICIES, QUADRATIC_DUPLICATES, TRAJECTORY_KINDS

METRICS = ("nll", "fid")
ON_MISMATCH = ("refuse", "new_dir")
PRECISIONS = ("fp32", "tf32", "bf16")


class SettingsError(UserError, ValueError):
    """An evaluation setting is invalid; the message says which key and what to write."""


# ------------------------------------------------------------------------------------------------ value parsers
def _list(key: str, value: Any, *, allow_none: bool = False) -> list | None:
    """A config entry that may be a single value (one Hydra multirun job) or a list."""
    value = plain(value)
    if value is None:
        if allow_none:
            return None
        raise SettingsError(f"{key} must name at least one value, got null")
    if isinstance(value, (str, bool, numbers.Number)):
        value = [value]
    elif callable(getattr(value, "tolist", None)):  # a numpy array / tensor of values
        value = value.tolist()
        value = value if isinstance(value, list) else [value]
    if not isinstance(value, (list, tuple)):
        raise SettingsError(f"{key} must be a value or a list of values, got {value!r}")
    if not value and not allow_none:
        raise SettingsError(f"{key} must name at least one value, got an empty list")
    return list(value)


def _int(key: str, value: Any, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # numpy integers too
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 100.0 is harmless
        else:
            what = "an integer" + (" or null" if allow_none else "")
            raise SettingsError(f"{key} must be {what}, got {value!r}")
    if minimum is not None and value < minimum:
        raise SettingsError(f"{key} must be >= {minimum}, got {value}")
    return value


def _float(key: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
           allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise SettingsError(f"{key} must be a finite number, got {value!r}")
    if minimum is not None and float(value) < minimum:
        raise SettingsError(f"{key} must be >= {minimum}, got {value}")
    if maximum is not None and float(value) > maximum:
        raise SettingsError(f"{key} must be <= {maximum}, got {value}")
    return float(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"{key} must be true or false, got {value!r}")
    return value


def _choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise SettingsError(f"{key}: unknown value {value!r}; choose one of {', '.join(choices)}")
    return value


def _choices(key: str, value: Any, choices: Sequence[str], *, allow_none: bool = False) -> tuple[str, ...] | None:
    items = _list(key, value, allow_none=allow_none)
    if items is None:
        return None
    bad = [v for v in items if not isinstance(v, str) or v not in choices]
    if bad:
        raise SettingsError(f"{key}: unknown value(s) {bad}; choose from {', '.join(choices)}")
    return tuple(dict.fromkeys(items))


def _ks(key: str, value: Any, *, allow_none: bool = False) -> tuple[int, ...] | None:
    items = _list(key, value, allow_none=allow_none)
    if items is None:
        return None
    out = []
    for v in items:
        if isinstance(v, bool) or not (isinstance(v, numbers.Integral) or (isinstance(v, float) and v.is_integer())):
            raise SettingsError(f"{key} must hold positive integers (numbers of sampling steps), got {v!r}")
        if int(v) < 1:
            raise SettingsError(f"{key} must hold positive integers (numbers of sampling steps), got {v!r}")
        out.append(int(v))
    return tuple(sorted(set(out)))


def _str(key: str, value: Any, *, allow_none: bool = True) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value:
        raise SettingsError(f"{key} must be a non-empty string" + (" or null" if allow_none else "") +
                            f", got {value!r}")
    return value


def _compile_choice(value: Any) -> str:
    """``eval.compile`` as ``"auto"``, ``"true"`` or ``"false"`` (:func:`analytic_dpm.accel.parse_flag`)."""
    try:
        flag = parse_flag(value, "eval.compile")
    except ValueError as e:
        raise SettingsError(str(e)) from None
    return flag if flag == "auto" else str(flag).lower()


def _unknown(section: str, given: Mapping, known: Sequence[str]) -> None:
    bad = sorted(set(given) - set(known))
    if bad:
        raise SettingsError(f"{section}: unknown key(s) {bad}; known keys: {', '.join(known)}")


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class CalibrationSettings:
    num_samples: int = 100  # M, draws per timestep (spec section 5)
    batch_size: int = 1000


@dataclass(frozen=True)
class NllSettings:
    num_images: int | None = None  # None = the whole held-out split
    batch_size: int = 100
    network_batch: int = 1000
    decoder: str = "discrete"
    decoder_variance: str = "paper"
    clip_x0: bool = True
    cdf: str = "tanh"


@dataclass(frozen=True)
class FidSettings:
    num_samples: int = 50000
    K: tuple[int, ...] | None = None
    method: tuple[str, ...] | None = None
    batch_size: int = 500
    feature_batch_size: int = 200
    feature_precision: str = "fp32"  # the Inception forward: fp32 (TF32 off) | tf32 | bf16 (InceptionFeatures)
    # the network's precision while sampling for FID (None: eval.precision); NLL and Gamma keep eval.precision
    precision: str | None = None
    channels_last: bool = False  # the Inception in channels_last memory format
    weights_path: str | None = None
    skip_if_missing_weights: bool = False
    reference_images: int | None = None
    reference_cache: str | None = None
    reference_stats: str | None = None  # a pytorch-fid .npz (mu, sigma) the user already has
    save_grid: bool = True
    clip_sigma_y: dict[str, float | None] = field(default_factory=dict)

    def wanted(self, method: str, K: int) -> bool:
        """FID is costly: ``fid.K`` / ``fid.method`` (null = all) restrict it to a sub-grid."""
        return (self.K is None or K in self.K) and (self.method is None or method in self.method)


@dataclass(frozen=True)
class HeadSettings:
    """Covariance heads (SN-DPM / NPR-DPM, spec section 11)."""

    methods: str = "auto"  # auto: a model with a head adds its methods (sn_* or npr_*) to the grid | none
    avg_cov: bool = False  # the head's per-pixel variance replaced by its mean over the pixels of each image
    cost_images: int = 64  # training images of the optimal trajectory's pair-cost table (N network calls each)
    cost_batch_size: int = 500  # network batch of that estimate


HEAD_METHOD_CHOICES = ("auto", "none")


@dataclass(frozen=True)
class EvalSettings:
    K: tuple[int, ...]
    trajectory: tuple[str, ...]
    method: tuple[str, ...]
    metrics: tuple[str, ...]
    seed: int = 0
    device: str = "auto"
    eta: float = 0.0
    clip_x0: bool = True
    gamma_policy: str = "monotone"
    quadratic_duplicates: str = "reject"
    gamma_path: str | None = None
    gamma_cache: str | None = None  # pretrained models: Gamma calibrated once per (model, data, M, seed), kept here
    recalibrate: bool = False
    on_mismatch: str = "refuse"
    precision: str = "fp32"  # the network's numeric precision (analytic_dpm.accel): fp32 | tf32 | bf16
    compile: str = "auto"  # torch.compile the network: auto (CUDA only) | true | false
    compile_mode: str | None = None  # e.g. reduce-overhead (CUDA graphs)
    # the UNet's self-attention in float32 (true) or in the autocast dtype (false) under precision=bf16;
    # None: as the network was built (float32 for this package's UNet)
    attention_float32: bool | None = None
    shard: int = 0  # this job's shard of every cell (eval.num_shards jobs split each cell; merge adds them)
    num_shards: int = 1
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    nll: NllSettings = field(default_factory=NllSettings)
    fid: FidSettings = field(default_factory=FidSettings)
    head: HeadSettings = field(default_factory=HeadSettings)
    report_variance_K: tuple[int, ...] = ()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Mapping) -> EvalSettings:
        """Validate ``cfg`` (the ``eval`` section, DictConfig or dict) completely; raises :class:`SettingsError`."""
        c = plain(cfg) or {}
        if not isinstance(c, Mapping):
            raise SettingsError(f"eval must be a mapping, got {c!r}")
        top = ["K", "trajectory", "method", "metrics", "seed", "device", "eta", "clip_x0", "gamma_policy",
               "quadratic_duplicates", "gamma_path", "gamma_cache", "recalibrate", "on_mismatch", "calibration", "nll",
               "fid", "report", "precision", "compile", "compile_mode", "attention_float32", "shard", "num_shards",
               "head"]
        _unknown("eval", c, top)
        cal = dict(c.get("calibration") or {})
        _unknown("eval.calibration", cal, [f.name for f in fields(CalibrationSettings)])
        nll = dict(c.get("nll") or {})
        _unknown("eval.nll", nll, [f.name for f in fields(NllSettings)])
        fid = dict(c.get("fid") or {})
        _unknown("eval.fid", fid, [f.name for f in fields(FidSettings)])
        rep = dict(c.get("report") or {})
        _unknown("eval.report", rep, ["variance_K"])
        head = dict(c.get("head") or {})
        _unknown("eval.head", head, [f.name for f in fields(HeadSettings)])

        methods = _choices("eval.method", c.get("method"), tuple(ALL_METHODS))
        clip_y = plain(fid.get("clip_sigma_y")) or {}
        if not isinstance(clip_y, Mapping):
            raise SettingsError(f"eval.fid.clip_sigma_y must map method names to pixel levels, got {clip_y!r}")
        _unknown("eval.fid.clip_sigma_y", clip_y, tuple(ALL_METHODS))
        return cls(
            K=_ks("eval.K", c.get("K")),
            trajectory=_choices("eval.trajectory", c.get("trajectory"), TRAJECTORY_KINDS),
            method=methods,
            metrics=_choices("eval.metrics", c.get("metrics", ["nll"]), METRICS),
            seed=_int("eval.seed", c.get("seed", 0)),
            device=_str("eval.device", c.get("device", "auto"), allow_none=False),
            eta=_float("eval.eta", c.get("eta", 0.0), minimum=0.0, maximum=1.0),
            clip_x0=_bool("eval.clip_x0", c.get("clip_x0", True)),
            gamma_policy=_choice("eval.gamma_policy", c.get("gamma_policy", "monotone"), GAMMA_POLICIES),
            quadratic_duplicates=_choice("eval.quadratic_duplicates", c.get("quadratic_duplicates", "reject"),
                                         QUADRATIC_DUPLICATES),
            gamma_path=_str("eval.gamma_path", c.get("gamma_path")),
            gamma_cache=_str("eval.gamma_cache", c.get("gamma_cache")),
            recalibrate=_bool("eval.recalibrate", c.get("recalibrate", False)),
            on_mismatch=_choice("eval.on_mismatch", c.get("on_mismatch", "refuse"), ON_MISMATCH),
            precision=_choice("eval.precision", c.get("precision", "fp32"), PRECISIONS),
            compile=_compile_choice(c.get("compile", "auto")),
            compile_mode=_str("eval.compile_mode", c.get("compile_mode")),
            attention_float32=None if c.get("attention_float32") is None else
            _bool("eval.attention_float32", c.get("attention_float32")),
            shard=_int("eval.shard", c.get("shard", 0), minimum=0),
            num_shards=_int("eval.num_shards", c.get("num_shards", 1), minimum=1),
            calibration=CalibrationSettings(
                num_samples=_int("eval.calibration.num_samples", cal.get("num_samples", 100), minimum=1),
                batch_size=_int("eval.calibration.batch_size", cal.get("batch_size", 1000), minimum=1),
            ),
            nll=NllSettings(
                num_images=_int("eval.nll.num_images", nll.get("num_images"), minimum=1, allow_none=True),
                batch_size=_int("eval.nll.batch_size", nll.get("batch_size", 100), minimum=1),
                network_batch=_int("eval.nll.network_batch", nll.get("network_batch", 1000), minimum=1),
                decoder=_choice("eval.nll.decoder", nll.get("decoder", "discrete"), DECODERS),
                decoder_variance=_choice("eval.nll.decoder_variance", nll.get("decoder_variance", "paper"),
                                         DECODER_VARIANCES),
                clip_x0=_bool("eval.nll.clip_x0", nll.get("clip_x0", True)),
                cdf=_choice("eval.nll.cdf", nll.get("cdf", "tanh"), CDFS),
            ),
            fid=FidSettings(
                num_samples=_int("eval.fid.num_samples", fid.get("num_samples", 50000), minimum=2),
                K=_ks("eval.fid.K", fid.get("K"), allow_none=True),
                method=_choices("eval.fid.method", fid.get("method"), tuple(ALL_METHODS), allow_none=True),
                batch_size=_int("eval.fid.batch_size", fid.get("batch_size", 500), minimum=1),
                feature_batch_size=_int("eval.fid.feature_batch_size", fid.get("feature_batch_size", 200),
                                        minimum=1),
                feature_precision=_choice("eval.fid.feature_precision", fid.get("feature_precision", "fp32"),
                                          PRECISIONS),
                channels_last=_bool("eval.fid.channels_last", fid.get("channels_last", False)),
                precision=None if fid.get("precision") is None else
                _choice("eval.fid.precision", fid.get("precision"), PRECISIONS),
                weights_path=_str("eval.fid.weights_path", fid.get("weights_path")),
                skip_if_missing_weights=_bool("eval.fid.skip_if_missing_weights",
                                              fid.get("skip_if_missing_weights", False)),
                reference_images=_int("eval.fid.reference_images", fid.get("reference_images"), minimum=2,
                                      allow_none=True),
                reference_cache=_str("eval.fid.reference_cache", fid.get("reference_cache")),
                reference_stats=_str("eval.fid.reference_stats", fid.get("reference_stats")),
                save_grid=_bool("eval.fid.save_grid", fid.get("save_grid", True)),
                clip_sigma_y={m: _float(f"eval.fid.clip_sigma_y.{m}", v, minimum=0.0, allow_none=True)
                              for m, v in clip_y.items()},
            ),
            head=HeadSettings(
                methods=_choice("eval.head.methods", head.get("methods", "auto"), HEAD_METHOD_CHOICES),
                avg_cov=_bool("eval.head.avg_cov", head.get("avg_cov", False)),
                cost_images=_int("eval.head.cost_images", head.get("cost_images", 64), minimum=1),
                cost_batch_size=_int("eval.head.cost_batch_size", head.get("cost_batch_size", 500), minimum=1),
            ),
            report_variance_K=_ks("eval.report.variance_K", rep.get("variance_K"), allow_none=True) or (),
        )

    @property
    def fid_precision(self) -> str:
        """The network's precision while sampling for FID: ``eval.fid.precision``, else ``eval.precision``."""
        return self.fid.precision or self.precision

    def __post_init__(self):
        if self.shard >= self.num_shards:
            raise SettingsError(f"eval.shard={self.shard} must be below eval.num_shards={self.num_shards} "
                                "(shards are numbered 0..num_shards-1)")
        if self.num_shards > 1 and "fid" in self.metrics and not (self.fid.reference_cache or
                                                                   self.fid.reference_stats):
            raise SettingsError("eval.num_shards > 1 with FID needs the reference statistics on disk for the merge: "
                                "set eval.fid.reference_cache=DIR (or eval.fid.reference_stats=FILE)")

    # ------------------------------------------------------------------ checks that need the model
    def check_against(self, N: int) -> None:
        """K <= N for every K of the grid and of the FID sub-grid (N = the model's number of steps)."""
        for key, ks in (("eval.K", self.K), ("eval.fid.K", self.fid.K or ())):
            bad = [k for k in ks if k > N]
            if bad:
                raise SettingsError(f"{key} values {bad} are outside 1..N = 1..{N} (the model's number of steps)")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
