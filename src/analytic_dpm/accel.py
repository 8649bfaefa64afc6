"""Speed options of the evaluation path: numeric precision and ``torch.compile`` with static shapes (issue 9).

Every core function (:func:`~analytic_dpm.sample`, :func:`~analytic_dpm.nll_bpd`,
:func:`~analytic_dpm.estimate_gamma`) takes a noise predictor ``eps_model(x_t, t)``. :func:`prepare_eps_model`
wraps any such predictor (this package's UNet, a pretrained adapter, a parameter-free oracle) in a
:class:`PreparedEpsModel` with the same ``(x_t, t) -> eps`` signature, so the core functions run it unchanged. A head
model ``(x_t, t) -> (eps_hat, head)`` (spec section 11) is wrapped the same way: both outputs get the precision, the
float32 cast, the static-batch padding and slicing, and the wrapper reports the model's ``head_kind``.

* ``precision``: ``"fp32"`` (TF32 explicitly off: full float32 matmuls and convolutions), ``"tf32"`` (TF32
  matmuls and cuDNN convolutions on CUDA; no effect on a CPU) or ``"bf16"`` (``torch.autocast`` to bfloat16
  around the network call; valid, if slow, on a CPU). The TF32 switches are set for the duration of each call
  and restored afterwards, so the rest of the process (FID features, training) never sees them. The output is
  always float32.
* ``compile``: ``torch.compile`` of the network call (``"auto"``: on for CUDA, off on a CPU), ``mode`` as in
  ``torch.compile`` (``"reduce-overhead"`` = CUDA graphs). Shapes are static: every batch is padded to a fixed
  batch size (``static_batch``, or the largest batch seen so far) by repeating its last row, and the output is
  sliced back, so a last partial batch neither recompiles nor leaves CUDA graphs; a batch larger than a given
  ``static_batch`` is split into chunks of that size. The padded rows are computed and thrown away: the network
  must treat the rows of a batch independently (eval mode: no batch statistics), which every noise predictor
  here does.
* On a CPU, an eager call of more than :data:`CPU_CHUNK` rows runs in chunks of that many: a small UNet's activations
  then stay in the cache, and the quickstart UNet runs about twice as fast per image (same numbers: the rows of a batch
  are independent, as above). So a large ``eval.nll.network_batch`` (part of ``nll_id``) costs nothing on a CPU.
* A network that cannot be compiled (no C++ compiler on a CPU, an old driver, Python without Dynamo, an
  exception at the first call) runs eagerly instead, with a :class:`CompileFallbackWarning`, never an error.
  The seconds of each compiling call (the first call at each static batch size) are kept in
  ``compile_seconds`` / ``compile_events``, so benchmarks and logs can keep them out of steady-state figures.

Nothing here changes the model (mode, device, weights): put it in eval mode and on its device first.
"""

from __future__ import annotations

import contextlib
import logging
import time
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = [
    "COMPILE_MODES",
    "CPU_CHUNK",
    "PRECISIONS",
    "AccelSettings",
    "CompileFallbackWarning",
    "parse_flag",
    "PreparedEpsModel",
    "precision_scope",
    "prepare_eps_model",
    "resolve_settings",
    "tf32_scope",
]

#: numeric precisions of the network call
PRECISIONS = ("fp32", "tf32", "bf16")
#: ``torch.compile`` modes (None = torch's default mode)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
#: rows per eager network call on a CPU (larger calls are split). On 2 cores the quickstart UNet (1x28x28) runs at
#: ~360 images/s at 64-128 rows and ~250 at 500-1000, the NPR head model at ~390 against ~210: beyond a few MB of
#: activations a CPU is memory-bound. NLL at K = 100 on 64 images: 35 s at 1000 rows, 18 s at 128, equal bits.
CPU_CHUNK = 128


class CompileFallbackWarning(RuntimeWarning):
    """``torch.compile`` was asked for but cannot be used here; the network runs eagerly (same numbers, slower)."""


