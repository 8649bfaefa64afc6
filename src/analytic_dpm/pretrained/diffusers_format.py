"""The ``diffusers`` kind: an unconditional epsilon-predicting ``UNet2DModel`` plus its scheduler config.

Sources (``load(source, ...)``):

- a pipeline directory written by diffusers (``model_index.json``, ``unet/`` and ``scheduler/``), as on the Hub
  for ``google/ddpm-cifar10-32``; old Hub commits also carry a legacy root ``scheduler_config.json``, used when
  ``scheduler/`` is absent;
- a flat directory holding the UNet's ``config.json``, its weights and ``scheduler_config.json``;
- a Hub id (``owner/name``) when online; it is downloaded with ``huggingface_hub.snapshot_download`` (only the
  configs and one weights file) and then read as a directory.

Weights: ``diffusion_pytorch_model[.variant].safetensors`` (preferred) or ``.bin``. A ``.bin`` is opened with
``torch.load(weights_only=True)`` first, so a file that would unpickle anything but tensors is refused before
diffusers touches it (diffusers 0.42 also loads .bin with weights_only=True; this check does not rely on the
installed version). The network is always built by ``diffusers.UNet2DModel.from_pretrained``, which renames the
old attention keys (``query``/``key``/``value``/``proj_attn``); nothing read from a file chooses which class or
function runs.

Schedule (float64, rebuilt from diffusers' formulas; diffusers itself keeps float32), with N =
``num_train_timesteps`` and i = 0..N-1 (our n = i + 1):

- ``linear``:            beta = linspace(beta_start, beta_end, N)  (NOT scaled by 1000/N, unlike our LS)
- ``scaled_linear``:     beta = linspace(sqrt(beta_start), sqrt(beta_end), N)^2
- ``squaredcos_cap_v2``: beta_i = min(1 - f((i+1)/N) / f(i/N), 0.999), f(u) = cos^2((u + 0.008)/1.008 pi/2)
- ``sigmoid``:           beta = sigmoid(linspace(-6, 6, N)) (beta_end - beta_start) + beta_start
- ``laplace``:           diffusers' laplace alpha-bar, capped at 0.999 like the cosine one
- ``trained_betas``:     the listed values (they override beta_schedule, as in diffusers)

Timestep convention: the UNet is fed t - 1 (diffusers' timestep i is our n = i + 1).

Sampling timesteps (``spaced_trajectory``): what diffusers' DDPMScheduler / DDIMScheduler ``set_timesteps(K)``
choose for ``timestep_spacing`` (their numpy expressions, so the same K gives the same steps), with
i = 0..K-1 (diffusers' timesteps; ours are these + 1):

- ``leading`` (diffusers' default): i (N // K) + steps_offset
- ``linspace``:                     round(linspace(0, N - 1, K)), numpy's round (half to even)
- ``trailing``:                     round(arange(N, 0, -N/K)) - 1; where floating point makes numpy's arange
                                    yield K + 1 values (the last one -1, e.g. N = 1000, K = 61) the first K are
                                    kept: diffusers' own list then has a K+1-th timestep -1
``steps_offset`` applies to ``leading`` only, as in diffusers.
Refused with a message: x0- (``sample``) or v-predicting models, class-conditional or cross-attention UNets,
latent pipelines (a VAE/VQ-VAE), continuous-time schedulers and Fourier (continuous sigma) time embeddings,
zero-terminal-SNR rescaling (beta_N = 1), unknown beta schedules and missing files.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..schedule import NoiseSchedule
from ..validation import check_K
from .base import EpsAdapter, PretrainedError, PretrainedModel, file_sha256

__all__ = [
    "BETA_SCHEDULES",
    "DIFFUSERS_MISSING",
    "OPTIONS",
    "betas_from_config",
    "check_scheduler_config",
    "load",
    "require_diffusers",
    "schedule_from_config",
    "spaced_trajectory",
    "TIMESTEP_SPACINGS",
]

DIFFUSERS_MISSING = (
    "this needs the optional diffusers library, which is not installed: pip install \"analytic-dpm[diffusers]\""
)

#: options of ``load``, named as diffusers' / huggingface_hub's ``from_pretrained`` name them
OPTIONS = ("revision", "local_files_only", "cache_dir", "use_safetensors", "variant")
#: beta schedules rebuilt in float64 (``trained_betas`` overrides any of them)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
#: diffusers' defaults for a discrete scheduler config that omits a key (what their from_config would use)
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
#: schedulers of continuous-time (sigma / SDE / flow) models: no discrete betas, no Analytic-DPM
CONTINUOUS_SCHEDULERS = (
    "ScoreSdeVeScheduler", "ScoreSdeVpScheduler", "KarrasVeScheduler", "EDMEulerScheduler",
    "EDMDPMSolverMultistepScheduler", "CosineDPMSolverMultistepScheduler", "CMStochasticIterativeScheduler",
    "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler",
    "SCMScheduler",
)
#: config keys that only continuous-time schedulers carry
CONTINUOUS_KEYS = ("sigma_min", "sigma_max", "sigma_data", "snr", "sampling_eps", "beta_min", "beta_max", "shift")
#: diffusers' ``timestep_spacing`` values (``spaced_trajectory``); ``leading`` is diffusers' default
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
#: model_index.json components that make a pipeline latent (the UNet denoises latents, not images)
LATENT_COMPONENTS = ("vae", "vqvae", "vqgan", "movq")
WEIGHTS_STEM = "diffusion_pytorch_model"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def require_diffusers():
    """The ``diffusers`` module, or an ImportError saying how to install it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(DIFFUSERS_MISSING) from e
    return diffusers


