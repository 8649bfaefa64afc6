import sys
from pathlib import Path

import pytest
import torch

# tests/helpers: the oracles and helper scripts the tests import (e.g. fid_oracle)
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Keep the fast suite reproducible and polite on 2-core CI machines.
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A state dict of torch-fidelity's FID Inception architecture with random weights (no download).

    He-initialised convolutions keep activations O(1) through ~50 layers, so features are finite and varied.
    """
    from analytic_dpm.fid import inception_weights as iw

    model = iw.inception_skeleton()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A 4-step run of the tiny training config (tests/test_training.py) with Gamma in its checkpoint."""
    from test_training import make_cfg

    from analytic_dpm.training import train

    run_dir = tmp_path_factory.mktemp("train") / "run"
    train(make_cfg(run_dir))
    return run_dir / "checkpoints" / "last.ckpt"
