import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Keep the fast suite reproducible and polite on 2-core CI machines.
    torch.set_num_threads(2)
    yield
