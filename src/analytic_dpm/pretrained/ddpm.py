"""DDPM / DDIM ``Model`` checkpoints: pesser/pytorch_diffusion conversions of Ho et al.'s TensorFlow networks,
ermongroup/ddim training checkpoints (e.g. its CelebA 64 model).

    from analytic_dpm import pretrained
    m = pretrained.load("ddpm", "celeba/ckpt.pth", config="configs/celeba.yml")
    m = pretrained.load("ddpm", "ema_diffusion_lsun_bedroom_model/model-2388000.ckpt", resolution=256,
                        in_channels=3, out_ch=3, ch=128, ch_mult=[1, 1, 2, 2, 4, 4], num_res_blocks=2,
                        attn_resolutions=[16], dropout=0.0, beta_schedule="linear", beta_start=0.0001,
                        beta_end=0.02, num_diffusion_timesteps=1000)

Options (named as those projects name them):

- the ``Model`` arguments ``ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv,
  in_channels, resolution`` (pytorch_diffusion's defaults: ``ch_mult=(1, 2, 4, 8)``, ``dropout=0.0``,
  ``resamp_with_conv=True``; the others are required). ``out_ch`` must equal ``in_channels`` (a noise predictor).
- the DDIM config's diffusion keys ``beta_schedule`` (``linear``, ``quad``, ``const``, ``jsd``, ``sigmoid``:
  ddim's ``get_beta_schedule``, NOT scaled by 1000 / N), ``beta_start``, ``beta_end``,
  ``num_diffusion_timesteps`` (all required);
- ``config``: the path of a DDIM-style YAML holding both (``model:`` section, ``data.image_size`` as the
  resolution, ``diffusion:`` section), read as plain data with ``yaml.safe_load``; options given alongside it
  override its values. The DDIM model-section keys ``type`` (``simple``, or ``bayesian``: its extra ``logvar``
  parameter is ignored), ``var_type`` and ``ema_rate`` are accepted and recorded; ``ema`` (default True) picks the
  weights of an ermongroup/ddim training checkpoint: its last item, the EMA weights (True), or item 0, the
  training weights (False).

This tool's own option: ``timestep_shift`` (default True): the network is fed ``t - 1`` for our t in 1..N (these
projects index timesteps 0..N-1); False feeds ``t``. An option given as None counts as not given.

Covariance-head models: ``method``, ``mode``, the flags of baofff/Extended-Analytic-DPM's released SN-DPM /
NPR-DPM models on this network (CelebA 64, LSUN bedroom: ``Model4Pretrained`` state dicts, this ``Model`` plus
``before_out`` (complex), ``norm_out2``, ``conv_out2``; see :mod:`analytic_dpm.pretrained.heads`).
``method=pred_eps_eps2_pretrained`` (SN) or ``pred_eps_epsc_pretrained`` (NPR), ``mode=simple`` (default) or
``complex``. The result then has ``head_model``; its ``eps_model`` is the backbone alone. (Their DDPM networks
were trained with N = 1000, where their timestep ``(t - 1) * 1000 / N`` is this adapter's ``t - 1``.) Without
``method`` nothing changes (and these two options are not recorded).

Files: a plain state dict (pytorch_diffusion's ``.ckpt`` files), or ermongroup/ddim's list ``[model state dict,
optimizer state, epoch, step, EMA weights]``. A ``module.`` prefix (``nn.DataParallel``) is dropped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..schedule import NoiseSchedule
from .base import EpsAdapter, PretrainedError, PretrainedModel, file_sha256
from .flags import as_bool, as_float, as_int, as_int_list
from .heads import HeadAdapter, head_hints, parse_head_options
from .netbuild import materialize, meta_head_unet, meta_unet
from .torchfile import is_state_dict, read_weights
from .unet_mapping import DDPM_HEAD_PREFIXES, convert, ddpm_entries, ddpm_head_entries, describe_mismatch, strip_prefix

__all__ = ["BETA_SCHEDULES", "MODEL_DEFAULTS", "get_beta_schedule", "load", "unet_kwargs"]

#: pytorch_diffusion ``Model.__init__`` arguments (None: required)
MODEL_DEFAULTS: dict[str, Any] = dict(
    ch=None, out_ch=None, ch_mult=[1, 2, 4, 8], num_res_blocks=None, attn_resolutions=None, dropout=0.0,
    resamp_with_conv=True, in_channels=None, resolution=None,
)  # fmt: skip
#: the DDIM config's diffusion section (all required: get_beta_schedule has no defaults)
DIFFUSION_KEYS = ("beta_schedule", "beta_start", "beta_end", "num_diffusion_timesteps")
#: further keys of the DDIM config's model section (recorded; ``type`` and ``ema`` are used)
DDIM_MODEL_EXTRAS: dict[str, Any] = dict(type="simple", var_type=None, ema_rate=None, ema=True)
OWN_OPTIONS: dict[str, Any] = dict(config=None, timestep_shift=True, method=None, mode=None)
BETA_SCHEDULES = ("quad", "linear", "const", "jsd", "sigmoid")
MODEL_TYPES = ("simple", "bayesian")


def get_beta_schedule(beta_schedule: str, *, beta_start: float, beta_end: float,
                      num_diffusion_timesteps: int) -> np.ndarray:
    """ermongroup/ddim's betas beta_1..beta_N in float64 (same formulas; "linear" is not scaled by 1000 / N)."""
    n = int(num_diffusion_timesteps)
    if beta_schedule == "quad":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "const":
        return beta_end * np.ones(n, dtype=np.float64)
    if beta_schedule == "jsd":  # 1/N, 1/(N-1), ..., 1
        return 1.0 / np.linspace(n, 1, n, dtype=np.float64)
    if beta_schedule == "sigmoid":
        x = np.linspace(-6, 6, n)
        return 1 / (np.exp(-x) + 1) * (beta_end - beta_start) + beta_start
    raise PretrainedError(f"unknown DDPM/DDIM beta_schedule {beta_schedule!r}; ddim's get_beta_schedule knows "
                          f"{BETA_SCHEDULES}")


