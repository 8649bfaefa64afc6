"""Where the evaluated network comes from: a checkpoint, a pretrained model or an exact oracle -> an EvalContext.

Order matters for the user: the request was validated completely first (:mod:`.request`), then the cheap part of
the source is read (the checkpoint: network, schedule, so that K <= N is checked), and only then the costly parts
run (Gamma: :mod:`.gammas`; FID reference statistics: :mod:`.reference`). Configs read from a checkpoint are rebuilt
through the allow list of :mod:`analytic_dpm.registry`: a file never chooses what code runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from ..errors import UserError
from ..identity import digest_tensor
from ..oracles import GaussianMixtureOracle, GaussianOracle
from ..registry import build_datamodule
from ..schedule import NoiseSchedule
from .context import EvalContext
from .gammas import cached_gamma, calibrate_for_eval, load_gamma_file, warn_gamma
from .provenance import checkpoint_model_id, oracle_model_id, precision_label, pretrained_model_id, run_identity
from .reference import fid_context
from .request import CheckpointSource, EvalRequest, OracleSource, PretrainedSource
from .settings import EvalSettings

log = logging.getLogger(__name__)

__all__ = ["apply_attention_setting", "build_context", "eval_datamodule", "load_pretrained", "network_context",
           "pick_device", "pretrained_conventions"]


def build_context(request: EvalRequest) -> EvalContext:
    """The evaluation context of ``request``'s source (one of three; :mod:`.request` made sure of that)."""
    source = request.source
    if isinstance(source, OracleSource):
        return _oracle_context(source, request.settings)
    device = pick_device(request.settings.device)
    if isinstance(source, PretrainedSource):
        return _pretrained_context(source, request, device)
    return _checkpoint_context(source, request, device)


def pick_device(name: str | None) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under DDP / SLURM) when CUDA is there, else the CPU."""
    if name in (None, "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        return torch.device(f"cuda:{int(local) if local.isdigit() else 0}")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"eval.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"eval.device={name!r} but CUDA is not available here; use eval.device=cpu (or auto)")
    return device


def apply_attention_setting(eps_model, s: EvalSettings) -> None:
    """``eval.attention_float32`` onto the network (None: leave it as built); a warning when it has no attention
    blocks of this package's UNet (e.g. a diffusers model), for which the option means nothing."""
    from ..nets import set_attention_float32

    if s.attention_float32 is None:
        return
    found = set_attention_float32(eps_model, s.attention_float32) if isinstance(eps_model, torch.nn.Module) else 0
    if not found:
        log.warning("eval.attention_float32 ignored: the network has no self-attention blocks of this package's UNet")


