"""Builds an EvalContext from the evaluate.py config: a checkpoint (EMA weights + Gamma) or an exact oracle.

Order matters for the user: the evaluation settings are validated completely first (:mod:`.settings`), then the
cheap part of the source is read (the checkpoint: network, schedule, so that K <= N is checked), and only then the
costly parts run (Gamma calibration, FID reference statistics). Configs read from a checkpoint are rebuilt through
the allow list of :mod:`analytic_dpm.registry`: a file never chooses what code runs.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..files import atomic_write, file_lock
from ..gamma import estimate_gamma, gamma_warnings, read_gamma_vector
from ..identity import digest_json, digest_state_dict, digest_tensor, short
from ..oracles import GaussianMixtureOracle, GaussianOracle
from ..registry import UnsafeConfigError, build_datamodule
from ..schedule import NoiseSchedule
from ..validation import check_gamma
from .grid import EvalContext, FidContext
from .settings import EvalSettings, SettingsError

log = logging.getLogger(__name__)
#: how long a process waits for another one calibrating the same pretrained model's Gamma (a holder that dies
#: releases the lock at once)
GAMMA_LOCK_TIMEOUT_S = 4 * 3600.0


class UserError(Exception):
    """A problem the user fixes (missing file, no Gamma, ...): evaluate.py prints it without a traceback."""


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


def load_gamma_file(path: str | Path, N: int) -> torch.Tensor:
    """Gamma of length N+1 from a file (:func:`read_gamma_vector`), checked; :class:`UserError` otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"eval.gamma_path: no such file {p}")
    try:
        g = torch.as_tensor(np.asarray(read_gamma_vector(p), dtype=np.float64))
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user error
        raise UserError(f"eval.gamma_path {p} could not be read as a Gamma vector: {e}") from None
    try:
        return check_gamma(g, N)
    except ValueError as e:
        raise UserError(f"eval.gamma_path {p}: {e}") from None


def _warn_gamma(gamma: torch.Tensor, where: str) -> None:
    for message in gamma_warnings(gamma):
        warnings.warn(f"{where}: {message}", stacklevel=3)
        log.warning("%s: %s", where, message)


def precision_label(s: EvalSettings, eps_model, precision: str | None = None) -> str:
    """``precision`` (default ``eval.precision``) as recorded in results: ``bf16-attn`` when bf16 also reaches the
    UNet's self-attention (``attention_float32`` off), which moves the numbers further than bf16 with float32
    attention."""
    from ..nets import attention_in_float32

    precision = precision or s.precision
    if precision == "bf16" and isinstance(eps_model, torch.nn.Module) and attention_in_float32(eps_model) is False:
        return "bf16-attn"
    return precision


def apply_attention_setting(eps_model, s: EvalSettings) -> None:
    """``eval.attention_float32`` onto the network (None: leave it as built); a warning when it has no attention
    blocks of this package's UNet (e.g. a diffusers model), for which the option means nothing."""
    from ..nets import set_attention_float32

    if s.attention_float32 is None:
        return
    found = set_attention_float32(eps_model, s.attention_float32) if isinstance(eps_model, torch.nn.Module) else 0
    if not found:
        log.warning("eval.attention_float32 ignored: the network has no self-attention blocks of this package's UNet")


def _run_identity(s: EvalSettings, *, model_id: str, model_step, gamma: torch.Tensor, gamma_M, dataset: str,
                  precision: str | None = None) -> dict:
    return {
        "dataset": dataset, "model_id": model_id, "model_step": model_step, "gamma_hash": short(digest_tensor(gamma)),
        "gamma_M": gamma_M, "seed": s.seed, "precision": precision or s.precision, "gamma_policy": s.gamma_policy,
        "quadratic_duplicates": s.quadratic_duplicates, "eta": s.eta, "clip_x0": s.clip_x0, "version": __version__,
    }


