"""Builds an EvalContext from the evaluate.py config: a checkpoint (EMA weights + Gamma) or an exact oracle."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..gamma import estimate_gamma
from ..oracles import GaussianMixtureOracle, GaussianOracle
from ..schedule import NoiseSchedule
from ..validation import check_gamma
from .grid import EvalContext, FidContext, as_list

log = logging.getLogger(__name__)


class UserError(Exception):
    """A problem the user fixes (missing file, no Gamma, ...): evaluate.py prints it without a traceback."""


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_gamma_file(path: str | Path, N: int) -> torch.Tensor:
    """Gamma from a .pt/.pth (tensor or checkpoint-style dict), .npy or .json (list or {"gamma": [...]}) file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"eval.gamma_path: no such file {p}")
    try:
        if p.suffix == ".npy":
            g = torch.from_numpy(np.load(p))
        elif p.suffix == ".json":
            obj = json.loads(p.read_text())
            g = torch.tensor(obj["gamma"] if isinstance(obj, dict) else obj, dtype=torch.float64)
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = obj.get("gamma", obj.get("analytic_dpm", {}).get("gamma"))
            g = torch.as_tensor(obj)
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user error
        raise UserError(f"eval.gamma_path {p} could not be read as a Gamma vector: {e}") from None
    try:
        return check_gamma(g, N)
    except ValueError as e:
        raise UserError(f"eval.gamma_path {p}: {e}") from None


def _oracle_context(cfg, device: torch.device) -> EvalContext:
    m, e = cfg.model, cfg.eval
    schedule = NoiseSchedule.from_name(cfg.diffusion.schedule, int(cfg.diffusion.N))
    shape = tuple(int(s) for s in m.shape)
    if m.oracle == "gaussian":
        oracle = GaussianOracle(schedule, float(m.mean), float(m.std), shape)
        gamma, gamma_M = oracle.gamma(), None  # closed form (spec section 9)
        name = f"gaussian(std={float(m.std):g})"
    elif m.oracle == "gmm":
        oracle = GaussianMixtureOracle(schedule, list(m.means), list(m.stds), list(m.weights), shape=shape)
        M = int(e.calibration.num_samples)
        gamma = estimate_gamma(oracle, schedule, oracle.sample_data, M, int(e.calibration.batch_size),
                               generator=torch.Generator().manual_seed(int(e.seed)))
        gamma_M = M
        name = "gmm"
    else:
        raise UserError(f"unknown oracle {m.oracle!r}; use model=oracle_gaussian or model=oracle_gmm")
    n_test = int(m.num_heldout)
    heldout_all = oracle.sample_data(n_test, torch.Generator().manual_seed(int(e.seed) + 1))

    def heldout(n):
        return heldout_all if n is None else heldout_all[: min(int(n), n_test)]

    # oracles: unbounded continuous data -> continuous decoder with the method's own variance, no clamp
    return EvalContext(
        eps_model=oracle, schedule=schedule, gamma=gamma, gamma_M=gamma_M, dataset=name, data_range=None,
        heldout=heldout, num_heldout=n_test, sample_shape=shape, device=torch.device("cpu"), is_image=False,
        nll_options=dict(decoder="continuous", decoder_variance="method", clip_x0=False, data_range=None),
    )


def _checkpoint_context(cfg, device: torch.device) -> EvalContext:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ..data import to_model_space
    from ..training import load_checkpoint

    e = cfg.eval
    try:
        ck = load_checkpoint(cfg.ckpt_path, map_location=device)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    schedule = ck.schedule
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else ck.hparams.get("data")
    if not data_cfg:
        raise UserError("the checkpoint has no data config: pass data=<name> (and its paths)")
    datamodule = instantiate(data_cfg)

    gamma, gamma_M = ck.gamma, ck.gamma_meta.get("M")
    if e.gamma_path:
        gamma, gamma_M = load_gamma_file(e.gamma_path, schedule.N), None
    elif e.recalibrate or gamma is None:
        if gamma is None and not e.recalibrate:
            raise UserError(
                f"{ck.path} holds no Gamma. Calibrate it first:\n    {ck.calibrate_command}\n"
                "or rerun with eval.recalibrate=true (or eval.gamma_path=FILE)."
            )
        M = int(e.calibration.num_samples)
        log.info("calibrating Gamma with M = %d on the training split", M)
        pool = datamodule.train_pool(None)
        gamma = estimate_gamma(ck.model, schedule, pool, M, int(e.calibration.batch_size),
                               generator=torch.Generator(device=device).manual_seed(int(e.seed)), device=device)
        gamma_M = M

    datamodule.setup("fit")
    n_test = datamodule.num_heldout

    def heldout(n):
        return to_model_space(datamodule.heldout(None if n is None else min(int(n), n_test)))

    images = datamodule.data_range is not None
    fid_ctx = _fid_context(cfg, datamodule, device) if "fid" in [str(m) for m in as_list(e.metrics)] else None
    name = getattr(datamodule, "name", None) or str(data_cfg.get("_target_", "data")).rsplit(".", 1)[-1]
    if images:
        nll_options = dict(decoder=e.nll.decoder, decoder_variance=e.nll.decoder_variance,
                           clip_x0=bool(e.nll.clip_x0), cdf=e.nll.cdf, data_range=tuple(datamodule.data_range))
    else:  # continuous, unbounded data (synthetic): continuous decoder with the method's own variance
        nll_options = dict(decoder="continuous", decoder_variance="method", clip_x0=False, data_range=None)
    return EvalContext(
        eps_model=ck.model, schedule=schedule, gamma=gamma, gamma_M=gamma_M, dataset=name,
        data_range=tuple(datamodule.data_range) if images else None, heldout=heldout, num_heldout=n_test,
        sample_shape=(datamodule.channels, datamodule.image_size, datamodule.image_size), device=device,
        is_image=images, fid=fid_ctx, nll_options=nll_options,
    )


def _fid_context(cfg, datamodule, device) -> FidContext | None:
    from ..fid import InceptionFeatures, reference_stats

    f = cfg.eval.fid
    weights = f.weights_path
    if weights and not Path(weights).expanduser().is_file():
        if f.get("skip_if_missing_weights", False):
            log.warning("FID skipped: Inception weights %s not found (make fid-weights)", weights)
            return None
        raise UserError(
            f"FID Inception weights not found at {weights}. Build them offline with `make fid-weights`, pass "
            "eval.fid.weights_path=FILE, set eval.fid.weights_path=null to let torch-fidelity download them "
            "(online), or drop FID with eval.metrics=[nll]."
        )
    features = InceptionFeatures(weights, device=device, batch_size=int(f.feature_batch_size))
    ref_images = datamodule.train_pool(None if f.reference_images is None else int(f.reference_images))
    cache_dir = Path(f.reference_cache).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = getattr(datamodule, "name", "data")
    ref = reference_stats(ref_images, weights, cache_path=cache_dir / f"{name}_train_{len(ref_images)}.npz",
                          device=device, batch_size=int(f.feature_batch_size), features=features)
    return FidContext(features=features, reference=ref)


def build_context(cfg) -> EvalContext:
    device = pick_device(cfg.eval.get("device", "auto"))
    model_cfg = cfg.get("model") or {}
    if model_cfg.get("oracle"):
        if cfg.get("ckpt_path"):
            raise UserError("give either ckpt_path=... or model=oracle_*, not both")
        return _oracle_context(cfg, device)
    if not cfg.get("ckpt_path"):
        raise UserError("pass ckpt_path=PATH (a training checkpoint), or model=oracle_gaussian / model=oracle_gmm")
    return _checkpoint_context(cfg, device)


