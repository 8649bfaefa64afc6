"""openai/improved-diffusion checkpoints, and the official Analytic-DPM CIFAR-10 checkpoints (same network).

    from analytic_dpm import pretrained
    m = pretrained.load("improved_diffusion", "imagenet64_uncond_100M_1500K.pt", image_size=64, num_channels=128,
                        num_res_blocks=3, learn_sigma=True, diffusion_steps=4000, noise_schedule="cosine")

Options are improved-diffusion's own flags, named and completed exactly as its scripts do
(``model_and_diffusion_defaults()`` then the flags given; so ``rescale_timesteps`` is on, ``num_heads`` is 4 and
scale-shift norm is on unless given): ``image_size, num_channels, num_res_blocks, num_heads, num_heads_upsample,
attention_resolutions`` (its comma string, e.g. ``"16,8"``, or a list), ``dropout, learn_sigma, sigma_small,
class_cond, diffusion_steps, noise_schedule, timestep_respacing, use_kl, predict_xstart, rescale_timesteps,
rescale_learned_sigmas, use_checkpoint, use_scale_shift_norm``. As in its ``create_model``, the channel
multipliers follow from ``image_size`` (32: 1,2,2,2; 64: 1,2,3,4; 256: 1,1,2,2,4,4), the attention resolutions
are feature-map sizes, and ``learn_sigma`` doubles the output channels (the first 3 are epsilon, the rest the
variance interpolation, which Analytic-DPM replaces). ``sigma_small, use_kl, rescale_learned_sigmas,
timestep_respacing, use_checkpoint`` only affect that project's training or sampling; they are accepted and
recorded, and change nothing here (the trajectory is chosen by this tool's own options). An option given as None
counts as not given. Refused:
``predict_xstart=True`` (an x_0 predictor) and ``class_cond=True`` (class-conditional).

This tool's own options (not improved-diffusion flags):

- ``timestep_shift`` (bool or None): feed the network ``t - 1`` for our t in 1..N (improved-diffusion's
  convention: its timesteps are 0..N-1) or ``t`` itself. None (default) picks the convention of the file's
  layout: ``True`` for a plain improved-diffusion state dict; for the official Analytic-DPM layout ``False`` for
  its ``eps_model`` (the CIFAR-10 LS/CS networks, trained and sampled on n in 1..N without a shift) and ``True``
  for its ``model`` (their conversion of improved-diffusion's ImageNet 64 network, sampled with ``shift1``).
  The CIFAR-10 LS/CS networks re-saved as plain state dicts (baofff/Extended-Analytic-DPM) need
  ``timestep_shift=False`` explicitly.
- ``use_ema`` (bool, default True): in the official layout, take ``ema_models_states`` (True) or
  ``models_states`` (False). Plain state dicts hold one set of weights (improved-diffusion's ``ema_*.pt`` files
  are the EMA ones).
- ``method``, ``mode``: the flags of baofff/Extended-Analytic-DPM's released SN-DPM / NPR-DPM models
  (``UNetModel4Pretrained`` state dicts: this network plus a covariance head ``out2.*``; see
  :mod:`analytic_dpm.pretrained.heads`). ``method=pred_eps_eps2_pretrained`` (SN) or ``pred_eps_epsc_pretrained``
  (NPR), ``mode=simple`` (default) or ``complex``. The result then has ``head_model``; its ``eps_model`` is the
  backbone alone. Their CIFAR-10 models take ``timestep_shift=False`` (as the Analytic-DPM CIFAR-10 networks they
  extend), their ImageNet 64 models the default (``t - 1``, with ``learn_sigma=True``). Without ``method``
  nothing changes (and these two options are not recorded).

Timestep fed to the network: ``(t - 1) * 1000 / N`` with ``rescale_timesteps`` (float), else ``t - 1`` (integer);
without the shift, ``t * 1000 / N`` or ``t``. Betas: ``get_named_beta_schedule`` rebuilt in float64 ("linear"
scaled by 1000 / N, "cosine" with max_beta 0.999).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..schedule import NoiseSchedule
from .base import EpsAdapter, PretrainedError, PretrainedModel, file_sha256
from .flags import as_bool, complete, resolutions_string
from .heads import HeadAdapter, head_hints, parse_head_options
from .netbuild import materialize, meta_head_unet, meta_unet
from .torchfile import is_state_dict, read_weights
from .unet_mapping import (
    IDDPM_HEAD_PREFIXES,
    convert,
    describe_mismatch,
    iddpm_entries,
    iddpm_head_entries,
    strip_prefix,
)

__all__ = ["CHANNEL_MULT", "DEFAULTS", "get_named_beta_schedule", "load", "unet_kwargs"]

#: improved_diffusion.script_util.model_and_diffusion_defaults(), verbatim values
DEFAULTS: dict[str, Any] = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    attention_resolutions="16,8",
    dropout=0.0,
    learn_sigma=False,
    sigma_small=False,
    class_cond=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=True,
    rescale_learned_sigmas=True,
    use_checkpoint=False,
    use_scale_shift_norm=True,
)
#: this tool's options (not improved-diffusion flags); see the module docstring
OWN_OPTIONS: dict[str, Any] = dict(timestep_shift=None, use_ema=True, method=None, mode=None)
#: improved_diffusion.script_util.create_model: channel multipliers by image size
CHANNEL_MULT: dict[int, tuple[int, ...]] = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
NOISE_SCHEDULES = ("linear", "cosine")
#: top-level keys of the official Analytic-DPM checkpoint (their ``CKPT.__dict__``)
_OFFICIAL_KEYS = ("ema_models_states", "models_states")
_IN_CHANNELS = 3  # create_model: in_channels=3, out_channels = 6 if learn_sigma else 3


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """improved-diffusion's betas beta_1..beta_N in float64 (same formulas, same float operations)."""
    n = int(num_diffusion_timesteps)
    if name == "linear":  # Ho et al.'s linear schedule, scaled by 1000 / N
        scale = 1000 / n
        return np.linspace(scale * 0.0001, scale * 0.02, n, dtype=np.float64)
    if name == "cosine":
        # abar(u) = cos^2((u + 0.008) / 1.008 * pi / 2); beta_n = min(1 - abar(n/N) / abar((n-1)/N), 0.999)
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    raise PretrainedError(
        f"unknown improved-diffusion noise_schedule {name!r}; its get_named_beta_schedule knows {NOISE_SCHEDULES}"
    )


