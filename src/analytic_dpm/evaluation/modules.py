"""The evaluation grid as LightningModules run by a Lightning ``Trainer`` (one device, DDP, several nodes, SLURM).

Work is cut into fixed **blocks**: held-out images ``[j B, (j+1) B)`` for NLL (``B = eval.nll.batch_size``), and
generated samples ``[j B, (j+1) B)`` for FID (``B = eval.fid.batch_size``). All randomness of block ``j`` (the
forward noise eps of the NELBO terms; x_T and every z of ancestral sampling) comes from a generator seeded with
``mix_seed(cell seed, j)``: it depends on the block's global index only. A process takes the blocks
``j = shard (mod num_shards)`` of its job and, of those, every ``world_size``-th from its rank on, so a cell's
numbers are the same however many ranks, nodes or shard jobs compute it (up to the order of float64 sums).

* :class:`NllGroupModule`: one (trajectory, K) for every DDPM-type method (one network pass serves them all,
  spec section 8); sums of bits/dim and of the per-term breakdown, reduced across ranks by torchmetrics.
* :class:`FidCellModule`: one (method, trajectory, K); samples go straight into
  :class:`~analytic_dpm.fid.InceptionFID` (torchmetrics' FID: synced sufficient statistics, cached reference).

A network output that is not finite makes a rank record the offending timestep (a min/max-reduced state) rather
than raise, so every rank reaches the synchronisation and the cell is recorded as failed with that timestep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from ..likelihood import nll_bpd
from ..sampler import sample
from ..schedule import NoiseSchedule
from ..seeding import mix_seed
from ..validation import NonFiniteOutputError

__all__ = ["FidCellModule", "NllGroupModule", "block_ranges", "blocks_of_process", "build_eval_trainer",
           "save_image_grid"]


# ------------------------------------------------------------------------------------------------ blocks
def block_ranges(num_items: int, block_size: int) -> list[tuple[int, int, int]]:
    """``(block index j, first item, number of items)`` of the fixed blocks covering ``num_items``."""
    return [(j, s, min(block_size, num_items - s)) for j, s in enumerate(range(0, num_items, block_size))]


def blocks_of_process(blocks: Sequence[Any], rank: int, world_size: int, shard: int = 0,
                      num_shards: int = 1) -> list[Any]:
    """The blocks one process computes: those of its shard (``j % num_shards == shard``), every
    ``world_size``-th of them from ``rank`` on."""
    mine = [b for i, b in enumerate(blocks) if i % num_shards == shard]
    return mine[rank::world_size]


def block_generator(seed: int, block: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(mix_seed(int(seed), "block", int(block)))


class _Items(Dataset):
    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _loader(items: Sequence[Any]) -> DataLoader:
    return DataLoader(_Items(items), batch_size=None, shuffle=False, num_workers=0)


# ------------------------------------------------------------------------------------------------ metrics
class NllSums(Metric):
    """Sums over held-out images of bits/dim (per method) and of each NELBO term; count; first bad timestep."""

    full_state_update = False

    def __init__(self, num_methods: int, num_terms: int, sentinel: int):
        super().__init__()
        self.sentinel = int(sentinel)
        self.add_state("bpd", torch.zeros(num_methods, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("terms", torch.zeros(num_methods, num_terms, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bad_t", torch.full((), self.sentinel, dtype=torch.long), dist_reduce_fx="min")

    def update(self, bpd: Tensor, terms: Tensor, n: int) -> None:
        self.bpd += bpd.to(self.bpd)
        self.terms += terms.to(self.terms)
        self.count += n

    def fail(self, timestep: int) -> None:
        self.bad_t = torch.minimum(self.bad_t, torch.tensor(int(timestep), device=self.bad_t.device))

    def compute(self) -> dict[str, Tensor]:
        return {"bpd": self.bpd, "terms": self.terms, "count": self.count, "bad_t": self.bad_t}


class FirstFailure(Metric):
    """The largest timestep whose network output was not finite (sampling runs from t = N down), or 0."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("bad_t", torch.zeros((), dtype=torch.long), dist_reduce_fx="max")

    def update(self, timestep: int) -> None:
        self.bad_t = torch.maximum(self.bad_t, torch.tensor(int(timestep), device=self.bad_t.device))

    def compute(self) -> Tensor:
        return self.bad_t


