"""Analytic-DPM inside diffusers: ``AnalyticDPMScheduler``, a drop-in scheduler for ``DDPMPipeline``.

    from diffusers import DDPMPipeline
    from analytic_dpm.diffusers import AnalyticDPMScheduler

    pipe = DDPMPipeline.from_pretrained("ddpm-cifar10-32")
    pipe.scheduler = AnalyticDPMScheduler.from_config(pipe.scheduler.config, gamma=gamma)
    images = pipe(batch_size=16, num_inference_steps=25).images

Built from a schedule (betas, in diffusers' own config keys, so ``from_config`` of a DDPMScheduler / DDIMScheduler
config works; or ``from_schedule`` for one of our NoiseSchedules) and the calibrated Gamma vector (float64 [N+1],
gamma_0 = 0). Each ``step`` is the arithmetic of ``analytic_dpm.sample`` for one pair (s, t) = (tau_{k-1}, tau_k)
(spec sections 3, 4 and 7), so a pipeline run equals ``sample()`` with the same noise: the initial noise and then
one draw per step except the last, all from the pipeline's generator.

Conventions: diffusers' ``timesteps`` are our t - 1, in descending order (the UNet is fed t - 1);
``num_inference_steps`` is K. Which K timesteps (``set_timesteps``):

* ``trajectory=None`` (the constructor's default, hence what ``from_config`` of a diffusers config gives): diffusers'
  ``timestep_spacing`` (``leading``, diffusers' default; ``linspace``; ``trailing``) with ``steps_offset``, read
  from that config, so the same K samples the same timesteps as the scheduler it replaces
  (``analytic_dpm.pretrained.diffusers_format.spaced_trajectory``: diffusers' own expressions).
* ``trajectory="even" | "quadratic" | "optimal"`` (needs gamma; DDPM forward only) or an explicit list of our
  timesteps in 1..N: the paper's trajectories (spec section 6), chosen explicitly; ``from_schedule`` (our
  library's entry point) keeps ``even``, as ``analytic_dpm.sample`` users expect. An explicit trajectory wins over
  ``timestep_spacing``. A saved config records its trajectory, so it reloads as it was saved.

Refused (ValueError), not ignored: ``thresholding=True`` (dynamic thresholding is not the paper's clip of x0hat),
``set_alpha_to_one=False`` (the last step would stop at x_1 instead of x_0), ``prediction_type`` other than
``epsilon``, ``rescale_betas_zero_snr``. DDPMScheduler's ``variance_type`` is not an option here: ``method``
chooses the variance (``ddpm_beta_tilde`` is ``fixed_small``, ``ddpm_beta`` is ``fixed_large``); a
``variance_type`` the config sets stays in the config (it tells the learned-variance layout), unused. Options
that only other compatible schedulers have (solver order, Karras sigmas, ...) are dropped by ``from_config``, as
between any two diffusers schedulers.

Where diffusers itself differs (kept on purpose, tested):

* Every step goes from a timestep to the next one in ``timesteps`` (the pair (s, t)), as DDPMScheduler does.
  DDIMScheduler steps to t - N // K instead, which is the next timestep only for ``leading`` (steps_offset <
  N // K) and ``trailing`` with K dividing N (diffusers issues #11347, #12633); elsewhere (``linspace`` with K < N)
  ``method="ddim"`` evaluates the net at DDIMScheduler's timesteps but does not reproduce its jumps.
* No noise at the last step (s = 0), as in the paper. DDPMScheduler adds noise whenever that step's timestep is
  > 0 (``trailing``, ``steps_offset``): variance 1e-20 for ``fixed_small`` (below float32 resolution), but
  beta_{t|0} = 1 - alphas_cumprod[t] for ``fixed_large``, so ``ddpm_beta`` differs from it at that last step.

``step`` takes the keyword arguments diffusers' pipelines pass (``eta``, ``use_clipped_model_output``,
``generator``, ``variance_noise``, ``return_dict``); see its docstring. ``_compatibles`` lists diffusers'
discrete-time schedulers, and importing this module registers ``AnalyticDPMScheduler`` under ``diffusers`` and in
their ``_compatibles``, so ``pipe.scheduler.compatibles`` offers it and ``from_config`` in either direction drops
the other's keys quietly. diffusers is an optional extra: importing this module without it raises an ImportError
that says ``pip install "analytic-dpm[diffusers]"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .methods import check_method, head_kind, needs_gamma
from .pretrained.base import PretrainedError
from .pretrained.diffusers_format import (
    CONTINUOUS_SCHEDULERS,
    DIFFUSERS_MISSING,
    TIMESTEP_SPACINGS,
    betas_from_config,
    check_scheduler_config,
    spaced_trajectory,
)
from .sampler import predict_x0, reverse_mean
from .schedule import NoiseSchedule
from .trajectory import GAMMA_POLICIES, TRAJECTORY_KINDS, make_trajectory
from .validation import check_gamma, validate_trajectory
from .variance import forward_variance, reverse_variance, trajectory_pairs

try:
    import diffusers
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
    from diffusers.utils import BaseOutput, DummyObject
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - exercised by a test that hides diffusers
    raise ImportError(DIFFUSERS_MISSING) from e

__all__ = ["AnalyticDPMScheduler", "AnalyticDPMSchedulerOutput"]


@dataclass
class AnalyticDPMSchedulerOutput(BaseOutput):
    """``prev_sample``: x_s, the next sample; ``pred_original_sample``: x0hat (clamped when ``clip_sample``)."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


class AnalyticDPMScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that samples with ``method`` on the trajectory ``trajectory`` (module docstring).

    Args (all saved by ``save_pretrained``; schedule keys as in diffusers' DDPMScheduler):
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the model's betas, rebuilt in
            float64 (``analytic_dpm.pretrained.diffusers_format.betas_from_config``); ``trained_betas`` wins.
        gamma: the calibrated Gamma, N + 1 floats (gamma_0 = 0); needed by analytic_ddpm / analytic_ddim and by
            the optimal trajectory.
        method: ``analytic_ddpm``, ``analytic_ddim``, ``ddpm_beta``, ``ddpm_beta_tilde`` or ``ddim``.
        trajectory: None (default): diffusers' ``timestep_spacing`` / ``steps_offset``, so ``from_config`` of a
            diffusers config samples the timesteps that config's scheduler samples at the same K; or ``even``,
            ``quadratic``, ``optimal`` or a list of K timesteps in 1..N (our convention), which wins.
        eta: the DDIM forward process's eta (ddim / analytic_ddim).
        clip_sample: clamp x0hat to [-clip_sample_range, clip_sample_range] (spec section 3); that range is also
            the data range [a, b] of the Theorem 2 clip of U_t.
        clip_sigma_y: the paper's App. F.2 clip of the pair (tau_1, tau_2) in pixel levels (None: off).
        gamma_policy: how the optimal trajectory treats gamma_t > 1 (``monotone`` or ``authors``).
        prediction_type, rescale_betas_zero_snr: only ``epsilon`` / False are accepted (so that ``from_config`` of
            a v-prediction or zero-SNR config is refused instead of silently ignored).
        timestep_spacing, steps_offset: diffusers' (``leading`` / ``linspace`` / ``trailing``; the offset applies
            to ``leading``), used when ``trajectory`` is None.
        thresholding, set_alpha_to_one: only False / True are accepted (module docstring).
    """

    order = 1
    # diffusers' discrete-time schedulers (those that drive the same epsilon UNets); EDM's sigma scheduler is not
    _compatibles = [e.name for e in KarrasDiffusionSchedulers if e.name not in CONTINUOUS_SCHEDULERS]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        gamma: list[float] | None = None,
        method: str = "analytic_ddpm",
        trajectory: str | list[int] | None = None,
        eta: float = 0.0,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        clip_sigma_y: float | None = None,
        gamma_policy: str = "monotone",
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        thresholding: bool = False,
        set_alpha_to_one: bool = True,
    ):
        try:
            check_scheduler_config(
                {"prediction_type": prediction_type, "rescale_betas_zero_snr": rescale_betas_zero_snr,
                 "beta_schedule": beta_schedule},
                where="AnalyticDPMScheduler",
            )
            betas = betas_from_config(
                {"num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
                 "beta_schedule": beta_schedule, "trained_betas": trained_betas}
            )
        except PretrainedError as e:
            raise ValueError(str(e)) from e
        _check_diffusers_options(timestep_spacing, steps_offset, thresholding, set_alpha_to_one)
        name = "trained_betas" if trained_betas is not None else beta_schedule
        self.schedule = NoiseSchedule.from_betas(betas, name=f"diffusers:{name}")
        self.forward_process = check_method(method)
        if head_kind(method) is not None:
            raise ValueError(
                f"method {method!r} needs a network with a covariance head (spec section 11), and a diffusers "
                "pipeline's UNet2DModel has none; sample a head model with analytic_dpm.sample (or evaluate.py), "
                "or choose analytic_ddpm / analytic_ddim here"
            )
        if gamma_policy not in GAMMA_POLICIES:
            raise ValueError(f"unknown gamma_policy {gamma_policy!r}; choose one of {', '.join(GAMMA_POLICIES)}")
        if not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}")
        needed = needs_gamma(method) or (isinstance(trajectory, str) and trajectory == "optimal")
        what = f"method {method!r}" if needs_gamma(method) else "the optimal trajectory"
        self.gamma = check_gamma(None if gamma is None else torch.as_tensor(gamma, dtype=torch.float64).cpu(),
                                 self.schedule.N, required=needed, what=what)
        if trajectory is None:
            pass  # diffusers' timestep_spacing, checked above
        elif not isinstance(trajectory, str):
            validate_trajectory(trajectory, self.schedule.N)
        elif trajectory not in TRAJECTORY_KINDS:
            hint = f" (for diffusers' spacing pass timestep_spacing={trajectory!r})" if (
                trajectory in TIMESTEP_SPACINGS) else ""
            raise ValueError(
                f"unknown trajectory {trajectory!r}{hint}; choose one of {', '.join(TRAJECTORY_KINDS)}, a list of "
                "timesteps in 1..N, or None (diffusers' timestep_spacing)"
            )
        elif trajectory == "optimal" and self.forward_process != "ddpm":
            raise ValueError(
                f"the optimal trajectory is defined for the DDPM forward process only (lambda = 0 makes its cost "
                f"infinite for DDIM); use trajectory='even' or 'quadratic' with method {method!r}"
            )
        # the config holds plain JSON (tensors / arrays passed in become float64 lists), so save_pretrained works
        explicit = trajectory is not None and not isinstance(trajectory, str)
        self.register_to_config(
            gamma=None if self.gamma is None else self.gamma.tolist(),
            trained_betas=None if trained_betas is None else betas.tolist(),
            trajectory=[int(t) for t in trajectory] if explicit else trajectory,
        )
        self.data_range = (-float(clip_sample_range), float(clip_sample_range))
        self.init_noise_sigma = 1.0  # x_{tau_K} ~ N(0, I)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(self.schedule.N - 1, -1, -1)  # until set_timesteps: every step, t - 1
        self._taus: list[int] | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_schedule(cls, schedule: NoiseSchedule, gamma: Tensor | None = None, *, method: str = "analytic_ddpm",
                      trajectory: str | list[int] | None = "even", **kwargs: Any) -> AnalyticDPMScheduler:
        """A scheduler for one of our NoiseSchedules (stored exactly as float64 ``trained_betas``) and Gamma.

        ``trajectory`` defaults to the paper's ``even`` (our library's convention, as ``analytic_dpm.sample``);
        pass None for diffusers' ``timestep_spacing`` (a keyword argument, ``leading`` unless given)."""
        gamma_list = None if gamma is None else torch.as_tensor(gamma, dtype=torch.float64).cpu().tolist()
        return cls(num_train_timesteps=schedule.N, trained_betas=schedule.betas[1:].cpu().tolist(), gamma=gamma_list,
                   method=method, trajectory=trajectory, **kwargs)

    # ------------------------------------------------------------------ diffusers' scheduler interface
    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: Tensor, timestep: int | None = None) -> Tensor:
        """Nothing to scale: the noise predictor takes x_t as it is."""
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      timesteps: list[int] | None = None) -> None:
        """Choose the K = ``num_inference_steps`` timesteps (module docstring) and their variances.

        ``timesteps`` (diffusers' convention, t - 1, descending) gives an explicit trajectory instead.
        """
        N = self.schedule.N
        cfg = self.config
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("pass num_inference_steps or timesteps, not both")
            taus = validate_trajectory(sorted(int(t) + 1 for t in timesteps), N)
        elif num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps (K) or timesteps")
        elif cfg.trajectory is None:
            taus = spaced_trajectory(cfg.timestep_spacing, N, int(num_inference_steps), cfg.steps_offset)
        else:
            taus = make_trajectory(cfg.trajectory, N, int(num_inference_steps), self.gamma, schedule=self.schedule,
                                   forward=self.forward_process, data_range=self.data_range,
                                   gamma_policy=cfg.gamma_policy)
        # the per-pair numbers of analytic_dpm.sample, computed once (float64 -> Python floats, as there)
        self._sigma2 = reverse_variance(self.schedule, taus, cfg.method, self.gamma, cfg.eta, self.data_range,
                                        cfg.clip_sigma_y).tolist()
        s_idx, t_idx = trajectory_pairs(taus)
        self._s = s_idx.tolist()
        self._beta_ts = self.schedule.beta_ts(s_idx, t_idx).tolist()
        self._lam2_ddim = forward_variance(self.schedule, s_idx, t_idx, "ddim", cfg.eta).tolist()
        self._abar = self.schedule.alphas_cumprod.tolist()
        self._bbar = self.schedule.bbar.tolist()
        self._k_of_t = {t: k for k, t in enumerate(taus, start=1)}
        self._taus = taus
        self.num_inference_steps = len(taus)
        self.timesteps = torch.tensor([t - 1 for t in reversed(taus)], dtype=torch.long, device=device)

    @property
    def trajectory(self) -> list[int] | None:
        """tau_1 < ... < tau_K in our convention (1..N), once ``set_timesteps`` ran."""
        return None if self._taus is None else list(self._taus)

    @property
    def variances(self) -> Tensor | None:
        """sigma^2_{tau_{k-1}|tau_k}, k = 1..K (float64), once ``set_timesteps`` ran."""
        return None if self._taus is None else torch.tensor(self._sigma2, dtype=torch.float64)

    def _pair_index(self, timestep) -> int:
        """k of the pair (tau_{k-1}, tau_k) whose tau_k - 1 is diffusers' ``timestep``."""
        t = int(timestep.item() if isinstance(timestep, Tensor) else timestep) + 1  # diffusers' t - 1 -> our t
        k = self._k_of_t.get(t)
        if k is None:
            raise ValueError(f"timestep {t - 1} is not on the trajectory set by set_timesteps ({self.timesteps})")
        return k

    def previous_timestep(self, timestep):
        """diffusers' timestep that ``step`` goes to from ``timestep``: the next one in ``timesteps``, -1 after the
        last (x_0), as DDPMScheduler; ``timestep - 1`` before ``set_timesteps``."""
        if self._taus is None:
            return timestep - 1
        return torch.tensor(self._s[self._pair_index(timestep) - 1] - 1, device=self.timesteps.device)

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None, return_dict: bool = True, *,
             eta: float | None = None, use_clipped_model_output: bool | None = None,
             variance_noise: Tensor | None = None) -> AnalyticDPMSchedulerOutput | tuple:
        """One reverse step x_t -> x_s for the pair (s, t) whose t - 1 is ``timestep`` (spec sections 3 and 7).

        ``model_output`` is epshat (its first C channels when the net also outputs a learned variance). The same
        arithmetic as the loop body of ``analytic_dpm.sampler.sample`` (``reverse_mean``; tests check bit
        equality). Keyword arguments, as diffusers' pipelines pass them:

        * ``generator``: a ``torch.Generator`` (or one per sample, a list) for the step's N(0, I) draw z, drawn for
          every step but the last (s = 0), exactly as ``analytic_dpm.sample`` draws it.
        * ``variance_noise``: that z given instead (shape of ``sample``), as DDIMScheduler's; unused at s = 0.
          Passing it together with a ``generator`` is an error.
        * ``eta``: None uses the configured ``eta``; a number must equal it, since ``set_timesteps`` computed the
          trajectory's variances for it (a different one raises and says how to configure it). DDIMPipeline
          passes its ``eta`` (default 0.0), which matches the default configuration.
        * ``use_clipped_model_output``: None / False is the spec's arithmetic (the DDIM mean uses the raw epshat).
          True is accepted where it changes nothing (the DDPM mean depends on x0hat only; ``clip_sample=False``)
          and refused for ``ddim`` / ``analytic_ddim`` with ``clip_sample``.
        * ``return_dict``: False returns the tuple (prev_sample, pred_original_sample).
        """
        if self._taus is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        k = self._pair_index(timestep)
        t = self._taus[k - 1]
        self._check_step_options(sample, generator, eta, use_clipped_model_output, variance_noise)
        C = sample.shape[1]
        if model_output.shape[1] == 2 * C:
            model_output = model_output[:, :C]  # learned-variance nets: the first C channels are epsilon
        x = sample.float()
        eps_hat = model_output.float()
        s, abar, bbar, beta_ts = self._s[k - 1], self._abar, self._bbar, self._beta_ts
        x0_hat = predict_x0(x, eps_hat, abar[t], bbar[t], self.data_range if self.config.clip_sample else None)
        if s == 0:
            x_prev = x0_hat  # both means are x0hat at s = 0 and no noise is added
        else:
            mu = reverse_mean(self.forward_process, x, x0_hat, eps_hat, abar[s], abar[t], bbar[s], bbar[t],
                              beta_ts[k - 1], self._lam2_ddim[k - 1])
            if variance_noise is None:
                z = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            else:
                z = variance_noise.to(device=x.device, dtype=torch.float32)
            x_prev = mu + self._sigma2[k - 1] ** 0.5 * z
        x_prev, x0_hat = x_prev.to(sample.dtype), x0_hat.to(sample.dtype)
        if not return_dict:
            return (x_prev, x0_hat)
        return AnalyticDPMSchedulerOutput(prev_sample=x_prev, pred_original_sample=x0_hat)

    def _check_step_options(self, sample: Tensor, generator, eta, use_clipped_model_output, variance_noise) -> None:
        """The keyword arguments of ``step``: accepted with diffusers' meaning, or a ValueError that says why not."""
        cfg = self.config
        gens = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in gens):
            raise TypeError(
                f"generator must be a torch.Generator, a list of them or None, got {type(generator).__name__}; "
                "pass eta, use_clipped_model_output and variance_noise as keywords (step(..., eta=0.0))"
            )
        if variance_noise is not None:
            if generator is not None:
                raise ValueError("pass generator or variance_noise to step(), not both (variance_noise is the draw)")
            if not isinstance(variance_noise, Tensor) or tuple(variance_noise.shape) != tuple(sample.shape):
                got = tuple(variance_noise.shape) if isinstance(variance_noise, Tensor) else type(variance_noise)
                raise ValueError(f"variance_noise must be a tensor of the sample's shape {tuple(sample.shape)}, "
                                 f"got {got}")
        if eta is not None and float(eta) != float(cfg.eta):
            if self.forward_process == "ddim":
                raise ValueError(
                    f"step(eta={eta}) but this scheduler samples {cfg.method!r} with eta={cfg.eta} (set_timesteps "
                    f"computed the variances for it); build it with eta={eta} (from_config(..., eta={eta})) or pass "
                    f"eta={cfg.eta} to the pipeline"
                )
            raise ValueError(
                f"step(eta={eta}): eta is the DDIM forward process's parameter, but method {cfg.method!r} samples "
                f"the DDPM forward process, where it has no meaning; leave eta out (DDPMPipeline does) or use "
                f"method='ddim' / 'analytic_ddim' with eta={eta}"
            )
        if use_clipped_model_output and self.forward_process == "ddim" and cfg.clip_sample:
            raise ValueError(
                f"use_clipped_model_output=True: the DDIM mean of {cfg.method!r} (spec section 3) uses the network's "
                "epshat, not the epsilon recomputed from the clipped x0hat; pass use_clipped_model_output=False "
                "(None, DDIMPipeline's default, is the same)"
            )

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(bbar_t) eps for diffusers' timesteps (t - 1), as their schedulers do."""
        t = torch.as_tensor(timesteps, device=self.schedule.device).long().flatten() + 1
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = self.schedule.alphas_cumprod[t].sqrt().to(original_samples.device, original_samples.dtype).view(shape)
        b = self.schedule.bbar[t].sqrt().to(original_samples.device, original_samples.dtype).view(shape)
        return a * original_samples + b * noise