def _oracle_context(cfg, s: EvalSettings) -> EvalContext:
    m = cfg.model
    try:
        schedule = NoiseSchedule.from_name(str(cfg.diffusion.schedule), int(cfg.diffusion.N))
    except (ValueError, TypeError) as e:
        raise UserError(f"diffusion: {e}") from None
    s.check_against(schedule.N)
    shape = tuple(int(v) for v in m.shape)
    params = {k: v for k, v in dict(m).items()}
    if m.oracle == "gaussian":
        oracle = GaussianOracle(schedule, float(m.mean), float(m.std), shape)
        gamma, gamma_M = oracle.gamma(), None  # closed form (spec section 9)
        name = f"gaussian(std={float(m.std):g})"
    elif m.oracle == "gmm":
        oracle = GaussianMixtureOracle(schedule, list(m.means), list(m.stds), list(m.weights), shape=shape)
        M = s.calibration.num_samples
        gamma = estimate_gamma(oracle, schedule, oracle.sample_data, M, s.calibration.batch_size,
                               generator=torch.Generator().manual_seed(s.seed))
        gamma_M = M
        name = "gmm"
    else:
        raise UserError(f"unknown oracle {m.oracle!r}; use model=oracle_gaussian or model=oracle_gmm")
    n_test = int(m.num_heldout)
    if n_test < 1:
        raise UserError(f"model.num_heldout must be >= 1, got {n_test}")
    heldout_all = oracle.sample_data(n_test, torch.Generator().manual_seed(s.seed + 1))

    def heldout(n):
        return heldout_all if n is None else heldout_all[: min(int(n), n_test)]

    model_id = short(digest_json({"oracle": params, "schedule": digest_tensor(schedule.betas)}))
    identity = _run_identity(s, model_id=model_id, model_step=None, gamma=gamma, gamma_M=gamma_M, dataset=name)
    # oracles: unbounded continuous data -> continuous decoder with the method's own variance, no clamp
    return EvalContext(
        eps_model=oracle, schedule=schedule, gamma=gamma, gamma_M=gamma_M, dataset=name, data_range=None,
        heldout=heldout, num_heldout=n_test, sample_shape=shape, device=torch.device("cpu"), is_image=False,
        nll_options=dict(decoder="continuous", decoder_variance="method", clip_x0=False, data_range=None),
        identity=identity,
    )


def eval_datamodule(cfg, where: str, data_cfg=None):
    """The datamodule of ``data_cfg`` (read from a file) or of ``cfg.data`` (the command line), via the allow list."""
    from omegaconf import OmegaConf

    from_file = data_cfg is not None
    if not from_file:
        data_cfg = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
    try:
        dm = build_datamodule(data_cfg, where=where if from_file else "data")
    except UnsafeConfigError as e:
        raise UserError(str(e)) from None
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build the datamodule: {e}") from None
    dm.setup("fit")
    return dm, data_cfg


def network_context(s: EvalSettings, device, *, eps_model, schedule, gamma, gamma_M, datamodule, data_cfg,
                     model_id: str, model_step) -> EvalContext:
    """The context of a network (checkpoint or pretrained) evaluated on a datamodule."""
    from ..data import to_model_space

    _warn_gamma(gamma, model_id)
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
    identity = _run_identity(s, model_id=model_id, model_step=model_step, gamma=gamma, gamma_M=gamma_M,
                             dataset=name, precision=precision_label(s, eps_model))
    ctx = EvalContext(
        eps_model=eps_model, schedule=schedule, gamma=gamma, gamma_M=gamma_M, dataset=name,
        data_range=tuple(datamodule.data_range) if images else None, heldout=heldout, num_heldout=n_test,
        sample_shape=(datamodule.channels, datamodule.image_size, datamodule.image_size), device=device,
        is_image=images, nll_options=nll_options, identity=identity,
    )
    if "fid" in s.metrics and images:
        ctx.fid = fid_context(s, datamodule, device)
        ctx.fid_precision = precision_label(s, eps_model, s.fid_precision)
    return ctx


def calibrate_for_eval(eps_model, schedule, datamodule, s: EvalSettings, device) -> torch.Tensor:
    """Gamma with M = eval.calibration.num_samples, the network at eval.precision / eval.compile (like the grid's)."""
    from ..accel import prepare_eps_model

    M = s.calibration.num_samples
    log.info("calibrating Gamma with M = %d on the training split (%d network calls, %s)", M, M * schedule.N,
             s.precision)
    network = prepare_eps_model(eps_model, precision=s.precision, compile=s.compile, mode=s.compile_mode,
                                device=device, static_batch=s.calibration.batch_size)
    return estimate_gamma(network, schedule, datamodule.train_pool(None), M, s.calibration.batch_size,
                          generator=torch.Generator(device=device).manual_seed(s.seed), device=device)


