"""The nouns every room of the evaluation shares: the evaluated network with its data (:class:`EvalContext`), the FID
metric with its reference (:class:`FidContext`), and one cell of the grid (:class:`Cell`).

An :class:`EvalContext` is what :mod:`.sources` builds from a request (checkpoint, pretrained model or oracle) and what
:mod:`.grid` runs on; it does not say where it came from, only what a number computed on it depends on
(``identity``, built by :func:`.provenance.run_identity`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..methods import check_method
from ..schedule import NoiseSchedule

__all__ = ["Cell", "EvalContext", "FidContext"]


@dataclass
class FidContext:
    """torchmetrics' FID with the reference (real) statistics loaded, and what identifies them."""

    metric: Any  # analytic_dpm.fid.InceptionFID with the reference statistics loaded
    reference_path: str | None = None  # where the reference statistics are on disk (shard merges read them)
    identity: dict = field(default_factory=dict)  # Inception weights and reference statistics (provenance.fid_features)


@dataclass
class EvalContext:
    """Everything a grid needs, independent of where it came from (checkpoint, pretrained model or oracle)."""

    eps_model: Callable[[Tensor, Tensor], Tensor]
    schedule: NoiseSchedule
    gamma: Tensor
    gamma_M: int | None
    dataset: str
    data_range: tuple[float, float] | None
    heldout: Callable[[int | None], Tensor]  # n -> held-out batch in model space
    num_heldout: int
    sample_shape: tuple[int, ...]  # (C, H, W)
    device: torch.device
    is_image: bool = True
    fid: FidContext | None = None
    nll_options: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)  # the run's identity (provenance.run_identity): model, Gamma, seed...
    # the network's precision while sampling for FID, as recorded (eval.fid.precision, else the run's precision)
    fid_precision: str | None = None
    # what the source applied to make the network ours (pretrained: kind, timestep convention, weights, layout)
    conventions: dict = field(default_factory=dict)
    datamodule: Any = None  # the data the context was built on (None for an oracle): train_pool, heldout, ...
    train_pool: Any = None  # training points for the head methods' pair-cost table: a tensor or a sampler
    train_digest: str | None = None  # what identifies that pool (sha256 of the tensor; the oracle's model id)

    @property
    def head_kind(self) -> str | None:
        """The covariance head of the network (``"sn"``, ``"npr"``) or None (spec section 11)."""
        return getattr(self.eps_model, "head_kind", None)


@dataclass(frozen=True)
class Cell:
    """One (method, trajectory, K) of the grid."""

    method: str
    trajectory: str
    K: int

    @property
    def forward(self) -> str:
        return check_method(self.method)