# --------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class AccelSettings:
    """The speed options of one prepared noise predictor (plain values: safe to write into result rows).

    ``compile`` is the resolved request (``"auto"`` already decided for ``device_type``); whether compilation
    actually happened is :attr:`PreparedEpsModel.compiled`.
    """

    precision: str = "fp32"
    compile: bool = False
    mode: str | None = None
    static_batch: int | None = None
    device_type: str = "cpu"
    backend: str = "inductor"

    @property
    def compile_label(self) -> str:
        """``"off"``, ``"default"`` or the compile mode (``"reduce-overhead"``, ...)."""
        return (self.mode or "default") if self.compile else "off"

    def identity(self) -> dict[str, str]:
        """The part of a result's identity that these options add: ``{"precision": ..., "compile": ...}``."""
        return {"precision": self.precision, "compile": self.compile_label}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_flag(value: Any, name: str = "compile") -> bool | str:
    """An on/off/auto switch (``compile``, ``fused_optimizer``, ...): True, False or ``"auto"``; accepts booleans and
    auto / true / on / yes / 1 / false / off / no / 0 / none (any case). ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("auto", ""):
        return "auto"
    if text in ("true", "on", "yes", "1"):
        return True
    if text in ("false", "off", "no", "0", "none"):
        return False
    raise ValueError(f"{name}={value!r}: use auto, true or false")


def resolve_settings(
    *,
    precision: str = "fp32",
    compile: bool | str = "auto",
    device: torch.device | str = "cpu",
    static_batch: int | None = None,
    mode: str | None = None,
    backend: str | Callable = "inductor",
) -> AccelSettings:
    """Validate the options, decide ``compile="auto"`` (on for CUDA only); see :func:`prepare_eps_model`."""
    precision = str(precision).strip().lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    if precision == "bf16" and device_type not in ("cuda", "cpu"):
        raise ValueError(f"precision=bf16 is supported on cuda and cpu, not {device_type}; use precision=fp32")
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: choose one of {', '.join(str(m) for m in COMPILE_MODES)}")
    if mode == "default":
        mode = None
    if static_batch is not None:
        if isinstance(static_batch, bool) or int(static_batch) != static_batch or int(static_batch) < 1:
            raise ValueError(f"static_batch must be a positive integer or None, got {static_batch!r}")
        static_batch = int(static_batch)
    want = parse_flag(compile)
    do_compile = device_type == "cuda" if want == "auto" else bool(want)
    if do_compile and mode in _CUDAGRAPH_MODES and device_type != "cuda":
        warnings.warn(f"compile mode {mode!r} uses CUDA graphs, which need a CUDA device; using the default mode "
                      f"on {device_type}", CompileFallbackWarning, stacklevel=3)
        mode = None
    backend_name = backend if isinstance(backend, str) else getattr(backend, "__name__", type(backend).__name__)
    return AccelSettings(precision, do_compile, mode if do_compile else None, static_batch, device_type,
                         str(backend_name))


# --------------------------------------------------------------------------------------------- precision
def _read_tf32() -> tuple:
    """The current TF32 switches, through whichever torch API can read them without error."""
    try:  # the classic API (what Lightning and train.py's float32_matmul_precision use)
        return ("classic", torch.get_float32_matmul_precision(), bool(torch.backends.cudnn.allow_tf32))
    except RuntimeError:  # torch refuses classic reads once the new fp32_precision API was used
        return ("new", torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)


def _write_tf32(api: str, enabled: bool) -> None:
    if api == "classic":
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        torch.backends.cudnn.allow_tf32 = enabled
    else:
        value = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = value
        torch.backends.cudnn.conv.fp32_precision = value


def _restore_tf32(state: tuple) -> None:
    api, matmul, conv = state
    if api == "classic":
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = conv
    else:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv


@contextlib.contextmanager
def tf32_scope(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions on (``enabled``) or off inside the block, restored afterwards."""
    state = _read_tf32()
    _write_tf32(state[0], bool(enabled))
    try:
        yield
    finally:
        _restore_tf32(state)