def _checkpoint_context(cfg, s: EvalSettings, device: torch.device) -> EvalContext:
    from ..training import load_checkpoint

    try:
        ck = load_checkpoint(cfg.ckpt_path, map_location=device)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    schedule = ck.schedule
    s.check_against(schedule.N)
    apply_attention_setting(ck.model, s)
    stored = None if cfg.get("data") else ck.hparams.get("data")
    if not cfg.get("data") and not stored:
        raise UserError("the checkpoint has no data config: pass data=<name> (and its paths)")
    datamodule, data_cfg = eval_datamodule(cfg, f"{ck.path}: hyper_parameters.data", stored)

    gamma, gamma_M = ck.gamma, ck.gamma_meta.get("M")
    if s.gamma_path:
        gamma, gamma_M = load_gamma_file(s.gamma_path, schedule.N), None
    elif s.recalibrate or gamma is None:
        if gamma is None and not s.recalibrate:
            raise UserError(
                f"{ck.path} holds no Gamma. Calibrate it first:\n    {ck.calibrate_command}\n"
                "or rerun with eval.recalibrate=true (or eval.gamma_path=FILE)."
            )
        gamma, gamma_M = calibrate_for_eval(ck.model, schedule, datamodule, s, device), s.calibration.num_samples
    model_id = short(digest_json({"weights": digest_state_dict(ck.model), "model": ck.hparams.get("model"),
                                  "schedule": digest_tensor(schedule.betas)}))
    return network_context(s, device, eps_model=ck.model, schedule=schedule, gamma=gamma, gamma_M=gamma_M,
                            datamodule=datamodule, data_cfg=data_cfg, model_id=model_id,
                            model_step=ck.gamma_meta.get("checkpoint_step"))


def load_pretrained(spec, device):
    """``pretrained.load(kind, source, **options)`` from the ``pretrained`` config group (null options dropped)."""
    from omegaconf import OmegaConf

    from .. import pretrained

    spec = OmegaConf.to_container(spec, resolve=True) if not isinstance(spec, dict) else spec
    unknown = sorted(set(spec) - {"kind", "source", "options"})
    if unknown:
        raise UserError(f"pretrained: unknown key(s) {unknown}; give pretrained.kind, .source and .options.*")
    options = {k: v for k, v in (spec.get("options") or {}).items() if v is not None}
    try:
        return pretrained.load(str(spec.get("kind")), spec.get("source"), device=device, **options)
    except (pretrained.PretrainedError, FileNotFoundError, ImportError) as e:
        raise UserError(f"pretrained={spec.get('kind')}: {e}") from None


def cached_gamma(eps_model, schedule, datamodule, s: EvalSettings, device, model_identity: dict
                 ) -> tuple[torch.Tensor, int | None]:
    """Gamma of a pretrained model: ``eval.gamma_path``, else calibrated once on the training split and kept in
    ``eval.gamma_cache`` under a key of (model, training data, M, batch, seed), so later runs reuse it."""
    from ..gamma import save_gamma_file

    if s.gamma_path:
        return load_gamma_file(s.gamma_path, schedule.N), None
    M = s.calibration.num_samples
    key = {"model": model_identity, "train_data": digest_tensor(datamodule.train_pool(None)), "M": M,
           "batch_size": s.calibration.batch_size, "seed": s.seed}
    label = precision_label(s, eps_model)
    if label != "fp32":  # (absent at fp32: Gamma cached before precisions existed stays valid)
        key["precision"] = label
    path = Path(s.gamma_cache).expanduser() / f"gamma-{short(digest_json(key))}.pt" if s.gamma_cache else None
    if path is None:
        return calibrate_for_eval(eps_model, schedule, datamodule, s, device), M
    # one process calibrates, the others (DDP ranks started by srun, shard jobs) wait and then read its file
    with file_lock(path.with_name(path.name + ".lock"), timeout=GAMMA_LOCK_TIMEOUT_S, what=f"the Gamma cache {path}"):
        if path.is_file() and not s.recalibrate:
            log.info("Gamma from the cache %s", path)
            return load_gamma_file(path, schedule.N), M
        gamma = calibrate_for_eval(eps_model, schedule, datamodule, s, device)
        save_gamma_file(path, gamma, M=M, key=json.loads(json.dumps(key, default=str)))
    log.info("Gamma (M=%d) cached in %s", M, path)
    return gamma, M


