"""Processes racing for one cached result (tests/test_compute_once.py): each records in ``log`` when it computed."""

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))


def _note(log: str, text: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{text} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


class SlowFeatures:
    """Stands in for the Inception: 4-d features of the images' first pixels, 3 s for the first batch."""

    weights_id = "test-weights"
    name = "slow-features:4"
    batch_size = 8

    def __init__(self, log: str):
        self.log, self.calls = log, 0

    def __call__(self, batch):
        if self.calls == 0:
            _note(self.log, "computed")
            time.sleep(3.0)
        self.calls += 1
        return batch.reshape(batch.shape[0], -1)[:, :4].double()


def reference(cache: str, log: str, out: str) -> None:
    from analytic_dpm.fid.metrics import reference_stats

    images = torch.arange(16 * 3 * 4 * 4, dtype=torch.float64).reshape(16, 3, 4, 4).remainder(7)
    stats = reference_stats(images / 7, cache_path=cache, features=SlowFeatures(log), progress=False)
    torch.save({"mean": torch.as_tensor(stats.mean), "cov": torch.as_tensor(stats.cov)}, out)


class SlowOracle(torch.nn.Module):
    """eps = 0.5 x, 3 s at the first call."""

    def __init__(self, log: str):
        super().__init__()
        self.log, self.calls = log, 0

    def forward(self, x, t):
        if self.calls == 0:
            _note(self.log, "computed")
            time.sleep(3.0)
        self.calls += 1
        return 0.5 * x


def gamma(cache_dir: str, log: str, out: str) -> None:
    from analytic_dpm.data import GaussianDataModule
    from analytic_dpm.evaluation.gammas import cached_gamma
    from analytic_dpm.evaluation.settings import EvalSettings
    from analytic_dpm.schedule import NoiseSchedule

    dm = GaussianDataModule(dim_shape=(1, 4, 4), num_train=64, num_test=8, seed=0)
    dm.setup("fit")
    s = EvalSettings.from_config({"K": [5], "trajectory": ["even"], "method": ["analytic_ddpm"],
                                  "gamma_cache": cache_dir, "calibration": {"num_samples": 2, "batch_size": 20}})
    g, _ = cached_gamma(SlowOracle(log), NoiseSchedule.linear(50), dm, s, "cpu", {"model": "slow-oracle"})
    torch.save(g, out)


class SlowNoteOracle(torch.nn.Module):
    """The exact Gaussian predictor, 1 s per call (a cell takes seconds), noting each (timestep, K) job it starts."""

    def __init__(self, log: str, oracle):
        super().__init__()
        self.log, self.oracle = log, oracle

    def forward(self, x, t):
        time.sleep(0.2)
        return self.oracle(x, t)


def grid(run_dir: str, log: str, out: str) -> None:
    """A small oracle grid into ``run_dir``; every NLL group / FID cell this process computes is noted in ``log``."""
    from analytic_dpm.evaluation import EvalContext, GridRunner, ResultStore, plan_cells
    from analytic_dpm.evaluation.provenance import run_identity
    from analytic_dpm.evaluation.settings import EvalSettings
    from analytic_dpm.oracles import GaussianOracle
    from analytic_dpm.schedule import NoiseSchedule

    sched = NoiseSchedule.linear(50)
    oracle = GaussianOracle(sched, 0.0, 0.5, (1, 4, 4))
    s = EvalSettings.from_config({"K": [2, 3, 5], "trajectory": ["even"], "method": ["ddpm_beta", "analytic_ddpm"],
                                  "metrics": ["nll"], "nll": {"num_images": 8, "batch_size": 8}})
    heldout = oracle.sample_data(8, torch.Generator().manual_seed(1))
    ctx = EvalContext(eps_model=SlowNoteOracle(log, oracle), schedule=sched, gamma=oracle.gamma(), gamma_M=None,
                      dataset="toy", data_range=None, heldout=lambda n: heldout, num_heldout=8,
                      sample_shape=(1, 4, 4), device=torch.device("cpu"), is_image=False,
                      nll_options=dict(decoder="continuous", decoder_variance="method", clip_x0=False,
                                       data_range=None))
    ctx.identity = run_identity(s, model_id="toy", model_step=None, gamma=ctx.gamma, gamma_M=None, dataset="toy")
    runner = GridRunner(ctx, ResultStore(run_dir), s)
    original = runner._nll_group

    def noted(cells):
        _note(log, f"computed nll K={cells[0].K}")
        original(cells)

    runner._nll_group = noted
    runner.run(plan_cells(s.method, s.trajectory, s.K, sched.N))
    torch.save({(r["method"], r["K"]): r["nll_bpd"] for r in ResultStore(run_dir).rows}, out)


if __name__ == "__main__":
    {"reference": reference, "gamma": gamma, "grid": grid}[sys.argv[1]](*sys.argv[2:])