# ------------------------------------------------------------------------------------------------ oracle
def _oracle_context(source: OracleSource, s: EvalSettings) -> EvalContext:
    m = source.model
    try:
        schedule = NoiseSchedule.from_name(source.schedule, source.N)
    except (ValueError, TypeError) as e:
        raise UserError(f"diffusion: {e}") from None
    s.check_against(schedule.N)
    try:
        shape = tuple(int(v) for v in m["shape"])
        if m["oracle"] == "gaussian":
            anisotropic = isinstance(m["std"], (list, tuple))
            std = [float(v) for v in m["std"]] if anisotropic else float(m["std"])
            oracle = GaussianOracle(schedule, float(m["mean"]), std, shape)
            name = "gaussian(per-pixel std)" if anisotropic else f"gaussian(std={float(m['std']):g})"
        elif m["oracle"] == "gmm":
            oracle = GaussianMixtureOracle(schedule, list(m["means"]), list(m["stds"]), list(m["weights"]),
                                           shape=shape)
            name = "gmm"
        else:
            raise UserError(f"unknown oracle {m['oracle']!r}; use model=oracle_gaussian or model=oracle_gmm")
        network = oracle.head_model(str(m["head"])) if m.get("head") else oracle  # exact heads (spec section 11)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"model (the oracle's parameters): {e}") from None
    if m["oracle"] == "gaussian":
        gamma, gamma_M = oracle.gamma(), None  # closed form (spec section 9)
    else:
        from ..calibration import calibrate_gamma

        gamma_M = s.calibration.num_samples
        gamma, _ = calibrate_gamma(oracle, schedule, oracle.sample_data, gamma_M, s.calibration.batch_size,
                                   seed=s.seed, device="cpu", check=False)
    n_test = int(m["num_heldout"])
    if n_test < 1:
        raise UserError(f"model.num_heldout must be >= 1, got {n_test}")
    heldout_all = oracle.sample_data(n_test, torch.Generator().manual_seed(s.seed + 1))

    def heldout(n):
        return heldout_all if n is None else heldout_all[: min(int(n), n_test)]

    model_id = oracle_model_id(m, schedule)
    head = f"{m['head']}:exact" if m.get("head") else None
    identity = run_identity(s, model_id=model_id, model_step=None, gamma=gamma, gamma_M=gamma_M, dataset=name,
                            head=head)
    # oracles: unbounded continuous data -> continuous decoder with the method's own variance, no clamp
    return EvalContext(
        eps_model=network, schedule=schedule, gamma=gamma, gamma_M=gamma_M, dataset=name, data_range=None,
        heldout=heldout, num_heldout=n_test, sample_shape=shape, device=torch.device("cpu"), is_image=False,
        nll_options=dict(decoder="continuous", decoder_variance="method", clip_x0=False, data_range=None),
        identity=identity, conventions={"source": "oracle", "oracle": dict(m)},
        train_pool=oracle.sample_data, train_digest=model_id,
    )


# ------------------------------------------------------------------------------------------------ networks
def eval_datamodule(data_cfg: Mapping, where: str = "data"):
    """The datamodule of a plain data config (the command line's, or one read from a checkpoint), built through
    the allow list, set up for fitting."""
    try:
        dm = build_datamodule(data_cfg, where=where)
    except UserError:
        raise
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build the datamodule: {e}") from None
    dm.setup("fit")
    return dm


def head_label(model) -> str | None:
    """``"npr:simple"`` for a model with a covariance head (its kind and mode), None for a plain noise predictor."""
    kind = getattr(model, "head_kind", None)
    return None if kind is None else f"{kind}:{getattr(model, 'mode', None) or 'head'}"


def network_context(s: EvalSettings, device, *, eps_model, schedule, gamma, gamma_M, datamodule, data_cfg,
                    model_id: str, model_step, gamma_from_file: bool = False,
                    conventions: Mapping | None = None) -> EvalContext:
    """The context of a network (checkpoint or pretrained) evaluated on a datamodule; ``eps_model`` may be a head
    model ``(x_t, t) -> (eps_hat, head)``, which every method accepts (spec section 11)."""
    from ..data import to_model_space

    warn_gamma(gamma, model_id)
    n_test = datamodule.num_heldout

    def heldout(n):
        return to_model_space(datamodule.heldout(None if n is None else min(int(n), n_test)))

    images = datamodule.data_range is not None
    name = getattr(datamodule, "name", None) or str(data_cfg.get("_target_", "data")).rsplit(".", 1)[-1]
    if images:
        nll_options = dict(decoder=s.nll.decoder, decoder_variance=s.nll.decoder_variance, clip_x0=s.nll.clip_x0,
                           cdf=s.nll.cdf, data_range=tuple(datamodule.data_range))
    else:  # continuous, unbounded data (synthetic): continuous decoder with the method's own variance
        nll_options = dict(decoder="continuous", decoder_variance="method", clip_x0=False, data_range=None)
    head = head_label(eps_model)
    identity = run_identity(s, model_id=model_id, model_step=model_step, gamma=gamma, gamma_M=gamma_M,
                            dataset=name, precision=precision_label(s.precision, eps_model),
                            gamma_from_file=gamma_from_file, head=head)
    ctx = EvalContext(
        eps_model=eps_model, schedule=schedule, gamma=gamma, gamma_M=gamma_M, dataset=name,
        data_range=tuple(datamodule.data_range) if images else None, heldout=heldout, num_heldout=n_test,
        sample_shape=(datamodule.channels, datamodule.image_size, datamodule.image_size), device=device,
        is_image=images, nll_options=nll_options, identity=identity, conventions=dict(conventions or {}),
        datamodule=datamodule,
    )
    if head is not None:  # the head methods' optimal trajectory estimates its pair costs on the training split
        ctx.train_pool = datamodule.train_pool(None)
        ctx.train_digest = digest_tensor(ctx.train_pool)
    if "fid" in s.metrics and images:
        ctx.fid = fid_context(s, datamodule, device)
        ctx.fid_precision = precision_label(s.fid_precision, eps_model)
    return ctx


