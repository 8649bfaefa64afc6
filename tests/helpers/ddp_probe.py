"""A Lightning callback that records, per rank, what a DDP training run saw and ended with (tests/test_ddp.py).

Importable by the training processes the tests start (``PYTHONPATH`` includes ``tests/helpers``), so the probe
runs inside the real ``train.py`` under the real DDP strategy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from lightning import Callback


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RankProbe(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.rows: list[list[str]] = []  # per training batch: sha256 of each example this rank trained on

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.rows.append([hashlib.sha256(r.cpu().numpy().tobytes()).hexdigest()[:16] for r in x])

    def on_train_end(self, trainer, pl_module):
        gamma = pl_module.gamma
        record = {
            "rank": trainer.global_rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
            "rows": self.rows,
            "weights": _digest(pl_module.eps_model.parameters()),
            "ema": _digest(pl_module.ema_model.parameters()),
            "gamma": None if gamma is None else _digest([torch.as_tensor(gamma)]),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}-{trainer.global_step}.json").write_text(json.dumps(record))