# ---------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------
def _read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The options held by a DDIM-style YAML config (plain data: yaml.safe_load, nothing is instantiated)."""
    import yaml

    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise PretrainedError(f"DDIM config {str(p)!r} does not exist; pass the path of the model's YAML config")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise PretrainedError(f"cannot parse the DDIM config {str(p)!r}: {exc}") from exc
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model"), Mapping):
        raise PretrainedError(f"the DDIM config {str(p)!r} has no `model:` section")
    model, diffusion, data = cfg["model"], cfg.get("diffusion") or {}, cfg.get("data") or {}
    known_model = set(MODEL_DEFAULTS) - {"resolution"} | set(DDIM_MODEL_EXTRAS)
    unknown = sorted(set(model) - known_model) + sorted(f"diffusion.{k}" for k in set(diffusion) - set(DIFFUSION_KEYS))
    if unknown:
        raise PretrainedError(
            f"the DDIM config {str(p)!r} has keys this adapter does not know: {', '.join(unknown)}; known model keys: "
            f"{', '.join(sorted(known_model))}; diffusion keys: {', '.join(DIFFUSION_KEYS)}"
        )
    out = {**model, **diffusion}
    if "image_size" in data:
        out["resolution"] = data["image_size"]
    return out


def _complete(options: Mapping[str, Any]) -> dict[str, Any]:
    known = set(MODEL_DEFAULTS) | set(DIFFUSION_KEYS) | set(DDIM_MODEL_EXTRAS) | set(OWN_OPTIONS)
    unknown = sorted(set(options) - known)
    if unknown:
        raise PretrainedError(
            f"unknown ddpm option(s) {', '.join(unknown)}; known options are the Model arguments "
            f"({', '.join(MODEL_DEFAULTS)}), the DDIM diffusion keys ({', '.join(DIFFUSION_KEYS)}), the DDIM model "
            f"keys ({', '.join(DDIM_MODEL_EXTRAS)}) and this tool's own ({', '.join(OWN_OPTIONS)})"
        )
    given = {k: v for k, v in options.items() if v is not None}  # None = not given (a config's empty slot)
    config = given.get("config")
    merged: dict[str, Any] = {**MODEL_DEFAULTS, **DDIM_MODEL_EXTRAS, **dict.fromkeys(DIFFUSION_KEYS), **OWN_OPTIONS}
    if config is not None:
        merged.update(_read_config(config))
        merged["config"] = str(config)
    merged.update({k: v for k, v in given.items() if k != "config"})
    missing = [k for k in (*MODEL_DEFAULTS, *DIFFUSION_KEYS) if merged[k] is None]
    if missing:
        raise PretrainedError(
            f"missing ddpm option(s) {', '.join(missing)}; give them (as in the model's DDIM config or "
            "pytorch_diffusion's Model(...) call) or pass config=PATH to a DDIM-style YAML"
        )
    out: dict[str, Any] = {}
    for k in ("ch", "out_ch", "num_res_blocks", "in_channels", "resolution", "num_diffusion_timesteps"):
        out[k] = as_int(k, merged[k])
        if out[k] < 1:
            raise PretrainedError(f"option {k} must be positive, got {out[k]}")
    out["ch_mult"] = as_int_list("ch_mult", merged["ch_mult"])
    out["attn_resolutions"] = as_int_list("attn_resolutions", merged["attn_resolutions"])
    out["dropout"] = as_float("dropout", merged["dropout"])
    out["resamp_with_conv"] = as_bool("resamp_with_conv", merged["resamp_with_conv"])
    out["beta_schedule"] = str(merged["beta_schedule"])
    out["beta_start"] = as_float("beta_start", merged["beta_start"])
    out["beta_end"] = as_float("beta_end", merged["beta_end"])
    out["type"] = str(merged["type"])
    out["var_type"] = None if merged["var_type"] is None else str(merged["var_type"])
    out["ema_rate"] = None if merged["ema_rate"] is None else as_float("ema_rate", merged["ema_rate"])
    out["ema"] = as_bool("ema", merged["ema"])
    out["config"] = merged["config"]
    out["timestep_shift"] = as_bool("timestep_shift", merged["timestep_shift"])
    head = parse_head_options(merged["method"], merged["mode"])
    if head is not None:  # recorded only for a head model: a plain model's options (and identity) stay as they were
        out["method"], out["mode"] = head["method"], head["mode"]
    if out["type"] not in MODEL_TYPES:
        raise PretrainedError(f"unknown DDIM model type {out['type']!r}; known: {MODEL_TYPES}")
    if out["beta_schedule"] not in BETA_SCHEDULES:
        get_beta_schedule(out["beta_schedule"], beta_start=0.0, beta_end=0.0, num_diffusion_timesteps=1)  # raises
    if out["out_ch"] != out["in_channels"]:
        raise PretrainedError(
            f"out_ch={out['out_ch']} but in_channels={out['in_channels']}: a DDPM noise predictor outputs one value "
            "per input channel (networks with extra outputs are not supported)"
        )
    return out


def unet_kwargs(opts: Mapping[str, Any]) -> dict[str, Any]:
    """Our UNet's arguments for a DDPM ``Model`` with the completed options ``opts``."""
    levels = len(opts["ch_mult"])
    reachable = [opts["resolution"] // 2**level for level in range(levels)]  # Model: curr_res //= 2 per level
    return dict(
        in_channels=opts["in_channels"],
        out_channels=opts["out_ch"],
        image_size=opts["resolution"],
        base_channels=opts["ch"],
        channel_mult=tuple(opts["ch_mult"]),
        num_res_blocks=opts["num_res_blocks"],
        attention_resolutions=[r for r in reachable if r in set(opts["attn_resolutions"])],
        dropout=opts["dropout"],
        num_heads=1,
        num_head_channels=None,
        use_scale_shift_norm=False,
        resblock_updown=False,
        conv_resample=opts["resamp_with_conv"],
        emb_act=True,
        time_embedding="ddpm",
        downsample_padding="asymmetric",
        norm_eps=1e-6,
    )


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
def _unpack(obj: Any, ema: bool) -> tuple[str, dict[str, Tensor]]:
    if isinstance(obj, (list, tuple)) and obj:
        if ema:
            last = obj[-1]
            if len(obj) < 5 or not is_state_dict(last):
                raise PretrainedError(
                    f"this ermongroup/ddim checkpoint holds no EMA weights (a list of {len(obj)} items whose last is "
                    f"{type(last).__name__}); pass ema=False to use its training weights (item 0)"
                )
            return "ddim_list:ema", strip_prefix(last)
        if not is_state_dict(obj[0]):
            raise PretrainedError("item 0 of this ermongroup/ddim checkpoint is not a state dict of tensors")
        return "ddim_list:model", strip_prefix(obj[0])
    if is_state_dict(obj):
        return "state_dict", strip_prefix(obj)
    shown = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise PretrainedError(
        "expected a DDPM Model state dict (a dict of tensors, as pytorch_diffusion's .ckpt files) or an "
        f"ermongroup/ddim checkpoint (a list whose last item holds the EMA weights); this file holds {shown}"
    )


def _infer(sd: Mapping[str, Tensor], resolution: int) -> dict[str, Any]:
    """Best-effort reading of Model arguments off a state dict (for error messages only)."""
    got: dict[str, Any] = {}
    w = sd.get("temb.dense.0.weight")
    if w is None or w.ndim != 2:
        return got
    ch = int(w.shape[1])
    got["ch"] = ch
    if (c := sd.get("conv_in.weight")) is not None and c.ndim == 4:
        got["in_channels"] = int(c.shape[1])
    if (c := sd.get("conv_out.weight")) is not None and c.ndim == 4:
        got["out_ch"] = int(c.shape[0])
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"down\.0\.block\.(\d+)\.", k))}
    if blocks:
        got["num_res_blocks"] = max(blocks) + 1
    mult, level = [], 0
    while (c := sd.get(f"down.{level}.block.0.conv1.weight")) is not None:
        mult.append(int(c.shape[0]) // ch)
        level += 1
    got["ch_mult"] = mult
    got["attn_resolutions"] = [resolution // 2**lv for lv in range(level) if f"down.{lv}.attn.0.q.weight" in sd]
    if level > 1:
        got["resamp_with_conv"] = any(".downsample.conv." in k for k in sd)
    got["type"] = "bayesian" if "logvar" in sd else "simple"
    return got


def _hints(opts: Mapping[str, Any], inferred: Mapping[str, Any]) -> list[str]:
    hints = []
    for name, value in inferred.items():
        given = opts[name]
        same = sorted(given) == sorted(value) if name == "attn_resolutions" else given == value
        if not same:
            hints.append(f"{name}={given!r} (the weights look like {name}={value!r})")
    return hints


def convert_state_dict(sd: Mapping[str, Tensor], opts: Mapping[str, Any], what: str = "this file"):
    """(our network on the meta device, our state dict) for DDPM ``Model`` weights ``sd`` and completed ``opts``: a
    UNet, or with ``opts["method"]`` a HeadUNet (an Extended-Analytic-DPM ``Model4Pretrained``)."""
    head = parse_head_options(opts.get("method"), opts.get("mode"))
    net = unet = meta_unet("ddpm", **unet_kwargs(opts))
    if head is not None:  # their conv_out2 has PyTorch's default init (irrelevant: every weight comes from the file)
        net = meta_head_unet(unet, head, eps_channels=opts["in_channels"], zero_init=False)
    ignore = ("logvar",) if opts["type"] == "bayesian" else ()  # the bayesian Model's learned variance: unused
    conversion = convert(ddpm_head_entries(net) if head else ddpm_entries(unet), sd, ignore=ignore)
    if not conversion.ok:
        hints = head_hints(sd, head, DDPM_HEAD_PREFIXES, "before_out.")
        raise PretrainedError(describe_mismatch(conversion, what, hints + _hints(opts, _infer(sd, opts["resolution"]))))
    return net, conversion.state_dict


def load(source, *, device="cpu", **options) -> PretrainedModel:
    """A DDPM/DDIM ``Model`` noise predictor in our convention (see the module docstring)."""
    opts = _complete(options)
    path, obj = read_weights(source, "ddpm")
    layout, sd = _unpack(obj, opts["ema"])
    net, state_dict = convert_state_dict(sd, opts, what=repr(str(path)))
    net = materialize(net, state_dict, device)

    shift = opts["timestep_shift"]
    convention = "t - 1" if shift else "t"
    head_model = None
    if "method" in opts:  # (eps_hat, head) in one forward; eps_model: the backbone alone, same timestep rule
        head_model = HeadAdapter(net, t_offset=-1 if shift else 0, t_scale=1.0).eval()
        eps_model = head_model.eps_model
    else:
        eps_model = EpsAdapter(net, t_offset=-1 if shift else 0, t_scale=1.0, eps_channels=opts["in_channels"])
    eps_model.eval()
    betas = get_beta_schedule(
        opts["beta_schedule"], beta_start=opts["beta_start"], beta_end=opts["beta_end"],
        num_diffusion_timesteps=opts["num_diffusion_timesteps"],
    )  # fmt: skip
    name = opts["beta_schedule"]
    if name != "jsd" and (opts["beta_start"], opts["beta_end"]) != (0.0001, 0.02):
        name = f"{name}({opts['beta_start']:g},{opts['beta_end']:g})"
    try:
        schedule = NoiseSchedule.from_betas(torch.from_numpy(betas), name=name)
    except ValueError as exc:
        raise PretrainedError(
            f"the betas of beta_schedule={opts['beta_schedule']!r} (beta_start={opts['beta_start']}, "
            f"beta_end={opts['beta_end']}, N={opts['num_diffusion_timesteps']}) are not a usable schedule: {exc}"
        ) from exc
    identity = {  # the config's path is not a fact about the network: its values are in the options
        "kind": "ddpm", "weights": file_sha256(path), "layout": layout,
        "options": {k: v for k, v in opts.items() if k != "config"}, "timestep_convention": convention,
    }  # fmt: skip
    return PretrainedModel(
        eps_model=eps_model, schedule=schedule, image_size=opts["resolution"], channels=opts["in_channels"],
        kind="ddpm", source=str(path), options=dict(opts), identity=identity, timestep_convention=convention,
        head_model=head_model,
    )  # fmt: skip