# ---------------------------------------------------------------------------------------------- schedule
def _alpha_bar_cosine(u: float) -> float:
    """f(u) = cos^2(((u + 0.008)/1.008) pi/2): iDDPM's cosine alpha-bar (diffusers' squaredcos_cap_v2)."""
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def _alpha_bar_laplace(u: float) -> float:
    """diffusers' ``laplace`` alpha-bar: lambda = -0.5 sign(0.5 - u) log(1 - 2|0.5 - u| + 1e-6), sqrt(snr/(1+snr))."""
    lmb = -0.5 * math.copysign(1, 0.5 - u) * math.log(1 - 2 * math.fabs(0.5 - u) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def _betas_from_alpha_bar(N: int, alpha_bar, max_beta: float = 0.999) -> Tensor:
    """beta_i = min(1 - f((i+1)/N) / f(i/N), max_beta), i = 0..N-1, in float64 (Python floats, as diffusers)."""
    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / N) / alpha_bar(i / N), max_beta) for i in range(N)], dtype=torch.float64
    )


def _int_config(config: Mapping, key: str) -> int:
    value = config.get(key, SCHEDULER_DEFAULTS.get(key))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PretrainedError(f"scheduler config {key} must be a positive integer, got {value!r}")
    return value


def betas_from_config(config: Mapping[str, Any]) -> Tensor:
    """beta_1..beta_N (float64, length N) from a diffusers scheduler config, by the formulas of the module docstring.

    Missing keys take diffusers' own defaults (linear, 1e-4 .. 0.02, N = 1000). Raises PretrainedError for an
    unknown ``beta_schedule`` or a ``trained_betas`` list of the wrong length.
    """
    N = _int_config(config, "num_train_timesteps")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float64).flatten()
        if betas.numel() != N:
            raise PretrainedError(
                f"scheduler config trained_betas has {betas.numel()} values but num_train_timesteps is {N}"
            )
        return betas
    kind = config.get("beta_schedule", SCHEDULER_DEFAULTS["beta_schedule"])
    start = float(config.get("beta_start", SCHEDULER_DEFAULTS["beta_start"]))
    end = float(config.get("beta_end", SCHEDULER_DEFAULTS["beta_end"]))
    if kind == "linear":
        return torch.linspace(start, end, N, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, N, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        return _betas_from_alpha_bar(N, _alpha_bar_cosine)
    if kind == "laplace":
        return _betas_from_alpha_bar(N, _alpha_bar_laplace)
    if kind == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, N, dtype=torch.float64)) * (end - start) + start
    raise PretrainedError(
        f"unknown beta_schedule {kind!r} in the scheduler config; known: {', '.join(BETA_SCHEDULES)}, or "
        "trained_betas (a list of N betas). Put the model's betas in trained_betas to use it."
    )


