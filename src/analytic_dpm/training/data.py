"""Reproducible training batches: the data order is a pure function of ``(seed, batch number)``.

The training stream is an endless sequence of passes over the training set ("data epochs"). Data epoch
``e`` is a permutation of the set drawn from a generator seeded with ``(seed, e)``, together with the
random horizontal flips of that pass; batch ``g`` (``g = 0, 1, ...`` counted over the whole run) is the
``g mod P``-th block of ``batch_size * world_size`` examples of data epoch ``g // P`` (``P`` blocks per pass,
the incomplete last block is dropped), and rank ``r`` of a DDP run takes the ``r``-th ``batch_size`` slice
of that block.

A new iterator starts at the batch number returned by ``start_fn`` (the module's count of trained
batches, saved in checkpoints), read lazily when the first batch is requested. Resuming from any
checkpoint, mid-epoch included, therefore continues with exactly the batches an uninterrupted run would
have seen, whatever Lightning does with samplers, epochs and prefetching. A Lightning "epoch" can be
shorter than a pass (``trainer.limit_train_batches``): the next epoch simply continues the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..seeding import mix_seed

log = logging.getLogger(__name__)

__all__ = ["PlannedBatchDataset", "ReproducibleDataModule", "StreamBatchSampler", "StreamDataLoader"]


class StreamBatchSampler(Sampler):
    """Yields ``(indices, flips)`` plans for :class:`PlannedBatchDataset`; ``len`` = blocks per data epoch."""

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        flip: bool = False,
        rank: int = 0,
        world_size: int = 1,
        start_fn: Callable[[], int] | None = None,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size/rank/world_size: {batch_size}, {rank}, {world_size}")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.block = self.batch_size * int(world_size)
        self.per_epoch = self.num_items // self.block
        if self.per_epoch == 0:
            raise ValueError(
                f"batch_size {batch_size} x {world_size} process(es) exceeds the {num_items} training examples"
            )
        self.seed = int(seed)
        self.flip = bool(flip)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_fn = start_fn
        self._cached: tuple[int, Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return self.per_epoch

    def plan_epoch(self, epoch: int) -> tuple[Tensor, Tensor]:
        """(permutation, flip mask) of data epoch ``epoch``."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1], self._cached[2]
        g = torch.Generator().manual_seed(mix_seed(self.seed, "data-epoch", epoch))
        perm = torch.randperm(self.num_items, generator=g)
        flips = torch.rand(self.num_items, generator=g) < 0.5 if self.flip else torch.zeros(self.num_items, dtype=bool)
        self._cached = (epoch, perm, flips)
        return perm, flips

    def batch(self, number: int) -> tuple[Tensor, Tensor]:
        """The plan of batch ``number`` (counted from the start of training) on this rank."""
        epoch, j = divmod(int(number), self.per_epoch)
        perm, flips = self.plan_epoch(epoch)
        lo = j * self.block + self.rank * self.batch_size
        return perm[lo : lo + self.batch_size], flips[lo : lo + self.batch_size]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        start = int(self.start_fn()) if self.start_fn is not None else 0
        for k in range(self.per_epoch):
            yield self.batch(start + k)


class PlannedBatchDataset(Dataset):
    """An in-memory tensor ``[N, ...]`` fetched one planned batch at a time (``__getitems__``)."""

    def __init__(self, data: Tensor):
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.data[index]

    def __getitems__(self, plan: tuple[Tensor, Tensor]) -> Tensor:
        idx, flip = plan
        x = self.data[idx]
        if bool(flip.any()):
            x[flip] = x[flip].flip(-1)  # x is a fresh copy (fancy indexing)
        return x


def _identity(batch):
    return batch


class StreamDataLoader(DataLoader):
    """A DataLoader over :class:`StreamBatchSampler`. It is "stateful" for Lightning (so resuming mid-epoch
    is not flagged as unreliable), but its position is the module's batch count, restored with the module."""

    def state_dict(self) -> dict:
        s = self.batch_sampler
        return {"seed": s.seed, "batch_size": s.batch_size, "world_size": s.world_size, "num_items": s.num_items}

    def load_state_dict(self, state: dict) -> None:
        s = self.batch_sampler
        if (state.get("batch_size"), state.get("world_size"), state.get("num_items")) != (
            s.batch_size, s.world_size, s.num_items,
        ):
            log.warning("resuming with a different batch size / world size / training set (%s -> %s): the data "
                        "order after resuming differs from an uninterrupted run", state, self.state_dict())


class ReproducibleDataModule(LightningDataModule):
    """Wraps one of :mod:`analytic_dpm.data`'s datamodules and replaces its training loader by the stream.

    Everything else (setup, the held-out loaders, ``train_pool``, ``heldout``, ``flip``, ``data_range``, ...)
    is the wrapped datamodule's, available as attributes of the wrapper or as :attr:`inner`.
    """

    def __init__(self, inner: LightningDataModule, seed: int):
        super().__init__()
        self.inner = inner
        self.seed = int(seed)
        self.start_fn: Callable[[], int] | None = None

    def __getattr__(self, name: str):
        # only reached for attributes the wrapper lacks; never forward private / dunder names
        if name.startswith("_") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def prepare_data(self) -> None:
        self.inner.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.inner.setup(stage)

    def teardown(self, stage: str | None = None) -> None:
        self.inner.teardown(stage)

    def _start(self) -> int:
        if self.start_fn is not None:
            return int(self.start_fn())
        trainer = self.trainer
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        return int(getattr(module, "batches_trained", 0))

    def train_dataloader(self) -> DataLoader:
        data = self.inner.train_pool(None)  # the stored tensor, not a copy
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        sampler = StreamBatchSampler(
            data.shape[0], self.inner.batch_size, self.seed, flip=getattr(self.inner, "flip", False),
            rank=rank, world_size=world, start_fn=self._start,
        )
        workers = int(getattr(self.inner, "num_workers", 0))
        return StreamDataLoader(
            PlannedBatchDataset(data),
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=_identity,
            pin_memory=bool(getattr(self.inner, "pin_memory", False)) and torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def __repr__(self) -> str:
        return f"ReproducibleDataModule({self.inner!r}, seed={self.seed})"