def _pretrained_context(cfg, s: EvalSettings, device: torch.device) -> EvalContext:
    if not cfg.get("data"):
        raise UserError(
            "pretrained=... needs data=<name> (and its paths): the dataset the model was trained on; Gamma is "
            "calibrated on its training split, NLL uses its held-out split, FID its training statistics"
        )
    m = load_pretrained(cfg.pretrained, device)
    s.check_against(m.schedule.N)
    apply_attention_setting(m.eps_model, s)
    datamodule, data_cfg = eval_datamodule(cfg, "data")
    if (datamodule.channels, datamodule.image_size) != (m.channels, m.image_size):
        got = f"{datamodule.channels}x{datamodule.image_size}x{datamodule.image_size}"
        raise UserError(
            f"the pretrained model takes {m.channels}x{m.image_size}x{m.image_size} images but the data gives {got}; "
            "pass the data it was trained on (data.image_size=... for an image folder)"
        )
    gamma, gamma_M = cached_gamma(m.eps_model, m.schedule, datamodule, s, device, m.identity)
    model_id = short(digest_json({"pretrained": m.identity}))
    return network_context(s, device, eps_model=m.eps_model, schedule=m.schedule, gamma=gamma, gamma_M=gamma_M,
                            datamodule=datamodule, data_cfg=data_cfg, model_id=model_id, model_step=None)


def fid_context(s: EvalSettings, datamodule, device) -> FidContext | None:
    """torchmetrics' FID (:class:`~analytic_dpm.fid.InceptionFID`) with the reference statistics loaded: the
    user's pytorch-fid ``.npz`` (``eval.fid.reference_stats``) or the training split's, computed once and cached."""
    from ..fid import InceptionFID, data_fingerprint
    from ..pretrained import file_sha256
    from .shards import pytorch_fid_stats

    f = s.fid
    weights = f.weights_path
    if weights and not Path(weights).expanduser().is_file():
        if f.skip_if_missing_weights:
            log.warning("FID not computed: Inception weights %s not found (make fid-weights)", weights)
            return None
        raise UserError(
            f"FID Inception weights not found at {weights}. Build them offline with `make fid-weights`, pass "
            "eval.fid.weights_path=FILE, set eval.fid.weights_path=null to let torch-fidelity download them "
            "(online), or drop FID with eval.metrics=[nll]."
        )
    try:
        metric = InceptionFID(weights, batch_size=f.feature_batch_size, precision=f.feature_precision,
                              channels_last=f.channels_last).to(device)
    except OSError as e:  # torch-fidelity's download (weights_path=null) fails offline
        raise UserError(
            f"could not get the FID Inception weights ({type(e).__name__}: {e}); offline, build them with "
            "`make fid-weights` and pass eval.fid.weights_path=FILE, or drop FID with eval.metrics=[nll]"
        ) from None
    if f.reference_stats:
        path = Path(f.reference_stats).expanduser()
        if not path.is_file():
            raise UserError(f"eval.fid.reference_stats: no such file {path}")
        try:
            ref = pytorch_fid_stats(path)
        except (ValueError, OSError) as e:
            raise UserError(f"eval.fid.reference_stats: {e}") from None
        metric.load_reference(ref)
        identity = {"weights": metric.weights_id, "reference": {"file": file_sha256(path)}}
        return FidContext(metric=metric, reference_path=str(path.resolve()),
                          identity=_with_feature_options(identity, metric))
    ref_images = reference_images(s, datamodule)
    fingerprint = data_fingerprint(ref_images)
    cache = None
    if f.reference_cache:
        name, n = getattr(datamodule, "name", "data"), len(ref_images)
        cache = reference_cache_path(f.reference_cache, name, fingerprint, n, metric.options_id)
        legacy = reference_cache_path(f.reference_cache, name, None, n, metric.options_id)
        _adopt_unfingerprinted_cache(legacy, cache, fingerprint)
    ref = metric.reference(ref_images, cache_path=cache, fingerprint=fingerprint)
    identity = {"weights": metric.weights_id, "reference": {k: ref.metadata.get(k) for k in
                                                            ("fingerprint", "num_images", "weights")}}
    return FidContext(metric=metric, reference_path=str(cache.resolve()) if cache else None,
                      identity=_with_feature_options(identity, metric))


def reference_images(s: EvalSettings, datamodule) -> torch.Tensor:
    """The FID reference images: the whole training split, or ``eval.fid.reference_images`` of them drawn with a
    fixed generator (the same images in every process, run and seed)."""
    n = s.fid.reference_images
    if n is None:
        return datamodule.train_pool(None)
    return datamodule.train_pool(n, generator=torch.Generator().manual_seed(0))


