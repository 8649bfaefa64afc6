"""Negative ELBO in bits/dim on a trajectory (spec sections 8 and 11), DDPM forward process only.

NELBO = L_prior + sum_{k=2..K} L_{tau_{k-1}|tau_k} + L_0, each term with one fresh eps. All DDPM-type
methods share ONE set of network evaluations: the reverse mean mu(x_t) is the same for all of them
and only sigma^2 differs. A head model's head output gives the covariance-head methods (sn_ddpm, npr_ddpm) their
per-pixel sigma^2(x_t) = lambda^2 + c^2 clip(Chat(x_t)) (spec section 11; Chat from
:func:`~analytic_dpm.moments.clipped_posterior_cov`, as in sampling); eps_hat serves every method. Terms are
returned per image as columns
    [L_0 (pair (0, tau_1)), L_{tau_1|tau_2}, ..., L_{tau_{K-1}|tau_K}, L_prior]
i.e. column k-1 belongs to pair k = 1..K and column K is the prior.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .gamma import model_device
from .methods import check_method, head_kind, needs_gamma
from .moments import call_model, check_head_model, clipped_posterior_cov, predict_x0
from .schedule import NoiseSchedule
from .validation import FiniteWatch, check_gamma, validate_trajectory
from .variance import DataRange, pair_variance, step_coefficients, trajectory_pairs

log = logging.getLogger(__name__)

DECODERS = ("discrete", "continuous")
DECODER_VARIANCES = ("paper", "method")
CDFS = ("tanh", "erf")
PROB_FLOOR = 1e-12


def normal_cdf(u: Tensor, kind: str = "tanh") -> Tensor:
    """Standard normal CDF: the paper's tanh approximation or the exact erf form."""
    if kind == "tanh":
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))
    if kind == "erf":
        return 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0)))
    raise ValueError(f"unknown cdf {kind!r}; choose one of {', '.join(CDFS)}")


def discretized_gaussian_log_prob(x: Tensor, mean: Tensor, var, cdf: str = "tanh", bin_half_width=1.0 / 255) -> Tensor:
    """log P(bin of x) under N(mean, var): bin [x - 1/255, x + 1/255], edge bins open at -1 and +1.

    x must lie on the 256-level grid of [-1, 1]. Probabilities are floored at 1e-12 (paper protocol).
    """
    std = torch.as_tensor(var, dtype=mean.dtype, device=mean.device).sqrt()
    centered = x - mean
    upper = (centered + bin_half_width) / std
    lower = (centered - bin_half_width) / std
    cdf_upper = normal_cdf(upper, cdf)
    tail_upper = normal_cdf(-lower, cdf)  # 1 - Phi(lower), computed without cancellation
    mid = cdf_upper - normal_cdf(lower, cdf)
    prob = torch.where(x < -0.999, cdf_upper, torch.where(x > 0.999, tail_upper, mid))
    return prob.clamp(min=PROB_FLOOR).log()


def gaussian_log_density(x: Tensor, mean: Tensor, var) -> Tensor:
    var = torch.as_tensor(var, dtype=mean.dtype, device=mean.device)
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def pixel_kl(lam2: Tensor, c2: Tensor, cov: Tensor, sq_err: Tensor) -> Tensor:
    """Per-pixel KL( N(mutilde, lambda^2) || N(mu, sigma^2) ) of a step, sigma^2 = lambda^2 + c^2 cov (spec section 11):

        0.5 (log(sigma^2 / lambda^2) + lambda^2 / sigma^2 - 1) + 0.5 (mutilde - mu)^2 / sigma^2
      = 0.5 (log1p(k cov) + k (sq_err - cov) / (1 + k cov)),    k = c^2 / lambda^2,

    with (mutilde - mu)^2 = c^2 (x_0 - x0hat)^2 = c^2 sq_err. The second form keeps the digits of a small c^2 cov and
    makes few passes over large blocks. Arguments broadcast; needs lambda^2 > 0 (DDPM forward, s >= 1)."""
    k = c2 / lam2
    kc = k * cov
    log_ratio = torch.log1p(kc)  # log(sigma^2 / lambda^2)
    return 0.5 * (log_ratio + k * (sq_err - cov) / kc.add_(1))  # kc + 1 = sigma^2 / lambda^2, in place


def _decoder_variance(schedule: NoiseSchedule, tau1: int, method: str, gamma, data_range, mode: str) -> float:
    """sigma_0^2 of the decoder p(x_0 | x_{tau_1}) (spec section 8). For a head method with mode ``method`` this is
    the paper value, the fallback of each pixel whose own variance clip(Chat(x_{tau_1})) is 0 (see nll_bpd)."""
    if schedule.N < 2:
        raise ValueError("the decoder variance btilde_{1|2} needs N >= 2")
    paper = float(schedule.btilde(1, 2))
    if mode == "paper" or head_kind(method) is not None:
        return paper
    own = float(pair_variance(schedule, 0, tau1, method, gamma, 0.0, data_range))
    if not own > 0:  # ddpm_beta_tilde is 0 there; so is an analytic U clipped to 0
        return paper
    return own