def check_scheduler_config(config: Mapping[str, Any], where: str = "the scheduler config") -> None:
    """Refuse what Analytic-DPM cannot use: non-epsilon prediction, continuous time, zero-terminal-SNR betas."""
    cls = config.get("_class_name")
    continuous = (
        cls in CONTINUOUS_SCHEDULERS
        or any(config.get(k) is not None for k in CONTINUOUS_KEYS)
        or config.get("use_flow_sigmas")
        or config.get("timestep_type") == "continuous"
    )
    if continuous:
        raise PretrainedError(
            f"{where} belongs to a continuous-time model ({cls or 'sigma/SDE/flow keys'}); Analytic-DPM needs a "
            "discrete-time model with a beta schedule (DDPM/DDIM-style schedulers)"
        )
    if not any(k in config for k in ("beta_schedule", "trained_betas", "beta_start", "beta_end")):
        raise PretrainedError(
            f"{where} ({cls}) has no beta schedule (beta_schedule / trained_betas); Analytic-DPM needs the "
            "discrete betas the model was trained with"
        )
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        what = {"sample": "an x0-predicting (prediction_type 'sample')",
                "v_prediction": "a v-predicting (prediction_type 'v_prediction')"}.get(
            prediction, f"a prediction_type {prediction!r}")
        raise PretrainedError(
            f"{where} describes {what} model; Analytic-DPM needs a noise (epsilon) predictor, prediction_type "
            "'epsilon'"
        )
    if config.get("rescale_betas_zero_snr"):
        raise PretrainedError(
            f"{where} sets rescale_betas_zero_snr: beta_N = 1 (zero terminal SNR) has no finite Analytic-DPM "
            "variance; use a model trained without it"
        )


def schedule_from_config(config: Mapping[str, Any], where: str = "the scheduler config") -> NoiseSchedule:
    """The float64 NoiseSchedule of a diffusers scheduler config (checked by ``check_scheduler_config``)."""
    check_scheduler_config(config, where)
    betas = betas_from_config(config)
    name = "trained_betas" if config.get("trained_betas") is not None else config.get("beta_schedule", "linear")
    try:
        return NoiseSchedule.from_betas(betas, name=f"diffusers:{name}")
    except ValueError as e:
        raise PretrainedError(f"{where} gives betas that are not a valid schedule: {e}") from e