@contextlib.contextmanager
def precision_scope(precision: str, device_type: str = "cuda") -> Iterator[None]:
    """Run a block at ``precision``: fp32 (TF32 off), tf32 (TF32 on), bf16 (autocast to bfloat16, TF32 off).

    An outer autocast (e.g. Lightning's bf16-mixed) is overridden: fp32 / tf32 disable it inside the block.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    with tf32_scope(precision == "tf32"), _autocast(precision, device_type):
        yield


def _autocast(precision: str, device_type: str):
    if device_type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


ModelOutput = Tensor | tuple[Tensor, ...]


def _map_output(fn: Callable[[Tensor], Tensor], out: ModelOutput) -> ModelOutput:
    """``fn`` applied to a model output: one tensor (a noise predictor) or a tuple (a head model's (eps_hat, head))."""
    if isinstance(out, Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return tuple(fn(o) for o in out)
    raise TypeError(f"a model must return a tensor or a tuple (eps_hat, head) of tensors, got {type(out).__name__}")


def _cat_outputs(outs: list[ModelOutput]) -> ModelOutput:
    if isinstance(outs[0], Tensor):
        return torch.cat(outs)
    return tuple(torch.cat(parts) for parts in zip(*outs))


def _network_call(eps_model: Callable, precision: str, device_type: str) -> Callable[[Tensor, Tensor], ModelOutput]:
    """``(x, t) -> float32 eps`` (or float32 ``(eps, head)``) with the autocast part of ``precision`` inside
    (traceable by torch.compile)."""
    bf16 = precision == "bf16"
    use_autocast = device_type in ("cuda", "cpu")

    def net_call(x: Tensor, t: Tensor) -> ModelOutput:
        if use_autocast:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                out = eps_model(x, t)
        else:
            out = eps_model(x, t)
        if isinstance(out, Tensor):
            return out.float()
        return tuple(o.float() for o in out)

    return net_call


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own: Dynamo keeps its compiled graphs (and its recompile limit) per code
    object, so every prepared model gets its own cache instead of sharing one with every other prepared model."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


# --------------------------------------------------------------------------------------------- the wrapper
def _short(e: BaseException) -> str:
    """``Type: first line`` of an exception, naming its root cause (Dynamo wraps the compiler's own error)."""
    root = e
    for _ in range(10):
        inner = root.__cause__ or getattr(root, "inner_exception", None)
        if not isinstance(inner, BaseException) or inner is root:
            break
        root = inner
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    msg = f"{type(root).__name__}: {lines[0][:300]}" if lines else type(root).__name__
    return msg if root is e else f"{type(e).__name__} from {msg}"


def _synchronize(device_type: str) -> None:
    if device_type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()


class PreparedEpsModel(nn.Module):
    """``eps_model(x_t, t)`` run at a chosen precision, compiled with static shapes where asked (see module doc).

    Attributes:
        eps_model: the wrapped predictor (a registered submodule when it is an ``nn.Module``, so ``.parameters()``,
            ``.eval()`` and ``.to()`` reach it and the core functions find its device).
        settings: the :class:`AccelSettings`.
        compiled: whether calls currently go through ``torch.compile`` (False after a fallback).
        compile_seconds: total wall seconds of the compiling calls (first call at each static batch size).
        compile_events: ``[(static batch size, seconds), ...]``.
        fallback_reason: why compilation was abandoned (None if it was not).
        static_batch: the batch size every compiled call is padded to (None until the first call in auto mode).
    """

    def __init__(self, eps_model: Callable, settings: AccelSettings, backend: str | Callable = "inductor"):
        super().__init__()
        self.eps_model = eps_model  # an nn.Module registers as a submodule; any other callable is a plain attribute
        self.settings = settings
        self._eager = _network_call(eps_model, settings.precision, settings.device_type)
        self._grow = settings.static_batch is None
        self.static_batch: int | None = settings.static_batch
        self._cudagraphs = settings.compile and settings.mode in _CUDAGRAPH_MODES and settings.device_type == "cuda"
        self._compiled_sizes: set[int] = set()
        self.compile_seconds = 0.0
        self.compile_events: list[tuple[int, float]] = []
        self.fallback_reason: str | None = None
        self._compiled_fn: Callable | None = None
        if settings.compile:
            try:
                kwargs: dict[str, Any] = {"backend": backend, "dynamic": False}
                if settings.mode is not None:
                    kwargs["mode"] = settings.mode
                self._compiled_fn = torch.compile(_own_code(self._eager), **kwargs)
            except Exception as e:  # noqa: BLE001 - e.g. Python without Dynamo support: run eagerly
                self._fall_back(e)

    @property
    def compiled(self) -> bool:
        return self._compiled_fn is not None

    @property
    def head_kind(self) -> str | None:
        """The wrapped model's ``head_kind`` (``"sn"`` / ``"npr"`` for a head model, None for a noise predictor)."""
        return getattr(self.eps_model, "head_kind", None)

    def record(self) -> dict[str, Any]:
        """Plain facts for a result row or a log: precision, compile (effective), mode, static batch, seconds."""
        return {
            "precision": self.settings.precision,
            "compile": self.settings.compile_label if self.compiled else "off",
            "compile_requested": self.settings.compile_label,
            "static_batch": self.static_batch,
            "compile_seconds": round(self.compile_seconds, 3),
            "compile_fallback": self.fallback_reason,
        }

    def _fall_back(self, e: BaseException) -> None:
        self._compiled_fn = None
        self.fallback_reason = _short(e)
        warnings.warn(
            f"torch.compile cannot be used here ({self.fallback_reason}); the network runs eagerly instead "
            "(same numbers, slower). Pass compile=false to skip the attempt.",
            CompileFallbackWarning,
            stacklevel=3,
        )

    def _eager_call(self, x: Tensor, t: Tensor) -> ModelOutput:
        n = x.shape[0]
        if self.settings.device_type == "cpu" and n > CPU_CHUNK:  # see CPU_CHUNK: same numbers, faster
            return _cat_outputs([self._eager_call(x[i:i + CPU_CHUNK], t[i:i + CPU_CHUNK])
                                 for i in range(0, n, CPU_CHUNK)])
        with tf32_scope(self.settings.precision == "tf32"):
            return self._eager(x, t)

    def forward(self, x: Tensor, t: Tensor | int) -> ModelOutput:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self._compiled_fn is None or x.shape[0] == 0:
            return self._eager_call(x, t)
        try:
            return self._static_call(x, t)
        except Exception as e:  # noqa: BLE001 - compilation (or a compiled call) failed
            out = self._eager_call(x, t)  # a bad input raises here, with the network's own message
            self._fall_back(e)  # only reached when the eager network works: compilation was the problem
            return out

    def _static_call(self, x: Tensor, t: Tensor) -> ModelOutput:
        n = x.shape[0]
        size = self.static_batch
        if size is None or (self._grow and n > size):
            size = n  # auto mode: the largest batch seen (one compile per new size), kept once the call works
        if n > size:  # a fixed static batch: run in chunks of exactly that size
            return _cat_outputs([self._static_call(x[i:i + size], t[i:i + size]) for i in range(0, n, size)])
        if n < size:  # pad with copies of the last row (a valid input), slice the result back
            x = torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])
            t = torch.cat([t, t[-1:].expand(size - n)])
        x, t = x.contiguous(), t.contiguous()
        first = size not in self._compiled_sizes
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        start = time.perf_counter()
        with tf32_scope(self.settings.precision == "tf32"):
            out = self._compiled_fn(x, t)
        self.static_batch = size
        if first:
            _synchronize(self.settings.device_type)
            seconds = time.perf_counter() - start
            self._compiled_sizes.add(size)
            self.compile_seconds += seconds
            self.compile_events.append((size, seconds))
            log.info("torch.compile: the first call at batch %d (compilation, %s) took %.1f s", size,
                     self.settings.compile_label, seconds)
        out = _map_output(lambda o: o[:n], out)
        # CUDA graphs reuse their output buffer at the next replay: hand out a copy
        return _map_output(torch.clone, out) if self._cudagraphs else out


