"""What every training module of this package shares: the step loop around one loss, AdamW, the EMA, the per-step RNG,
the loss window with its divergence checks, ``torch.compile`` and the counters that make resuming exact.

:class:`StepTrainingModule` is the base of :class:`~analytic_dpm.training.DiffusionModule` (the noise predictor) and
:class:`~analytic_dpm.training.HeadModule` (a covariance head on a frozen noise predictor). A subclass says what it
trains (:meth:`~StepTrainingModule.trainable_parameters`), what the EMA follows (:meth:`~StepTrainingModule.ema_pairs`),
what is compiled (:meth:`~StepTrainingModule.compile_target`) and what one step's loss is
(:meth:`~StepTrainingModule.step_loss`); everything below is the same for both.

Randomness: every training step first reseeds torch's global RNG (CPU and every CUDA device) with
``mix_seed(seed, rank, batch number)``, then draws t, eps and dropout from it. A step's randomness is thus a pure
function of the run's seed and how many batches came before it, which (with the batch order of
:mod:`analytic_dpm.training.data`) makes resuming from a checkpoint exact and keeps anything that runs between steps
(calibrations, diagnostics, logging, checkpointing) from changing the training trajectory.

EMA: the EMA copy is updated after every optimizer step (``optimizer_step``), so a checkpoint written at any hook after
the step already holds the matching EMA.

No per-step host synchronisation: the step's loss is accumulated on the device together with a divergence record (the
first step whose loss is not finite or above the module's limit); both are read once per logging window
(``trainer.log_every_n_steps``; every 100 steps when logging is off), at epoch ends and before any checkpoint is
written. ``train/loss`` is the mean loss of the window, logged as a CPU number. A diverged run stops with
:class:`TrainingDivergedError` (what happened, at which step, what to try) and never writes a checkpoint from the
diverged network.

Optimizer: AdamW, its fused single-kernel implementation where ``fused_optimizer`` says so (``"auto"``: when training
on CUDA without a GradScaler, i.e. not under ``16-mixed``). Gradient clipping then runs here
(:meth:`~StepTrainingModule.configure_gradient_clipping`): Lightning's mixed-precision plugin refuses to clip for any
fused optimizer, but with no scaler (bf16-mixed, fp32) the gradients are the true ones.

Compilation (``compile``: True, False or ``"auto"`` = on when training on CUDA): the compile target is wrapped by
``torch.compile`` (state-dict keys unchanged). The first step runs the compiled forward and backward once on its own
batch, under a forked RNG, before the real step: if compilation fails the run warns and continues eagerly,
bit-identical to a run with ``compile=false``; its wall time is ``compile_seconds``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor, nn

from ..accel import CompileFallbackWarning, parse_flag
from ..data import to_model_space
from ..errors import UserError
from ..seeding import mix_seed

log = logging.getLogger(__name__)

__all__ = ["CHECK_EVERY_WITHOUT_LOGGING", "StepTrainingModule", "TrainingDivergedError"]

#: steps between divergence checks when logging is off (trainer.log_every_n_steps=0)
CHECK_EVERY_WITHOUT_LOGGING = 100


class TrainingDivergedError(UserError, RuntimeError):
    """The training loss became non-finite or exploded; the message says at which step and what to try."""


def _warmup_factor(warmup_steps: int):
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps)

    return factor


class StepTrainingModule(LightningModule):
    """The training loop shared by this package's modules (module docstring); subclasses define what is trained.

    Args (keyword only; the subclass's own config section names them, e.g. ``module.lr`` or ``head.lr``):
        lr, weight_decay, betas, eps: AdamW. ``warmup_steps`` > 0 adds a linear warm-up of the learning rate.
        ema_decay, ema_warmup: the EMA's decay; ``ema_warmup`` uses ``min(ema_decay, (1 + n) / (10 + n))`` at the
            n-th update.
        compile, compile_mode: ``torch.compile`` the compile target (True, False, or ``"auto"``: on CUDA).
        channels_last: keep the training networks and their inputs in channels-last memory format.
        fused_optimizer: AdamW's fused implementation (True, False, or ``"auto"``: on CUDA without a GradScaler).
        attention_float32: kept for the subclass (the UNet's attention precision under bf16; a run-time choice).
        max_loss: a step loss above the subclass's limit (:meth:`loss_limit`, by default ``max_loss``) or not finite
            is divergence and stops the run (None: only a non-finite loss).
        seed: the run's seed; the per-step randomness derives from it.
    """

    #: the config section of this module's settings, named in messages (``module.lr=...``)
    settings_section = "module"
    #: what a diverged run never writes, said in its error message
    nothing_written = "no checkpoint or Gamma was written from this network"

    def __init__(
        self,
        *,
        lr: float,
        weight_decay: float,
        betas: Sequence[float],
        eps: float,
        warmup_steps: int,
        ema_decay: float,
        ema_warmup: bool,
        compile: bool | str,
        compile_mode: str | None,
        channels_last: bool,
        fused_optimizer: bool | str,
        attention_float32: bool,
        max_loss: float | None,
        seed: int,
    ):
        super().__init__()
        section = self.settings_section
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if float(lr) <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.adam_betas, self.adam_eps = tuple(float(b) for b in betas), float(eps)
        self.warmup_steps = int(warmup_steps)
        self.ema_decay, self.ema_warmup = float(ema_decay), bool(ema_warmup)
        self.compile_model = parse_flag(compile, f"{section}.compile")
        self.compile_mode = None if compile_mode in (None, "default") else str(compile_mode)
        self.channels_last = bool(channels_last)
        self.fused_optimizer = parse_flag(fused_optimizer, f"{section}.fused_optimizer")
        self.attention_float32 = bool(attention_float32)
        if max_loss is not None and not float(max_loss) > 0:
            raise ValueError(f"max_loss must be positive or null, got {max_loss}")
        self.max_loss = None if max_loss is None else float(max_loss)
        self.seed = int(seed)

        # training state saved in checkpoints (plain python numbers; training_state / restore_training_state)
        self.batches_trained = 0  # training_step calls so far = the number of the next batch
        self.images_trained = 0  # examples seen by this process
        self.ema_updates = 0
        self._prepared = False
        # torch.compile of the compile target, kept out of the module tree (state-dict keys unchanged)
        object.__setattr__(self, "_compiled_forward", None)
        self._compile_probe_pending = False
        self.compile_seconds: float | None = None  # wall time of the first (compiling) step
        # device-side window statistics: [loss sum, steps, first bad step (-1: none), loss at that step,
        # first bad-data step]
        self._window: Tensor | None = None

    def optimizer_settings(self) -> dict[str, Any]:
        """The settings of this base as plain values (the subclass records them in its config section)."""
        return {
            "lr": self.lr, "weight_decay": self.weight_decay, "betas": list(self.adam_betas), "eps": self.adam_eps,
            "warmup_steps": self.warmup_steps, "ema_decay": self.ema_decay, "ema_warmup": self.ema_warmup,
            "compile": self.compile_model, "compile_mode": self.compile_mode, "channels_last": self.channels_last,
            "attention_float32": self.attention_float32, "fused_optimizer": self.fused_optimizer,
            "max_loss": self.max_loss,
        }  # fmt: skip

    # ------------------------------------------------------------------ what a subclass defines
    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """The parameters the optimizer updates (and gradient clipping sees)."""
        raise NotImplementedError

    def ema_pairs(self) -> tuple[nn.Module, nn.Module]:
        """``(ema copy, trained module)``: the EMA follows the second."""
        raise NotImplementedError

    def compile_target(self) -> nn.Module:
        """The network ``torch.compile`` wraps; :meth:`step_loss` calls it as ``forward``."""
        raise NotImplementedError

    def channels_last_modules(self) -> list[nn.Module]:
        """The networks put in channels-last memory format when ``channels_last`` is on."""
        return []

    def step_loss(self, x0: Tensor, forward=None) -> Tensor:
        """The loss of one training step on the clean batch ``x0`` (model space), drawing from the global RNG."""
        raise NotImplementedError

    def loss_limit(self) -> float | None:
        """A step loss above this is divergence (None: only a non-finite one)."""
        return self.max_loss

    def limit_description(self) -> str:
        """How the limit is named in the divergence message."""
        return f"{self.settings_section}.max_loss={self.max_loss:g}"

    # ------------------------------------------------------------------ setup
    def compile_enabled(self) -> bool:
        """Whether this run compiles the training network (``"auto"``: when it trains on CUDA)."""
        if self.compile_model == "auto":
            return self.device.type == "cuda"
        return bool(self.compile_model)

    def on_fit_start(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        if self.channels_last:
            for net in self.channels_last_modules():
                net.to(memory_format=torch.channels_last)
        if self.compile_enabled():
            kwargs: dict[str, Any] = {"dynamic": False}
            if self.compile_mode is not None:
                kwargs["mode"] = self.compile_mode
            try:
                object.__setattr__(self, "_compiled_forward", torch.compile(self.compile_target(), **kwargs))
                self._compile_probe_pending = True
            except Exception as e:  # noqa: BLE001 - e.g. a Python without Dynamo support
                self._compile_failed(e)

    def _compile_failed(self, e: BaseException) -> None:
        object.__setattr__(self, "_compiled_forward", None)
        text = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__
        warnings.warn(f"torch.compile of the training network failed ({reason}); training continues eagerly "
                      f"(same numbers, slower). Set {self.settings_section}.compile=false to skip the attempt.",
                      CompileFallbackWarning, stacklevel=2)

    def _probe_compile(self, x0: Tensor) -> None:
        """First step: run the compiled forward + backward once on this batch (RNG forked); fall back on failure."""
        self._compile_probe_pending = False
        fn = self._compiled_forward
        if fn is None:
            return
        start = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[x0.device] if x0.is_cuda else []):
                loss = self.step_loss(x0, forward=fn)
                params = [p for p in self.trainable_parameters() if p.requires_grad]
                torch.autograd.grad(loss, params, allow_unused=True)
            if x0.is_cuda:
                torch.cuda.synchronize(x0.device)
        except Exception as e:  # noqa: BLE001 - any compile/runtime failure of the compiled graph
            self._compile_failed(e)
            return
        self.compile_seconds = time.perf_counter() - start
        log.info("torch.compile: the first training step (compilation) took %.1f s", self.compile_seconds)

    def _grad_scaler(self):
        trainer = self._trainer
        plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
        return getattr(plugin, "scaler", None)

    def fused_optimizer_enabled(self) -> bool:
        """Whether AdamW runs fused (``"auto"``: on CUDA when no GradScaler runs)."""
        if self.fused_optimizer == "auto":
            return self.device.type == "cuda" and self._grad_scaler() is None
        return bool(self.fused_optimizer)

    def configure_optimizers(self):
        fused = self.fused_optimizer_enabled()
        if fused and self._grad_scaler() is not None:
            trainer = self._trainer
            if trainer is not None and trainer.gradient_clip_val:
                s = self.settings_section
                raise ValueError(
                    f"{s}.fused_optimizer=true cannot be combined with trainer.precision={trainer.precision} "
                    "(a GradScaler) and gradient clipping (trainer.gradient_clip_val): the fused AdamW unscales "
                    f"inside its step, after clipping would have run. Use {s}.fused_optimizer=auto, "
                    "trainer.precision=bf16-mixed, or trainer.gradient_clip_val=null"
                )
        opt = torch.optim.AdamW(
            self.trainable_parameters(), lr=self.lr, betas=self.adam_betas, eps=self.adam_eps,
            weight_decay=self.weight_decay, fused=True if fused else None,
        )  # fmt: skip
        if self.warmup_steps <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_factor(self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except for a fused optimizer without a GradScaler, which Lightning's mixed-precision
        plugin refuses although nothing is scaled: the gradients are clipped here with torch's own functions."""
        fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        if not fused or not gradient_clip_val or self._grad_scaler() is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        algorithm = getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)  # Lightning: a str enum
        if str(algorithm or "norm").lower() == "value":
            torch.nn.utils.clip_grad_value_(params, float(gradient_clip_val))
        else:  # the same call as Lightning's clip_gradients (global 2-norm, no host sync)
            torch.nn.utils.clip_grad_norm_(params, float(gradient_clip_val))
        return None

    # ------------------------------------------------------------------ training
    def step_seed(self) -> int:
        """The seed of the current training step (depends on seed, rank and the batch number only)."""
        return mix_seed(self.seed, "train-step", self.global_rank, self.batches_trained)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        if isinstance(batch, (list, tuple)):  # tolerate (x, label) batches
            batch = batch[0]
        torch.manual_seed(self.step_seed())  # host-side (CPU and CUDA generator seeds): no device sync
        x0 = to_model_space(batch)
        if self._compile_probe_pending:
            self._probe_compile(x0)
        loss = self.step_loss(x0)
        self.batches_trained += 1
        self.images_trained += int(x0.shape[0])
        self._observe_loss(loss, self.batches_trained, data_finite=torch.isfinite(x0).all())
        return loss

    # ------------------------------------------------------------------ loss window and divergence
    def _observe_loss(self, loss: Tensor, step: int, data_finite: Tensor | None = None) -> None:
        """Add the step's loss to the window and remember the first diverged step, and the first step whose batch
        held NaN/inf data (``data_finite`` False: the data, not the network, is then the cause), on the device."""
        value = loss.detach().float()
        w = self._window
        if w is None:  # built by kernels, not copied from the host (a pageable copy would synchronise)
            w = torch.zeros(5, device=value.device)
            w[2] = -1.0
            w[4] = -1.0
        bad = ~torch.isfinite(value)
        limit = self.loss_limit()
        if limit is not None:
            bad = bad | (value > limit)
        first = bad & (w[2] < 0)
        bad_data = (~data_finite.to(value.device)) if data_finite is not None else torch.zeros((), dtype=torch.bool,
                                                                                              device=value.device)
        first_data = bad_data & (w[4] < 0)
        self._window = torch.stack([w[0] + value, w[1] + 1.0, torch.where(first, float(step), w[2]),
                                    torch.where(first, value, w[3]), torch.where(first_data, float(step), w[4])])

    def _read_window(self, reset: bool = True) -> tuple[float, int] | None:
        """One host sync: (mean loss, steps) of the window, after raising if the run diverged."""
        w = self._window
        if w is None:
            return None
        total, count, bad_step, bad_loss, bad_data_step = w.tolist()
        if reset:
            self._window = None
        trainer = self._trainer
        if bad_data_step >= 0:
            raise TrainingDivergedError(
                f"the training data hold NaN or inf values (first in the batch of step {int(bad_data_step)}): the "
                "network is not the cause; check the dataset (data=... and its files or parameters). "
                f"{self.nothing_written[0].upper()}{self.nothing_written[1:]}.")
        diverged = bad_step >= 0
        if trainer is not None and getattr(trainer, "world_size", 1) > 1:
            any_rank = bool(trainer.strategy.reduce_boolean_decision(diverged, all=False))
            if any_rank and not diverged:
                raise TrainingDivergedError(self._divergence_message(None, None))
        if diverged:
            raise TrainingDivergedError(self._divergence_message(int(bad_step), bad_loss))
        return (total / count if count else float("nan")), int(count)

    def _divergence_message(self, step: int | None, loss: float | None) -> str:
        trainer = self._trainer
        s = self.settings_section
        if step is None:
            what = "the training loss diverged on another process (rank)"
        else:
            kind = "is not finite" if loss is None or loss != loss or abs(loss) == float("inf") else (
                f"exceeds {self.limit_description()}")
            what = f"training diverged at step {step}: the loss was {loss:.4g}, which {kind}"
        clip = getattr(trainer, "gradient_clip_val", None) if trainer is not None else None
        precision = str(getattr(trainer, "precision", "")) if trainer is not None else ""
        tips = [f"a lower learning rate ({s}.lr={self.lr:g})",
                "gradient clipping (trainer.gradient_clip_val=1.0)" if not clip else
                f"stronger gradient clipping (trainer.gradient_clip_val, now {clip:g})"]
        if "16" in precision:
            tips.append(f"fp32 instead of {precision} (trainer.precision=32-true)")
        else:
            tips.append(f"learning-rate warm-up ({s}.warmup_steps)")
        return (f"{what}; {self.nothing_written}. Try {', '.join(tips[:-1])} or "
                f"{tips[-1]}, and resume from the last good checkpoint with ckpt_path=... or start over.")

    def check_divergence(self) -> None:
        """Raise :class:`TrainingDivergedError` if any step since the last check diverged (one host sync)."""
        self._read_window(reset=False)

    def _is_log_step(self) -> bool:
        trainer = self._trainer
        if trainer is None:
            return False
        every = int(getattr(trainer, "log_every_n_steps", 0) or 0)
        if every <= 0:
            return self.batches_trained % CHECK_EVERY_WITHOUT_LOGGING == 0
        flag = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", None)
        return flag if isinstance(flag, bool) else self.batches_trained % every == 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._is_log_step():
            return
        window = self._read_window()
        if window is not None and window[1] > 0:
            mean, count = window
            # a CPU tensor: the progress bar and loggers read it without touching the device
            self.log("train/loss", torch.tensor(mean), prog_bar=True, on_step=True, on_epoch=False,
                     batch_size=count)

    def on_train_epoch_end(self) -> None:
        self.check_divergence()

    # ------------------------------------------------------------------ EMA
    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def current_ema_decay(self) -> float:
        if self.ema_warmup:
            return min(self.ema_decay, (1.0 + self.ema_updates) / (10.0 + self.ema_updates))
        return self.ema_decay

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * weights (buffers are copied)."""
        w = 1.0 - self.current_ema_decay()
        ema, source = self.ema_pairs()
        ema_p = list(ema.parameters())
        cur_p = [p.detach() for p in source.parameters()]
        try:
            torch._foreach_lerp_(ema_p, cur_p, w)
        except (AttributeError, RuntimeError):  # pragma: no cover - old torch / odd layouts
            for e, p in zip(ema_p, cur_p):
                e.lerp_(p, w)
        for e, b in zip(ema.buffers(), source.buffers()):
            e.copy_(b)
        self.ema_updates += 1

    # ------------------------------------------------------------------ counters in checkpoints
    def training_state(self) -> dict[str, Any]:
        """The counters that make a resume exact (written into the subclass's checkpoint entry)."""
        return {"seed": self.seed, "batches_trained": self.batches_trained, "images_trained": self.images_trained,
                "ema_updates": self.ema_updates, "ema_decay": self.ema_decay}

    def restore_training_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`training_state` (a run resumed under another seed is said, not refused)."""
        if state.get("seed") is not None and int(state["seed"]) != self.seed:
            log.warning("resuming a run trained with seed %s under seed %s: the data order and noise of the "
                        "remaining steps follow the new seed", state["seed"], self.seed)
        self.batches_trained = int(state.get("batches_trained", 0))
        self.images_trained = int(state.get("images_trained", 0))
        self.ema_updates = int(state.get("ema_updates", 0))