# ------------------------------------------------------------------------------------------------ modules
class _EvalModule(LightningModule):
    """Holds the noise predictor (registered when it is a module, so Lightning moves it to the rank's device)."""

    def __init__(self, eps_model: Callable, blocks: Sequence[Any], shard: int, num_shards: int):
        super().__init__()
        if isinstance(eps_model, nn.Module):
            self.eps_model = eps_model
        else:  # a parameter-free predictor (oracle): a plain callable, evaluated where its inputs are
            self._eps_callable = eps_model
        self.blocks, self.shard, self.num_shards = list(blocks), int(shard), int(num_shards)

    def predictor(self) -> Callable:
        return self.eps_model if "eps_model" in self._modules else self._eps_callable

    def test_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        mine = blocks_of_process(self.blocks, rank, world, self.shard, self.num_shards)
        # a process with no block still runs one empty step, so that it reaches the epoch-end synchronisation
        return _loader(mine or [None])


class NllGroupModule(_EvalModule):
    """NELBO (bits/dim) of every DDPM-type method of one (trajectory, K), summed over the held-out blocks.

    ``blocks``: ``(j, images in model space)`` of fixed size; after ``trainer.test`` :attr:`result` holds the
    synced sums (``bpd`` [methods], ``terms`` [methods, K+1], ``count``, ``bad_t``: N+1 when all was finite).
    """

    def __init__(self, eps_model: Callable, schedule: NoiseSchedule, taus: Sequence[int], methods: Sequence[str],
                 gamma: Tensor, nll_options: dict, network_batch: int, seed: int,
                 blocks: Sequence[tuple[int, Tensor]], shard: int = 0, num_shards: int = 1):
        super().__init__(eps_model, blocks, shard, num_shards)
        self.schedule, self.taus, self.methods = schedule, list(taus), list(methods)
        self.gamma, self.nll_options, self.network_batch, self.seed = gamma, dict(nll_options), network_batch, seed
        self.sums = NllSums(len(self.methods), len(self.taus) + 1, sentinel=schedule.N + 1)
        self.result: dict[str, Tensor] | None = None

    def test_step(self, batch, batch_idx):
        if batch is None:
            return
        block, x0 = batch
        if int(self.sums.bad_t) <= self.schedule.N:
            return  # already failed on this rank: the cell is lost, save the time
        x0 = x0.to(self.device)
        try:
            bpd, terms = nll_bpd(self.predictor(), self.schedule, self.taus, x0, self.methods, gamma=self.gamma,
                                 generator=block_generator(self.seed, block, self.device),
                                 batch_size=self.network_batch, return_terms=True, **self.nll_options)
        except NonFiniteOutputError as e:
            self.sums.fail(e.timestep)
            return
        self.sums.update(torch.stack([bpd[m].sum() for m in self.methods]),
                         torch.stack([terms[m].sum(0) for m in self.methods]), x0.shape[0])

    def on_test_epoch_end(self) -> None:
        with self.sums.sync_context():  # the states summed over ranks (compute() would squeeze a single method)
            self.result = {k: getattr(self.sums, k).detach().cpu().clone() for k in ("bpd", "terms", "count", "bad_t")}


@dataclass
class FidCellResult:
    fid: float | None  # None: sharded (see sums) or failed (see bad_t)
    sums: Any  # analytic_dpm.fid.FeatureSums of this job's samples (synced over its ranks)
    count: int
    bad_t: int  # 0 when every network output was finite