@torch.no_grad()
def nll_bpd(
    eps_model,
    schedule: NoiseSchedule,
    trajectory: Sequence[int],
    x0: Tensor,
    methods: Sequence[str],
    gamma: Tensor | None = None,
    decoder: str = "discrete",
    decoder_variance: str = "paper",
    clip_x0: bool = True,
    data_range: DataRange = (-1.0, 1.0),
    *,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    return_terms: bool = False,
    cdf: str = "tanh",
    progress: bool = False,
    avg_cov: bool = False,
):
    """Bits/dim per image for each method: ``{method: float64 Tensor[batch]}``.

    ``x0`` is a batch in model space (images on the 2k/255 - 1 grid for the discrete decoder). DDIM
    methods get NaN (the bound is infinite for lambda = 0) with a logged reason. ``batch_size`` is the
    network batch: (timestep, image) pairs are stacked so the model sees full batches (default: one
    call per timestep). With ``return_terms`` returns ``(bpd, terms)``, terms[method] a float64
    Tensor[batch, K+1] in bits/dim (column layout in the module docstring). A network output that is NaN or
    inf raises :class:`~analytic_dpm.validation.NonFiniteOutputError` naming the smallest such timestep.

    Head methods (sn_ddpm, npr_ddpm; spec section 11) need a head model ``eps_model(x_t, t) -> (eps_hat, head)``
    (ValueError otherwise) and use per-pixel variances: L_{s|t} = sum over pixels of 0.5 (log(sigma^2/lambda^2) +
    lambda^2/sigma^2 - 1) + 0.5 (mutilde - mu)^2 / sigma^2. Decoder: ``decoder_variance="paper"`` is btilde_{1|2} for
    every method (the authors' NLL); ``"method"`` is the head method's own per-pixel clip(Chat(x_{tau_1})) (each
    pixel where that is 0 falls back to btilde_{1|2}). ``avg_cov`` averages Chat over the pixels of each image.
    """
    if isinstance(methods, str):
        methods = [methods]
    for m in methods:
        check_method(m)
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    if decoder_variance not in DECODER_VARIANCES:
        raise ValueError(f"unknown decoder_variance {decoder_variance!r}; choose one of {', '.join(DECODER_VARIANCES)}")
    if cdf not in CDFS:
        raise ValueError(f"unknown cdf {cdf!r}; choose one of {', '.join(CDFS)}")
    taus = validate_trajectory(trajectory, schedule.N)
    check_head_model(eps_model, methods)
    ddpm_methods = [m for m in methods if check_method(m) == "ddpm"]
    head_methods = [m for m in ddpm_methods if head_kind(m) is not None]
    gamma = check_gamma(gamma, schedule.N, required=any(needs_gamma(m) for m in ddpm_methods),
                        what="analytic_ddpm")
    B, K = x0.shape[0], len(taus)
    if B == 0:
        raise ValueError("x0 holds no images: nll_bpd needs a batch of at least one")
    dim = x0[0].numel()
    device = model_device(eps_model, fallback=x0.device)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)

    out_bpd: dict[str, Tensor] = {}
    out_terms: dict[str, Tensor] = {}
    for m in methods:
        if check_method(m) == "ddim":
            log.warning("NLL of %s is not defined: the DDIM forward process has lambda = 0, so the "
                        "variational bound is infinite; reporting NaN", m)
            out_bpd[m] = torch.full((B,), math.nan, dtype=torch.float64)
            out_terms[m] = torch.full((B, K + 1), math.nan, dtype=torch.float64)
    if not ddpm_methods:
        return (out_bpd, out_terms) if return_terms else out_bpd

    sched = schedule.to(device)
    abar, bbar = sched.alphas_cumprod, sched.bbar
    s_idx, t_idx = trajectory_pairs(taus, device=device)
    # per-pair, per-method sigma^2 (float64 [K]) of the isotropic methods; pair 1 (s = 0) is the decoder, handled
    # separately. Head methods: sigma^2 = lam2 + coef^2 clip(Chat(x_t)) per pixel, built in the loop.
    sigma2 = {m: pair_variance(sched, s_idx, t_idx, m, gamma, 0.0, data_range) for m in ddpm_methods
              if m not in head_methods}
    # DDPM forward: lambda^2 = btilde; mutilde - mu = coef (x_0 - x0hat), coef = c_{s|t} = sqrt(abar_s) beta_{t|s} /
    # bbar_t (spec sections 3 and 4)
    lam2, coef = step_coefficients(sched, s_idx, t_idx, "ddpm")
    dec_var = {m: _decoder_variance(sched, taus[0], m, gamma, data_range, decoder_variance) for m in ddpm_methods}
    clip_range = data_range if clip_x0 else None

    x0 = x0.to(device)
    terms = {m: torch.zeros(B, K + 1, dtype=torch.float64, device=device) for m in ddpm_methods}
    # prior: KL(N(sqrt(abar_T) x_0, bbar_T) || N(0, I)), summed over dimensions
    aT, bT = abar[taus[-1]], bbar[taus[-1]]
    prior = 0.5 * dim * (-torch.log(bT) + bT - 1) + 0.5 * aT * x0.double().flatten(1).pow(2).sum(1)
    for m in ddpm_methods:
        terms[m][:, K] = prior

    total = K * B  # (pair, image) elements, pair-major
    chunk = batch_size or B
    watch = FiniteWatch("nll_bpd", device, sentinel=schedule.N + 1)  # NaN/inf network outputs, checked once
    for start in tqdm(range(0, total, chunk), desc="NLL", disable=not progress, leave=False):
        idx = torch.arange(start, min(start + chunk, total), device=device)
        k, b = idx // B, idx % B
        t = t_idx[k]
        x_0 = x0[b].float()
        view = (-1,) + (1,) * (x_0.ndim - 1)
        eps = torch.randn(x_0.shape, generator=generator, device=generator.device).to(device)
        a_t, b_t = abar[t].view(view), bbar[t].view(view)
        # x_t = sqrt(abar_t) x_0 + sqrt(bbar_t) eps; network and elementwise work in float32, sums in float64
        x_t = (a_t.sqrt() * x_0 + b_t.sqrt() * eps).float()
        eps_hat, head = call_model(eps_model, x_t, t, head_for=head_methods[0] if head_methods else None)
        watch.observe(eps_hat, t)
        if head_methods:
            watch.observe(head, t)
        x0_hat = predict_x0(x_t, eps_hat, a_t.float(), b_t.float(), clip_range)
        # head methods: clip(Chat(x_t)) in float64 from the float32 outputs (per pixel; per image with avg_cov)
        chat = {m: clipped_posterior_cov(head_kind(m), eps_hat.double(), head.double(), a_t, b_t, data_range,
                                         avg_cov).expand_as(eps_hat) for m in head_methods}

        is_dec = k == 0
        if is_dec.any():
            xd, md = x_0[is_dec].double(), x0_hat[is_dec].double()
            for m in ddpm_methods:
                var = dec_var[m]
                if m in head_methods and decoder_variance == "method":
                    # the method's own variance at the pair (0, tau_1): lambda^2 = 0, c = 1 -> clip(Chat) per pixel
                    own = chat[m][is_dec]
                    var = torch.where(own > 0, own, dec_var[m])
                if decoder == "discrete":
                    ll = discretized_gaussian_log_prob(xd, md, var, cdf)
                else:
                    ll = gaussian_log_density(xd, md, var)
                terms[m][b[is_dec], 0] = -ll.flatten(1).sum(1)
        kl_sel = ~is_dec
        if kl_sel.any():
            kk = k[kl_sel]
            # ||mutilde - mu||^2 = coef^2 ||x_0 - x0hat||^2, shared by every DDPM-type method
            pixel_err = (x_0[kl_sel] - x0_hat[kl_sel]).flatten(1).pow(2)
            sq_err = coef[kk] ** 2 * pixel_err.sum(1, dtype=torch.float64)
            for m in ddpm_methods:
                if m in head_methods:
                    # per pixel: sigma^2 = lambda^2 + c^2 clip(Chat(x_t)) (spec section 11), summed over pixels
                    l2, c2 = lam2[kk].view(-1, 1), coef[kk].view(-1, 1) ** 2
                    kl = pixel_kl(l2, c2, chat[m][kl_sel].flatten(1), pixel_err.double()).sum(1)
                    terms[m][b[kl_sel], kk] = kl
                    continue
                s2, l2 = sigma2[m][kk], lam2[kk]
                # KL(N(mutilde, l2 I) || N(mu, s2 I)) = d/2 (log(s2/l2) + l2/s2 - 1) + |mutilde - mu|^2 / (2 s2)
                kl = 0.5 * dim * (torch.log(s2 / l2) + l2 / s2 - 1) + 0.5 * sq_err / s2
                terms[m][b[kl_sel], kk] = kl

    watch.check()
    scale = 1.0 / (dim * math.log(2.0))
    for m in ddpm_methods:
        out_terms[m] = (terms[m] * scale).cpu()
        out_bpd[m] = out_terms[m].sum(1)
    out_bpd = {m: out_bpd[m] for m in methods}
    out_terms = {m: out_terms[m] for m in methods}
    return (out_bpd, out_terms) if return_terms else out_bpd