def unet_kwargs(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Our UNet's arguments for improved-diffusion's completed ``flags`` (its ``create_model``)."""
    image_size = flags["image_size"]
    if image_size not in CHANNEL_MULT:
        raise PretrainedError(
            f"improved-diffusion's create_model supports image_size {sorted(CHANNEL_MULT)} (it derives the channel "
            f"multipliers from it), got {image_size}"
        )
    channel_mult = CHANNEL_MULT[image_size]
    # create_model turns resolutions into downsampling factors ds = image_size // res; UNetModel puts attention at
    # the levels whose ds (1, 2, 4, ...) is in that set and ignores the rest.
    level_ds = [2**level for level in range(len(channel_mult))]
    attention_ds = {image_size // int(r) for r in flags["attention_resolutions"].split(",") if r}
    return dict(
        in_channels=_IN_CHANNELS,
        out_channels=2 * _IN_CHANNELS if flags["learn_sigma"] else _IN_CHANNELS,
        image_size=image_size,
        base_channels=flags["num_channels"],
        channel_mult=channel_mult,
        num_res_blocks=flags["num_res_blocks"],
        attention_resolutions=[image_size // ds for ds in level_ds if ds in attention_ds],
        dropout=flags["dropout"],
        num_heads=flags["num_heads"],
        num_head_channels=None,
        num_heads_upsample=flags["num_heads_upsample"],
        use_scale_shift_norm=flags["use_scale_shift_norm"],
        resblock_updown=False,
        conv_resample=True,
        emb_act=True,
        time_embedding="iddpm",
        downsample_padding="symmetric",
        norm_eps=1e-5,
    )


def _complete_flags(options: Mapping[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in options.items() if v is not None}  # None = not given (a config's empty slot)
    if "attention_resolutions" in options:
        options["attention_resolutions"] = resolutions_string("attention_resolutions", options["attention_resolutions"])
    flags = complete(options, DEFAULTS, "improved_diffusion", extra=OWN_OPTIONS)
    if flags["timestep_shift"] is not None:
        flags["timestep_shift"] = as_bool("timestep_shift", flags["timestep_shift"])
    flags["use_ema"] = as_bool("use_ema", flags["use_ema"])
    head = parse_head_options(flags.pop("method"), flags.pop("mode"))
    if head is not None:  # recorded only for a head model: a plain model's options (and identity) stay as they were
        flags["method"], flags["mode"] = head["method"], head["mode"]
    if flags["predict_xstart"]:
        raise PretrainedError(
            "predict_xstart=True: this network predicts x_0, not the noise; Analytic-DPM needs a noise predictor "
            "eps(x_t, t) (x_0-predicting networks are not supported)"
        )
    if flags["class_cond"]:
        raise PretrainedError(
            "class_cond=True: class-conditional networks need a label per sample and are not supported; "
            "use an unconditional checkpoint"
        )
    if flags["noise_schedule"] not in NOISE_SCHEDULES:
        get_named_beta_schedule(flags["noise_schedule"], 1)  # raises the unknown-schedule error
    if flags["diffusion_steps"] < 2:
        raise PretrainedError(f"diffusion_steps must be >= 2, got {flags['diffusion_steps']}")
    return flags


def _unpack(obj: Any, use_ema: bool) -> tuple[str, str | None, dict[str, Tensor]]:
    """(layout, official entry name, state dict) of a loaded file."""
    if isinstance(obj, Mapping) and any(k in obj for k in _OFFICIAL_KEYS):
        section = "ema_models_states" if use_ema else "models_states"
        states = obj.get(section)
        if not isinstance(states, Mapping) or not states:
            other = "use_ema=False" if use_ema else "use_ema=True"
            raise PretrainedError(
                f"this official Analytic-DPM checkpoint has no {section}; pass {other} to use the other weights"
            )
        known = [n for n in ("eps_model", "model") if n in states]
        if not known and len(states) != 1:
            raise PretrainedError(
                f"the {section} of this checkpoint hold several networks {list(states)}; expected one named eps_model"
            )
        name = known[0] if known else next(iter(states))
        if not is_state_dict(states[name]):
            raise PretrainedError(f"{section}[{name!r}] of this checkpoint is not a state dict of tensors")
        return "analytic_dpm_official", name, strip_prefix(states[name])
    if is_state_dict(obj):
        return "state_dict", None, strip_prefix(obj)
    shown = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise PretrainedError(
        "expected an improved-diffusion state dict (a dict of tensors, e.g. cifar10_uncond_50M_500K.pt) or an "
        f"official Analytic-DPM checkpoint (with {' / '.join(_OFFICIAL_KEYS)}); this file holds {shown}"
    )


def _default_shift(layout: str, entry: str | None) -> bool:
    if layout == "state_dict":
        return True  # improved-diffusion's timesteps are 0..N-1
    if entry == "eps_model":
        return False  # Analytic-DPM's own CIFAR-10 training: eps_model(x_n, n * 1000 / N), n in 1..N
    if entry == "model":
        return True  # Analytic-DPM's ImprovedDDPMEvaluator: improved-diffusion networks with shift1=True
    raise PretrainedError(
        f"cannot tell the timestep convention of the network {entry!r} in this checkpoint; pass timestep_shift=True "
        "(it was trained on t - 1, as improved-diffusion does) or timestep_shift=False (on t in 1..N)"
    )


def _infer_flags(sd: Mapping[str, Tensor], image_size: int) -> dict[str, Any]:
    """Best-effort reading of architecture flags off a state dict (for error messages only)."""
    got: dict[str, Any] = {}
    w = sd.get("time_embed.0.weight")
    if w is None or w.ndim != 2:
        return got
    ch = int(w.shape[1])
    got["num_channels"] = ch
    out = sd.get("out.2.weight")
    if out is not None and out.ndim == 4:
        got["learn_sigma"] = int(out.shape[0]) == 2 * _IN_CHANNELS
    downs = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    nrb = downs[0] - 1 if downs else (max(blocks) if blocks else 0)
    if nrb < 1:
        return got
    got["num_res_blocks"] = nrb
    mult, attn_levels, level = [], [], 0
    while (conv := sd.get(f"input_blocks.{1 + level * (nrb + 1)}.0.in_layers.2.weight")) is not None:
        mult.append(int(conv.shape[0]) // ch)
        if f"input_blocks.{1 + level * (nrb + 1)}.1.qkv.weight" in sd:
            attn_levels.append(level)
        level += 1
    sizes = [s for s, m in CHANNEL_MULT.items() if list(m) == mult]
    if sizes:
        got["image_size"] = sizes[0]
    size = got.get("image_size", image_size)
    got["attention_resolutions"] = ",".join(str(size // 2**lv) for lv in attn_levels)
    emb, conv = sd.get("input_blocks.1.0.emb_layers.1.weight"), sd.get("input_blocks.1.0.in_layers.2.weight")
    if emb is not None and conv is not None:
        got["use_scale_shift_norm"] = int(emb.shape[0]) == 2 * int(conv.shape[0])
    return got


def _hints(flags: Mapping[str, Any], inferred: Mapping[str, Any]) -> list[str]:
    hints = []
    for name, value in inferred.items():
        given = flags[name]
        if name == "attention_resolutions":
            same = {int(v) for v in str(given).split(",") if v} == {int(v) for v in str(value).split(",") if v}
        else:
            same = given == value
        if not same:
            hints.append(f"{name}={given!r} (the weights look like {name}={value!r})")
    return hints


def convert_state_dict(sd: Mapping[str, Tensor], flags: Mapping[str, Any], what: str = "this file"):
    """(our network on the meta device, our state dict) for improved-diffusion weights ``sd`` and completed
    ``flags``: a UNet, or with ``flags["method"]`` a HeadUNet (an Extended-Analytic-DPM ``UNetModel4Pretrained``)."""
    if "label_emb.weight" in sd:
        raise PretrainedError(
            "this is a class-conditional network (it has label_emb.weight); class-conditional networks need a label "
            "per sample and are not supported; use an unconditional checkpoint"
        )
    head = parse_head_options(flags.get("method"), flags.get("mode"))
    net = unet = meta_unet("improved_diffusion", **unet_kwargs(flags))
    if head is not None:  # their out2 conv is zero-initialised (irrelevant here: every weight comes from the file)
        net = meta_head_unet(unet, head, eps_channels=_IN_CHANNELS, zero_init=True)
    conversion = convert(iddpm_head_entries(net) if head else iddpm_entries(unet), sd)
    if not conversion.ok:
        hints = head_hints(sd, head, IDDPM_HEAD_PREFIXES, "out2.0.in_layers.")
        if head is None:  # the backbone's own keys only: the head's are not part of improved-diffusion's flags
            sd = {k: v for k, v in sd.items() if not k.startswith(IDDPM_HEAD_PREFIXES)}
        hints += _hints(flags, _infer_flags(sd, flags["image_size"]))
        raise PretrainedError(describe_mismatch(conversion, what, hints))
    return net, conversion.state_dict


def load(source, *, device="cpu", **options) -> PretrainedModel:
    """An improved-diffusion noise predictor (or an official Analytic-DPM CIFAR-10 one) in our convention."""
    flags = _complete_flags(options)
    path, obj = read_weights(source, "improved_diffusion")
    layout, entry, sd = _unpack(obj, flags["use_ema"])
    shift = flags["timestep_shift"]
    if shift is None:
        shift = _default_shift(layout, entry)
    flags["timestep_shift"] = shift

    net, state_dict = convert_state_dict(sd, flags, what=repr(str(path)))
    net = materialize(net, state_dict, device)

    N = flags["diffusion_steps"]
    base = "t - 1" if shift else "t"
    if flags["rescale_timesteps"]:
        t_scale, convention = 1000.0 / N, f"({base}) * 1000 / {N}" if shift else f"t * 1000 / {N}"
    else:
        t_scale, convention = 1.0, base
    head_model = None
    if "method" in flags:  # (eps_hat, head) in one forward; eps_model: the backbone alone, same timestep rule
        head_model = HeadAdapter(net, t_offset=-1 if shift else 0, t_scale=t_scale).eval()
        eps_model = head_model.eps_model
    else:
        eps_model = EpsAdapter(net, t_offset=-1 if shift else 0, t_scale=t_scale, eps_channels=_IN_CHANNELS)
    eps_model.eval()
    schedule = NoiseSchedule.from_betas(
        torch.from_numpy(get_named_beta_schedule(flags["noise_schedule"], N)), name=flags["noise_schedule"]
    )
    kind = "improved_diffusion" if entry is None else "analytic_dpm_official"
    if entry is not None:
        layout = f"{layout}:{'ema_models_states' if flags['use_ema'] else 'models_states'}[{entry}]"
    identity = {
        "kind": kind, "weights": file_sha256(path), "layout": layout, "options": dict(flags),
        "timestep_convention": convention,
    }  # fmt: skip
    return PretrainedModel(
        eps_model=eps_model, schedule=schedule, image_size=flags["image_size"], channels=_IN_CHANNELS, kind=kind,
        source=str(path), options=dict(flags), identity=identity, timestep_convention=convention,
        head_model=head_model,
    )  # fmt: skip