def prepare_eps_model(
    eps_model: Callable,
    *,
    precision: str = "fp32",
    compile: bool | str = "auto",
    device: torch.device | str | None = None,
    static_batch: int | None = None,
    mode: str | None = None,
    backend: str | Callable = "inductor",
) -> PreparedEpsModel:
    """Wrap a noise predictor for fast evaluation; the result is called exactly like ``eps_model(x_t, t)``.

    Args:
        eps_model: any ``(x_t, t) -> eps`` callable (module or not); an already prepared one is re-wrapped.
        precision: ``"fp32"`` | ``"tf32"`` | ``"bf16"`` (module doc).
        compile: ``"auto"`` (on for CUDA, off elsewhere), True or False.
        device: where the network runs (decides ``"auto"`` and the autocast device); default: the device of the
            model's first parameter, else the CPU (pass it for parameter-free predictors on a GPU).
        static_batch: the batch size compiled calls are padded to (None: the largest batch seen).
        mode: ``torch.compile`` mode, e.g. ``"reduce-overhead"`` (CUDA graphs; CUDA only).
        backend: ``torch.compile`` backend (tests pass a counting backend).
    """
    if isinstance(eps_model, PreparedEpsModel):
        eps_model = eps_model.eps_model
    if not callable(eps_model):
        raise TypeError(f"eps_model must be callable as eps_model(x_t, t), got {type(eps_model).__name__}")
    if device is None:
        from .gamma import model_device

        device = model_device(eps_model)
    settings = resolve_settings(precision=precision, compile=compile, device=device, static_batch=static_batch,
                                mode=mode, backend=backend)
    if settings.precision == "bf16" and settings.device_type == "cuda" and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            warnings.warn("this GPU has no native bf16: precision=bf16 will be slow; use tf32 or fp32",
                          RuntimeWarning, stacklevel=2)
    return PreparedEpsModel(eps_model, settings, backend=backend)