class FidCellModule(_EvalModule):
    """FID of one (method, trajectory, K): ``blocks`` are ``(j, number of samples)``; each block is sampled with its
    own generator and fed to ``metric`` (an :class:`~analytic_dpm.fid.InceptionFID` holding the reference)."""

    def __init__(self, eps_model: Callable, schedule: NoiseSchedule, taus: Sequence[int], method: str,
                 gamma: Tensor, metric, sample_shape: Sequence[int], seed: int, blocks: Sequence[tuple[int, int]],
                 *, eta: float = 0.0, clip_x0: bool = True, clip_sigma_y: float | None = None,
                 data_range=(-1.0, 1.0), grid_path: Path | None = None, shard: int = 0, num_shards: int = 1,
                 avg_cov: bool = False):
        super().__init__(eps_model, blocks, shard, num_shards)
        self.schedule, self.taus, self.method, self.gamma = schedule, list(taus), method, gamma
        self.metric, self.failure = metric, FirstFailure()
        self.sample_shape, self.seed = tuple(sample_shape), seed
        self.eta, self.clip_x0, self.clip_sigma_y, self.data_range = eta, clip_x0, clip_sigma_y, data_range
        self.grid_path, self.avg_cov = grid_path, avg_cov
        self.result: FidCellResult | None = None

    def on_test_epoch_start(self) -> None:
        self.metric.reset()  # the reference (real) statistics stay: reset_real_features=False
        self.failure.reset()

    def test_step(self, batch, batch_idx):
        if batch is None:
            return
        block, n = batch
        if int(self.failure.bad_t) > 0:
            return
        try:
            x = sample(self.predictor(), self.schedule, self.taus, self.method, (int(n), *self.sample_shape),
                       gamma=self.gamma, eta=self.eta, clip_x0=self.clip_x0, clip_sigma_y=self.clip_sigma_y,
                       generator=block_generator(self.seed, block, self.device), device=self.device,
                       data_range=self.data_range, **({"avg_cov": True} if self.avg_cov else {}))
        except NonFiniteOutputError as e:
            self.failure.update(e.timestep)
            return
        if int(block) == 0 and self.grid_path is not None:
            save_image_grid(x[:64].cpu(), self.grid_path)
        self.metric.update(x)

    def on_test_epoch_end(self) -> None:
        bad_t = int(self.failure.compute())
        with self.metric.sync_context():
            sums = self.metric.fake_sums()
        fid = None
        if bad_t == 0 and self.num_shards == 1:
            fid = float(self.metric.compute())
        self.result = FidCellResult(fid=fid, sums=sums, count=sums.count, bad_t=bad_t)


def save_image_grid(x: Tensor, path) -> None:
    """Samples in [-1, 1] as a PNG grid (quantised exactly as for FID)."""
    import math

    from torchvision.utils import save_image

    save_image((x.clamp(-1, 1) + 1) / 2, str(path), nrow=int(math.ceil(math.sqrt(len(x)))))


# ------------------------------------------------------------------------------------------------ the trainer
#: keys of a ``trainer=`` config (conf/trainer/*.yaml) that evaluation uses; the training-only ones are ignored
EVAL_TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "enable_progress_bar")


def build_eval_trainer(trainer_cfg: dict | None, *, accelerator: str | None = None):
    """A Lightning ``Trainer`` for the evaluation modules from a ``trainer=`` config (one device, ``trainer=ddp``,
    several nodes; the SLURM launcher wires devices and nodes as for training). Precision is always 32-true:
    the network's precision is ``eval.precision`` (:mod:`analytic_dpm.accel`), not Lightning's autocast."""
    from lightning import Trainer

    cfg = {k: v for k, v in (trainer_cfg or {}).items() if k in EVAL_TRAINER_KEYS and v is not None}
    if accelerator is not None and cfg.get("accelerator", "auto") == "auto":
        cfg["accelerator"] = accelerator
    return Trainer(**cfg, precision="32-true", logger=False, enable_checkpointing=False,
                   enable_model_summary=False, use_distributed_sampler=False, inference_mode=True,
                   num_sanity_val_steps=0)