def _checkpoint_context(source: CheckpointSource, request: EvalRequest, device: torch.device) -> EvalContext:
    from ..training import is_head_checkpoint, load_checkpoint

    s = request.settings
    try:
        if is_head_checkpoint(source.path):
            return _head_checkpoint_context(source, request, device)
        ck = load_checkpoint(source.path, map_location=device)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    schedule = ck.schedule
    s.check_against(schedule.N)
    apply_attention_setting(ck.model, s)
    missing = (f"{ck.path} holds no Gamma. Calibrate it first:\n    {ck.calibrate_command}\n"
               "or rerun with eval.recalibrate=true (or eval.gamma_path=FILE).")
    data_cfg, datamodule, gamma, gamma_M, from_file = _checkpoint_data_and_gamma(
        ck, request, ck.model, schedule, ck.gamma_meta.get("M"), device, what="checkpoint", missing_gamma=missing)
    model_id = checkpoint_model_id(ck.model, ck.hparams.get("model"), schedule)
    return network_context(s, device, eps_model=ck.model, schedule=schedule, gamma=gamma, gamma_M=gamma_M,
                           datamodule=datamodule, data_cfg=data_cfg, model_id=model_id,
                           model_step=ck.gamma_meta.get("checkpoint_step"), gamma_from_file=from_file,
                           conventions={"source": "checkpoint", "path": str(ck.path),
                                        "weights": {"ema": "EMA", "raw": "training (no EMA in the file)"}.get(
                                            ck.gamma_meta.get("weights"), ck.gamma_meta.get("weights")),
                                        "step": ck.gamma_meta.get("checkpoint_step"),
                                        "timestep_convention": "t (this package's own)"})


def _checkpoint_data_and_gamma(ck, request: EvalRequest, eps_model, schedule, stored_M, device: torch.device, *,
                               what: str, missing_gamma: str | None = None):
    """The data (``data=...``, else the checkpoint's own config) and Gamma (``eval.gamma_path``, else the stored one,
    recalibrated with ``eps_model`` when asked or absent; ``missing_gamma``: refuse an absent one with that text
    instead) of a checkpoint source -> ``(data_cfg, datamodule, gamma, gamma_M, gamma_from_file)``."""
    s = request.settings
    data_cfg, where = request.data, "data"
    if data_cfg is None:
        data_cfg, where = ck.hparams.get("data"), f"{ck.path}: hyper_parameters.data"
        if not data_cfg:
            raise UserError(f"the {what} has no data config: pass data=<name> (and its paths)")
    datamodule = eval_datamodule(data_cfg, where)
    if s.gamma_path:
        gamma, gamma_M = load_gamma_file(s.gamma_path, schedule.N)
        return data_cfg, datamodule, gamma, gamma_M, True
    gamma, gamma_M = ck.gamma, stored_M
    if gamma is None and not s.recalibrate and missing_gamma is not None:
        raise UserError(missing_gamma)
    if s.recalibrate or gamma is None:
        gamma, gamma_M = calibrate_for_eval(eps_model, schedule, datamodule, s, device), s.calibration.num_samples
    return data_cfg, datamodule, gamma, gamma_M, False