def reference_cache_path(cache_dir: str | Path, dataset: str, fingerprint: str | None, num_images: int,
                         options_id: str = "") -> Path:
    """Where the reference statistics of ``num_images`` training images are cached (the directory is created):
    ``<dataset>_train_<n>_<data>[_<options>].npz``, with ``<data>`` the first 10 hex digits of the images' sha256
    (:func:`~analytic_dpm.fid.data_fingerprint`) and ``<options>`` the Inception's non-default options (e.g.
    ``bf16``). Two image folders of the same name and size, or two resolutions of one dataset, thus get files of
    their own instead of overwriting each other's at every run. ``fingerprint=None`` gives the name used before
    the digest was part of it (``<dataset>_train_<n>[_<options>].npz``)."""
    digest = f"_{fingerprint.split(':', 1)[-1][:10]}" if fingerprint else ""
    options = f"_{options_id}" if options_id else ""
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir / f"{dataset}_train_{int(num_images)}{digest}{options}.npz"


def _adopt_unfingerprinted_cache(legacy: Path, cache: Path, fingerprint: str) -> None:
    """Statistics cached under the name without the data's digest are linked (or copied) to ``cache`` when they
    are of the same images, so an upgrade does not recompute them. The old name stays: FID shards written before
    the upgrade name it as their reference."""
    if cache.exists() or not legacy.is_file():
        return
    from ..fid import FeatureStats

    try:
        if FeatureStats.load(legacy).metadata.get("fingerprint") != fingerprint:
            return  # another folder's statistics
        try:
            os.link(legacy, cache)
        except FileExistsError:  # another process adopted it first
            return
        except OSError:  # a file system without hard links
            data = legacy.read_bytes()
            atomic_write(cache, lambda out: out.write(data))
    except Exception as e:  # noqa: BLE001 - unreadable: computed as usual
        log.warning("cannot reuse FID reference statistics %s (%s); computing them", legacy, e)
        return
    log.info("FID reference statistics %s reused as %s (same images)", legacy.name, cache.name)


def _with_feature_options(identity: dict, metric) -> dict:
    """The FID identity plus ``feature_options`` (e.g. ``"bf16"``) when the Inception runs with non-default
    options; at the defaults the identity is unchanged, so results computed before these options keep their fid_id.
    (``eval.fid.feature_batch_size`` is not part of it: the network treats images independently, a batch size only
    changes float32 rounding.)"""
    return {**identity, "feature_options": metric.options_id} if metric.options_id else identity


def build_context(cfg, settings: EvalSettings | None = None) -> EvalContext:
    """The evaluation context of ``cfg`` (``settings`` validated from ``cfg.eval`` when not given)."""
    if settings is None:
        try:
            settings = EvalSettings.from_config(cfg.eval)
        except SettingsError as e:
            raise UserError(str(e)) from None
    model_cfg = cfg.get("model") or {}
    if not isinstance(model_cfg, Mapping) and not hasattr(model_cfg, "get"):
        raise UserError(f"model must be a config group (oracle_gaussian, oracle_gmm), got {model_cfg!r}")
    sources = [name for name, given in (("ckpt_path", cfg.get("ckpt_path")), ("model", model_cfg.get("oracle")),
                                         ("pretrained", cfg.get("pretrained"))) if given]
    if len(sources) > 1:
        raise UserError(f"give one source of the noise predictor, not several: {' and '.join(sources)}")
    if cfg.get("pretrained"):
        try:
            return _pretrained_context(cfg, settings, pick_device(settings.device))
        except SettingsError as e:
            raise UserError(str(e)) from None
    if model_cfg.get("oracle"):
        if cfg.get("ckpt_path"):
            raise UserError("give either ckpt_path=... or model=oracle_*, not both")
        try:
            return _oracle_context(cfg, settings)
        except SettingsError as e:
            raise UserError(str(e)) from None
    if model_cfg:
        raise UserError("model= selects an exact oracle (oracle_gaussian, oracle_gmm) for evaluation; a trained "
                        "network comes from ckpt_path=PATH")
    if not cfg.get("ckpt_path"):
        raise UserError("pass ckpt_path=PATH (a training checkpoint), pretrained=KIND pretrained.source=PATH (another "
                        "project's network), or model=oracle_gaussian / model=oracle_gmm")
    try:
        return _checkpoint_context(cfg, settings, pick_device(settings.device))
    except SettingsError as e:
        raise UserError(str(e)) from None