def spaced_trajectory(spacing: str, N: int, K: int, steps_offset: int = 0) -> list[int]:
    """tau_1 < ... < tau_K in 1..N: the timesteps diffusers' ``set_timesteps(K)`` picks for ``timestep_spacing``
    ``spacing``, plus one (our convention; module docstring). Raises ValueError for an unknown spacing or a
    ``steps_offset`` that pushes a ``leading`` timestep past N - 1."""
    check_K(K, N)
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset must be an integer >= 0, got {steps_offset!r}")
    if spacing == "leading":
        steps = np.arange(0, K) * (N // K) + steps_offset
        if steps[-1] > N - 1:
            raise ValueError(
                f"timestep_spacing 'leading' with steps_offset={steps_offset} puts the timestep {steps[-1]} past "
                f"num_train_timesteps - 1 = {N - 1} at K = {K} (diffusers would index out of range); use a smaller "
                "K, steps_offset=0 or another timestep_spacing"
            )
    elif spacing == "linspace":
        steps = np.linspace(0, N - 1, K).round().astype(np.int64)
    elif spacing == "trailing":
        steps = (np.round(np.arange(N, 0, -N / K)).astype(np.int64) - 1)[:K]  # [:K]: arange's float artefact
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")
    return sorted(int(i) + 1 for i in steps)


# ---------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class _Layout:
    """Where the pieces of a diffusers model lie inside ``root``."""

    root: Path
    unet_subfolder: str | None  # "unet" (pipeline layout) or None (flat)
    unet_config: Path
    weights: Path
    use_safetensors: bool
    scheduler_config: Path

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise PretrainedError(f"cannot read {path} as JSON ({e}); is the download complete?") from e
    if not isinstance(data, dict):
        raise PretrainedError(f"{path} must hold a JSON object")
    return data


def _weights_name(variant: str | None, safetensors: bool) -> str:
    return f"{WEIGHTS_STEM}{'.' + variant if variant else ''}.{'safetensors' if safetensors else 'bin'}"


def _locate(root: Path, use_safetensors: bool | None, variant: str | None) -> _Layout:
    """Pick the UNet folder (``unet/`` preferred), its weights file and the scheduler config (``scheduler/`` first)."""
    unet_dir, sub = (root / "unet", "unet") if (root / "unet" / "config.json").is_file() else (root, None)
    unet_config = unet_dir / "config.json"
    if not unet_config.is_file():
        raise PretrainedError(
            f"{root} holds no UNet config: expected unet/config.json (a pipeline directory, as on the Hub) or "
            "config.json (a flat directory written by UNet2DModel.save_pretrained)"
        )
    for ext in ("safetensors", "bin"):
        index = unet_dir / f"{_weights_name(variant, ext == 'safetensors')}.index.json"
        if index.is_file():
            raise PretrainedError(
                f"{index} is a sharded checkpoint, which this loader does not read; save the UNet unsharded "
                "(UNet2DModel.save_pretrained(dir, max_shard_size='100GB'))"
            )
    choices = [True, False] if use_safetensors is None else [bool(use_safetensors)]
    found = [(unet_dir / _weights_name(variant, s), s) for s in choices]
    found = [(path, s) for path, s in found if path.is_file()]
    if not found:
        names = " or ".join(_weights_name(variant, s) for s in choices)
        raise PretrainedError(f"no UNet weights in {unet_dir}: expected {names}; is the download complete?")
    weights, safe = found[0]
    candidates = [root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"]
    scheduler = next((p for p in candidates if p.is_file()), None)
    if scheduler is None:
        raise PretrainedError(
            f"{root} holds no scheduler config: expected scheduler/scheduler_config.json (pipeline layout) or "
            "scheduler_config.json (flat or legacy layout); the schedule (betas) is read from it"
        )
    return _Layout(root, sub, unet_config, weights, safe, scheduler)


def _hub_download(repo_id: str, options: dict) -> Path:
    """Download the configs, then one weights file, of a Hub repository; return the snapshot folder."""
    from huggingface_hub import snapshot_download

    kw = {k: options[k] for k in ("revision", "cache_dir", "local_files_only") if options.get(k) is not None}
    variant = options.get("variant")
    configs = ["model_index.json", "config.json", "scheduler_config.json", "unet/config.json",
               "scheduler/scheduler_config.json"]
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=configs, **kw))
        prefix = "unet/" if (root / "unet" / "config.json").is_file() else ""
        choices = [True, False] if options.get("use_safetensors") is None else [bool(options["use_safetensors"])]
        for safe in choices:
            name = prefix + _weights_name(variant, safe)
            root = Path(snapshot_download(repo_id, allow_patterns=[name], **kw))
            if (root / name).is_file():
                break
    except Exception as e:  # offline, unknown repository, network error: all say the same thing to the user
        raise PretrainedError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {str(e)[:300]}). No local "
            f"directory of that name exists either. Download it first on a machine with internet, e.g. "
            f"`hf download {repo_id} --local-dir DIR`, then pass that directory as the source (pretrained.source=DIR)"
        ) from e
    return root