def _head_checkpoint_context(source: CheckpointSource, request: EvalRequest, device: torch.device) -> EvalContext:
    """A covariance head trained by ``train.py`` on its frozen backbone: the head model (one pass: eps and head) is
    the grid's network, Gamma is the backbone's (recalibrated with its eps alone when asked or absent)."""
    from ..training import load_head_checkpoint

    s = request.settings
    ck = load_head_checkpoint(source.path, map_location=device)
    s.check_against(ck.schedule.N)
    apply_attention_setting(ck.head_model, s)
    data_cfg, datamodule, gamma, gamma_M, from_file = _checkpoint_data_and_gamma(
        ck, request, ck.eps_model, ck.schedule, (ck.gamma_meta or {}).get("M"), device, what="head checkpoint")
    model_id = checkpoint_model_id(ck.head_model, {"head": ck.hparams.get("head"), "backbone": ck.backbone_identity},
                                   ck.schedule)
    return network_context(s, device, eps_model=ck.head_model, schedule=ck.schedule, gamma=gamma, gamma_M=gamma_M,
                           datamodule=datamodule, data_cfg=data_cfg, model_id=model_id, model_step=None,
                           gamma_from_file=from_file,
                           conventions={"source": "head checkpoint", "path": str(ck.path), "head": head_label(
                               ck.head_model), "backbone": ck.backbone_source, "weights": "EMA head",
                               "backbone_identity": ck.backbone_identity})


def load_pretrained(source: PretrainedSource, device):
    """``pretrained.load(kind, source, **options)``; its errors as one :class:`UserError` naming the kind."""
    from .. import pretrained

    try:
        return pretrained.load(source.kind, source.source, device=device, **dict(source.options))
    except (pretrained.PretrainedError, FileNotFoundError, ImportError) as e:
        raise UserError(f"pretrained={source.kind}: {e}") from None


def _pretrained_context(source: PretrainedSource, request: EvalRequest, device: torch.device) -> EvalContext:
    s = request.settings
    m = load_pretrained(source, device)
    s.check_against(m.schedule.N)
    apply_attention_setting(m.eps_model, s)
    datamodule = eval_datamodule(request.data, "data")
    if (datamodule.channels, datamodule.image_size) != (m.channels, m.image_size):
        got = f"{datamodule.channels}x{datamodule.image_size}x{datamodule.image_size}"
        raise UserError(
            f"the pretrained model takes {m.channels}x{m.image_size}x{m.image_size} images but the data gives {got}; "
            "pass the data it was trained on (data.image_size=... for an image folder)"
        )
    gamma, gamma_M = cached_gamma(m.eps_model, m.schedule, datamodule, s, device, m.identity)
    model_id = pretrained_model_id(m.identity)
    network = m.head_model if getattr(m, "head_model", None) is not None else m.eps_model  # one pass: eps and head
    return network_context(s, device, eps_model=network, schedule=m.schedule, gamma=gamma, gamma_M=gamma_M,
                           datamodule=datamodule, data_cfg=request.data, model_id=model_id, model_step=None,
                           gamma_from_file=bool(s.gamma_path), conventions=pretrained_conventions(m))


def pretrained_conventions(m) -> dict:
    """What was applied to make a pretrained network ours, for the log and ``run.json``: the format, the timestep it
    is fed, EMA or training weights, the file layout recognised, its sha256 and the completed options."""
    options = dict(m.options or {})
    ema = options.get("use_ema", options.get("ema"))
    layout = str(m.identity.get("layout") or "")
    if ema is None:
        weights = "the file's one set of weights"
    elif "ema" in layout or ema is True:
        weights = "EMA"
    else:
        weights = "training (not EMA)"
    return {"source": "pretrained", "kind": m.kind, "path": str(m.source),
            "timestep_convention": m.timestep_convention, "weights": weights, "layout": layout or None,
            "weights_sha256": m.identity.get("weights") or m.identity.get("weights_sha256"), "options": options,
            "head": head_label(getattr(m, "head_model", None))}
