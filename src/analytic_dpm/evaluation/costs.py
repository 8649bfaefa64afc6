"""Where a head method's optimal trajectory comes from: its pair-cost table, estimated once and cached beside Gamma.

The optimal trajectory of the isotropic methods is a DP over a closed form of Gamma (spec section 6). A covariance
head's per-pixel variance has no such closed form: the expected cost of every pair (s, t) is estimated by Monte Carlo
on training images, one network call per (t, image) for all s < t at once (N calls per image;
:func:`analytic_dpm.pair_costs.estimate_pair_costs`), and the same DP runs on that table (spec section 11).

:func:`cached_pair_costs` keeps the table in ``eval.gamma_cache`` as ``pair-costs-<key>.pt`` under the key it was
made for (:func:`.provenance.pair_costs_key`: model, head, training data, number of images, seed, avg_cov, clip) and
a checksum; one process computes it under a file lock, the others read it; a file that does not hold that key or
whose table does not match its checksum is recomputed, with a warning naming it. The key's digest is part of the
identity of every row the table's trajectory makes.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch

from ..files import atomic_write, file_lock, safe_torch_load
from ..identity import digest_json, digest_tensor, short
from .context import EvalContext
from .provenance import pair_costs_key
from .settings import EvalSettings

log = logging.getLogger(__name__)

__all__ = ["PAIR_COSTS_FORMAT", "cached_pair_costs", "compute_pair_costs"]

PAIR_COSTS_FORMAT = "analytic_dpm.pair_costs/1"
LOCK_TIMEOUT_S = 4 * 3600.0


def compute_pair_costs(ctx: EvalContext, s: EvalSettings, method: str, network) -> torch.Tensor:
    """The table of ``method`` on the context's training data (float64 (N+1) x (N+1), CPU)."""
    from ..pair_costs import estimate_pair_costs

    n = s.head.cost_images
    log.info("pair costs of %s's optimal trajectory: %d training images x N = %s network calls", method, n,
             f"{n * ctx.schedule.N:,}")
    clip = bool(s.nll.clip_x0) if ctx.is_image else False
    return estimate_pair_costs(network, ctx.schedule, ctx.train_pool, method, n, s.head.cost_batch_size,
                               gamma=ctx.gamma, clip_x0=clip, data_range=ctx.data_range, avg_cov=s.head.avg_cov,
                               generator=torch.Generator(device=ctx.device).manual_seed(s.seed), device=ctx.device)


def cached_pair_costs(ctx: EvalContext, s: EvalSettings, method: str, network) -> torch.Tensor:
    """:func:`compute_pair_costs`, once per key (module docstring); without ``eval.gamma_cache`` not cached."""
    if ctx.train_pool is None:
        raise ValueError("the head methods' optimal trajectory needs training data to estimate its pair costs")
    key = json.loads(json.dumps(pair_costs_key(ctx, s, method), default=str))
    if not s.gamma_cache:
        return compute_pair_costs(ctx, s, method, network)
    path = Path(s.gamma_cache).expanduser() / f"pair-costs-{short(digest_json(key))}.pt"
    with file_lock(path.with_name(path.name + ".lock"), timeout=LOCK_TIMEOUT_S, what=f"the pair costs {path}"):
        if path.is_file() and not s.recalibrate:
            try:
                doc = safe_torch_load(path, what="pair-cost file")
                table = doc["costs"]
                if doc.get("key") != key:
                    raise ValueError("it was computed for another model, data or settings (its key differs)")
                if doc.get("sha256") != digest_tensor(table):
                    raise ValueError("the table does not match the checksum written with it")
                log.info("pair costs of %s from the cache %s", method, path)
                return table
            except (ValueError, KeyError, TypeError) as e:
                message = f"the cached pair costs {path} are not used: {e}; recomputing and replacing them"
                warnings.warn(message, stacklevel=2)
                log.warning("%s", message)
        table = compute_pair_costs(ctx, s, method, network).to("cpu", torch.float64).contiguous()
        doc = {"format": PAIR_COSTS_FORMAT, "costs": table, "sha256": digest_tensor(table), "key": key}
        atomic_write(path, lambda fh: torch.save(doc, fh))
    log.info("pair costs of %s cached in %s", method, path)
    return table