def _resolve(source, options: dict) -> tuple[Path, bool]:
    """(directory, from_hub) for a local directory or a Hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path, False
    if path.exists():
        raise PretrainedError(
            f"{source} is a file; pass the directory that holds the diffusers model (its config.json, weights "
            "and scheduler config), not a single file"
        )
    if isinstance(source, str) and _HUB_ID.match(source):
        return _hub_download(source, options), True
    raise PretrainedError(
        f"no such directory: {source}; pass a directory written by diffusers (save_pretrained) or a Hugging Face "
        "Hub id such as google/ddpm-cifar10-32"
    )


def _check_bin_is_tensors_only(path: Path) -> None:
    """Open a ``.bin`` with weights_only=True: anything but tensors/containers is refused, nothing is executed."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise PretrainedError(
            f"refusing to load {path}: it is not a plain state dict of tensors (torch.load with weights_only=True "
            f"failed: {str(e).splitlines()[0][:300]}). Only load weights you trust; convert trusted ones to "
            "safetensors (diffusion_pytorch_model.safetensors)"
        ) from e


# ---------------------------------------------------------------------------------------------- checks
def _check_latent(root: Path) -> None:
    index = root / "model_index.json"
    if not index.is_file():
        return
    latent = [c for c in LATENT_COMPONENTS if c in _read_json(index)]
    if latent:
        raise PretrainedError(
            f"{index} describes a latent diffusion pipeline (component {latent[0]!r}): its UNet denoises latents, "
            "not images in [-1, 1], so the image data range, NLL and FID of this tool do not apply"
        )


def _check_unet_config(config: dict, scheduler: dict, where: Path) -> tuple[int, int, int]:
    """(image_size, channels, eps_channels) of an unconditional epsilon UNet2DModel; refuse anything else."""
    cls = config.get("_class_name")
    if cls == "UNet2DConditionModel" or config.get("cross_attention_dim") is not None:
        raise PretrainedError(
            f"{where} is a conditional UNet ({cls}, cross-attention); Analytic-DPM here needs an unconditional "
            "UNet2DModel noise predictor"
        )
    if cls != "UNet2DModel":
        raise PretrainedError(f"{where} describes a {cls!r}; only diffusers UNet2DModel networks are supported")
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise PretrainedError(
            f"{where} is a class-conditional UNet (num_class_embeds / class_embed_type set); only unconditional "
            "models are supported"
        )
    if config.get("time_embedding_type", "positional") == "fourier":
        raise PretrainedError(
            f"{where} uses a Fourier (continuous-time sigma) embedding, as score-SDE models do; Analytic-DPM needs "
            "a discrete-time model fed integer timesteps"
        )
    size = config.get("sample_size")
    if isinstance(size, list | tuple) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise PretrainedError(f"{where}: sample_size must be one integer (square images), got {size!r}")
    channels = config.get("in_channels", 3)
    out = config.get("out_channels", channels)
    learned = scheduler.get("variance_type") in ("learned", "learned_range")
    if out == 2 * channels and learned:
        return size, channels, channels  # learned variance: the first C output channels are epsilon
    if out != channels:
        raise PretrainedError(
            f"{where}: out_channels = {out} with in_channels = {channels} and scheduler variance_type "
            f"{scheduler.get('variance_type')!r}; expected out_channels = in_channels (epsilon) or 2 x in_channels "
            "with variance_type learned / learned_range"
        )
    return size, channels, channels


def _sample_of(output) -> Tensor:
    """diffusers' UNet2DOutput -> its tensor (a module-level function, so the adapter pickles)."""
    return output.sample


