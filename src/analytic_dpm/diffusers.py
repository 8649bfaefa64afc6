"""Analytic-DPM inside diffusers: ``AnalyticDPMScheduler``, a drop-in scheduler for ``DDPMPipeline``.

    from diffusers import DDPMPipeline
    from analytic_dpm.diffusers import AnalyticDPMScheduler

    scheduler = AnalyticDPMScheduler.from_schedule(schedule, gamma, method="analytic_ddpm", trajectory="optimal")
    images = DDPMPipeline(unet, scheduler)(batch_size=16, num_inference_steps=25).images

Built from a schedule (betas, in diffusers' own config keys, so ``AnalyticDPMScheduler.from_config(
ddpm_scheduler.config, gamma=gamma)`` works) and the calibrated Gamma vector (float64 [N+1], gamma_0 = 0). Each
``step`` is the arithmetic of ``analytic_dpm.sample`` for one pair (s, t) = (tau_{k-1}, tau_k) (spec sections 3, 4
and 7), so a pipeline run equals ``sample()`` with the same noise: the initial noise and then one draw per step
except the last, all from the pipeline's generator.

Conventions: diffusers' ``timesteps`` are our t - 1, in descending order (the UNet is fed t - 1);
``num_inference_steps`` is K; ``trajectory`` is ``even``, ``quadratic``, ``optimal`` (needs gamma; DDPM forward
only) or an explicit list of our timesteps in 1..N. diffusers is an optional extra: importing this module without
it raises an ImportError that says ``pip install "analytic-dpm[diffusers]"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .methods import check_method, needs_gamma
from .pretrained.base import PretrainedError
from .pretrained.diffusers_format import DIFFUSERS_MISSING, betas_from_config, check_scheduler_config
from .sampler import predict_x0, reverse_mean
from .schedule import NoiseSchedule
from .trajectory import GAMMA_POLICIES, TRAJECTORY_KINDS, make_trajectory
from .validation import check_gamma, validate_trajectory
from .variance import forward_variance, reverse_variance, trajectory_pairs

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from diffusers.utils import BaseOutput
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
        trajectory: ``even``, ``quadratic``, ``optimal`` or a list of K timesteps in 1..N (our convention).
        eta: the DDIM forward process's eta (ddim / analytic_ddim).
        clip_sample: clamp x0hat to [-clip_sample_range, clip_sample_range] (spec section 3); that range is also
            the data range [a, b] of the Theorem 2 clip of U_t.
        clip_sigma_y: the paper's App. F.2 clip of the pair (tau_1, tau_2) in pixel levels (None: off).
        gamma_policy: how the optimal trajectory treats gamma_t > 1 (``monotone`` or ``authors``).
        prediction_type, rescale_betas_zero_snr: only ``epsilon`` / False are accepted (so that ``from_config`` of
            a v-prediction or zero-SNR config is refused instead of silently ignored).
    """

    order = 1
    _compatibles: list[str] = []

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
        trajectory: str | list[int] = "even",
        eta: float = 0.0,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        clip_sigma_y: float | None = None,
        gamma_policy: str = "monotone",
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
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
        name = "trained_betas" if trained_betas is not None else beta_schedule
        self.schedule = NoiseSchedule.from_betas(betas, name=f"diffusers:{name}")
        self.forward_process = check_method(method)
        if gamma_policy not in GAMMA_POLICIES:
            raise ValueError(f"unknown gamma_policy {gamma_policy!r}; choose one of {', '.join(GAMMA_POLICIES)}")
        if not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}")
        needed = needs_gamma(method) or (isinstance(trajectory, str) and trajectory == "optimal")
        what = f"method {method!r}" if needs_gamma(method) else "the optimal trajectory"
        self.gamma = check_gamma(None if gamma is None else torch.as_tensor(gamma, dtype=torch.float64).cpu(),
                                 self.schedule.N, required=needed, what=what)
        if not isinstance(trajectory, str):
            validate_trajectory(trajectory, self.schedule.N)
        elif trajectory not in TRAJECTORY_KINDS:
            raise ValueError(
                f"unknown trajectory {trajectory!r}; choose one of {', '.join(TRAJECTORY_KINDS)} or pass a list of "
                "timesteps in 1..N"
            )
        elif trajectory == "optimal" and self.forward_process != "ddpm":
            raise ValueError(
                f"the optimal trajectory is defined for the DDPM forward process only (lambda = 0 makes its cost "
                f"infinite for DDIM); use trajectory='even' or 'quadratic' with method {method!r}"
            )
        # the config holds plain JSON (tensors / arrays passed in become float64 lists), so save_pretrained works
        self.register_to_config(
            gamma=None if self.gamma is None else self.gamma.tolist(),
            trained_betas=None if trained_betas is None else betas.tolist(),
            trajectory=trajectory if isinstance(trajectory, str) else [int(t) for t in trajectory],
        )
        self.data_range = (-float(clip_sample_range), float(clip_sample_range))
        self.init_noise_sigma = 1.0  # x_{tau_K} ~ N(0, I)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(self.schedule.N - 1, -1, -1)  # until set_timesteps: every step, t - 1
        self._taus: list[int] | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_schedule(cls, schedule: NoiseSchedule, gamma: Tensor | None = None, *, method: str = "analytic_ddpm",
                      trajectory: str | list[int] = "even", **kwargs: Any) -> AnalyticDPMScheduler:
        """A scheduler for one of our NoiseSchedules (stored exactly as float64 ``trained_betas``) and Gamma."""
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
        """Choose the K = ``num_inference_steps`` timesteps of the configured trajectory and their variances.

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

    def step(self, model_output: Tensor, timestep, sample: Tensor, generator=None,
             return_dict: bool = True) -> AnalyticDPMSchedulerOutput | tuple:
        """One reverse step x_t -> x_s for the pair (s, t) whose t - 1 is ``timestep`` (spec sections 3 and 7).

        ``model_output`` is epshat (its first C channels when the net also outputs a learned variance). Noise is
        drawn from ``generator`` for every step but the last (s = 0), exactly as ``analytic_dpm.sample`` draws it.
        The same arithmetic as the loop body of ``analytic_dpm.sampler.sample`` (``reverse_mean``; tests check bit
        equality).
        """
        if self._taus is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        t = int(timestep.item() if isinstance(timestep, Tensor) else timestep) + 1  # diffusers' t - 1 -> our t
        k = self._k_of_t.get(t)
        if k is None:
            raise ValueError(f"timestep {t - 1} is not on the trajectory set by set_timesteps ({self.timesteps})")
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
            z = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            x_prev = mu + self._sigma2[k - 1] ** 0.5 * z
        x_prev, x0_hat = x_prev.to(sample.dtype), x0_hat.to(sample.dtype)
        if not return_dict:
            return (x_prev, x0_hat)
        return AnalyticDPMSchedulerOutput(prev_sample=x_prev, pred_original_sample=x0_hat)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(bbar_t) eps for diffusers' timesteps (t - 1), as their schedulers do."""
        t = torch.as_tensor(timesteps, device=self.schedule.device).long().flatten() + 1
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = self.schedule.alphas_cumprod[t].sqrt().to(original_samples.device, original_samples.dtype).view(shape)
        b = self.schedule.bbar[t].sqrt().to(original_samples.device, original_samples.dtype).view(shape)
        return a * original_samples + b * noise