def _check_diffusers_options(timestep_spacing, steps_offset, thresholding, set_alpha_to_one) -> None:
    """diffusers' options that a DDPM/DDIM config carries: honoured (spacing, offset) or refused with the reason."""
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"unknown timestep_spacing {timestep_spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)} (or pass "
            "trajectory='even' / 'quadratic' / 'optimal' for the paper's trajectories)"
        )
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset must be an integer >= 0, got {steps_offset!r}")
    if thresholding:
        raise ValueError(
            "thresholding=True (dynamic thresholding of x0hat) is not part of Analytic-DPM's sampler, whose variance "
            "assumes the plain clip of x0hat to [-clip_sample_range, clip_sample_range] (spec section 3); pass "
            "thresholding=False (from_config(..., thresholding=False)) and keep clip_sample=True"
        )
    if not set_alpha_to_one:
        raise ValueError(
            "set_alpha_to_one=False makes the last step stop at alphas_cumprod[0] (x_1, still noisy); Analytic-DPM's "
            "last step goes to x_0 (abar_0 = 1, spec section 3); pass set_alpha_to_one=True "
            "(from_config(..., set_alpha_to_one=True))"
        )


def _offer_in_diffusers(cls: type) -> None:
    """Register ``cls`` under ``diffusers`` and in the ``_compatibles`` of the schedulers it lists, so that their
    ``compatibles`` offer it (diffusers resolves those names in its own namespace). Idempotent; new lists are
    assigned (never appended to a list a class may share with its base)."""
    setattr(diffusers, cls.__name__, cls)
    for name in cls._compatibles:
        other = getattr(diffusers, name, None)
        if other is None or isinstance(other, DummyObject) or cls.__name__ in other._compatibles:
            continue
        other._compatibles = [*other._compatibles, cls.__name__]


_offer_in_diffusers(AnalyticDPMScheduler)