def _config_sha256(config: Mapping) -> str:
    """sha256 of the config's canonical JSON without diffusers' private keys (``_diffusers_version``, ...)."""
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    return "sha256:" + hashlib.sha256(json.dumps(public, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- load
def load(source, *, device="cpu", **options) -> PretrainedModel:
    """Load a diffusers UNet2DModel and its schedule; see the module docstring.

    Options (diffusers' names): ``use_safetensors`` (None: safetensors if present, else .bin), ``variant`` (e.g.
    ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``), and for Hub ids ``revision``, ``cache_dir``,
    ``local_files_only``.
    """
    diffusers = require_diffusers()
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise PretrainedError(f"unknown option(s) {unknown} for the diffusers kind; accepted: {', '.join(OPTIONS)}")
    root, from_hub = _resolve(source, options)
    layout = _locate(root, options.get("use_safetensors"), options.get("variant"))
    _check_latent(root)
    sched_cfg = _read_json(layout.scheduler_config)
    schedule = schedule_from_config(sched_cfg, where=str(layout.scheduler_config))
    unet_cfg = _read_json(layout.unet_config)
    image_size, channels, eps_channels = _check_unet_config(unet_cfg, sched_cfg, layout.unet_config)
    if not layout.use_safetensors:
        _check_bin_is_tensors_only(layout.weights)

    kw = {"subfolder": layout.unet_subfolder} if layout.unet_subfolder else {}
    try:
        net, info = diffusers.UNet2DModel.from_pretrained(
            str(root), use_safetensors=layout.use_safetensors, variant=options.get("variant"),
            torch_dtype=torch.float32, low_cpu_mem_usage=False, local_files_only=True, output_loading_info=True, **kw,
        )
    except (RuntimeError, ValueError, OSError) as e:
        raise PretrainedError(
            f"diffusers could not load the UNet from {layout.weights} with {layout.unet_config}: "
            f"{str(e)[:1000]}\nThe weights do not match the config (see the keys / shapes above)"
        ) from e
    bad = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if bad:
        detail = "; ".join(f"{k}: {v[:10]}{' ...' if len(v) > 10 else ''}" for k, v in bad.items())
        raise PretrainedError(f"the weights {layout.weights} do not match {layout.unet_config}: {detail}")

    eps_model = EpsAdapter(net, t_offset=-1, eps_channels=eps_channels, output=_sample_of).to(device).eval()
    used = {k: options[k] for k in OPTIONS if options.get(k) is not None}
    used["use_safetensors"] = layout.use_safetensors
    trained = sched_cfg.get("trained_betas")
    identity = {
        "kind": "diffusers",
        "weights_sha256": file_sha256(layout.weights),
        "weights_file": layout.relative(layout.weights),
        "unet_config_sha256": _config_sha256(unet_cfg),
        "scheduler_config_file": layout.relative(layout.scheduler_config),
        "scheduler": {
            "class_name": sched_cfg.get("_class_name"),
            "num_train_timesteps": schedule.N,
            **{k: None if trained is not None else sched_cfg.get(k, SCHEDULER_DEFAULTS[k])
               for k in ("beta_schedule", "beta_start", "beta_end")},
            "trained_betas": trained is not None,
            "prediction_type": sched_cfg.get("prediction_type", "epsilon"),
            "variance_type": sched_cfg.get("variance_type"),
        },
        "betas_sha256": "sha256:" + hashlib.sha256(schedule.betas.cpu().numpy().tobytes()).hexdigest(),
    }
    if from_hub:
        identity["hub_id"] = str(source)
        identity["revision"] = options.get("revision")
    return PretrainedModel(
        eps_model=eps_model, schedule=schedule, image_size=image_size, channels=channels, kind="diffusers",
        source=str(source), options=used, identity=identity, timestep_convention="t - 1",
    )
