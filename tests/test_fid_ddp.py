"""InceptionFID under DDP: 2 processes, gloo backend, CPU. Synced FID == single-process FID.

Each rank loads the same cached reference and updates with its (uneven) share of the samples; torchmetrics
all-gathers the fake sums at compute(). The reference is taken once, not added world_size times, and ranks
holding different references raise together instead of hanging.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from analytic_dpm.fid import inception_weights as iw
from analytic_dpm.fid.metrics import FeatureStats
from analytic_dpm.fid.sums import FeatureSums
from analytic_dpm.fid.tm import InceptionFID

WORLD = 2
SHARES = [(0, 4), (4, 7)]  # uneven: 4 and 3 images


def _images(seed: int, n: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8)


def _metric(weights) -> InceptionFID:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", iw.InceptionWeightsWarning)  # random weights: not the expected hash
        return InceptionFID(weights, batch_size=4)


def _worker(rank: int, init_file: str, weights: str, images_path: str, ref_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        images = torch.load(images_path, weights_only=True)
        metric = _metric(weights)
        metric.load_reference(ref_path)
        lo, hi = SHARES[rank]
        feats = metric.features(images[lo:hi])
        metric.update(features=feats[:1])
        metric.update(features=feats[1:])
        local = metric.fake_sums()
        value = metric.compute()
        with metric.sync_context():
            synced, real = metric.fake_sums(), metric.real_sums()
        after = metric.fake_sums()  # unsynced again: this rank's sums

        # ranks with different references: every rank raises, none hangs
        ref = FeatureStats.load(ref_path)
        if rank == 1:
            ref._mean = ref._mean + 1e-3
        metric.load_reference(ref)
        try:
            metric.compute()
            mismatch = "no error"
        except RuntimeError as e:
            mismatch = str(e)
        torch.save(
            {
                "features": feats,
                "fid": value,
                "local_count": local.count,
                "after_count": after.count,
                "synced_total": synced.total,
                "synced_outer": synced.outer,
                "synced_count": synced.count,
                "real_count": real.count,
                "real_total": real.total,
                "mismatch": mismatch,
            },  # fmt: skip
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_process_fid_equals_single_process(random_inception_weights, tmp_path):
    weights = str(random_inception_weights)
    images = _images(3, SHARES[-1][1])
    images_path = tmp_path / "images.pt"
    torch.save(images, images_path)

    single = _metric(weights)
    rng = np.random.default_rng(0)  # a full-rank reference (mean, diagonal covariance); provenance irrelevant
    n, mu, var = 3000, rng.uniform(0.1, 0.5, iw.FEATURE_DIM), rng.uniform(0.01, 0.1, iw.FEATURE_DIM)
    ref = FeatureSums(
        n * mu, (n - 1) * np.diag(var) + n * np.outer(mu, mu), n, {"weights": single.weights_id, "num_images": n}
    ).to_feature_stats()
    ref_path = tmp_path / "ref.npz"
    ref.save(ref_path)
    single.load_reference(ref_path)
    feats = single.features(images)
    single.update(features=feats)
    expected = float(single.compute())
    one = single.fake_sums()

    mp.spawn(
        _worker,
        args=(str(tmp_path / "init"), weights, str(images_path), str(ref_path), str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r, out in enumerate(outs):
        lo, hi = SHARES[r]
        torch.testing.assert_close(out["features"], feats[lo:hi], rtol=1e-6, atol=1e-6)  # same features
        assert out["local_count"] == out["after_count"] == hi - lo
        assert out["synced_count"] == len(images)
        torch.testing.assert_close(out["synced_total"], one.total, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["synced_outer"], one.outer, rtol=1e-6, atol=1e-6)
        # the reference is taken once (plain torchmetrics would add WORLD copies of it)
        assert out["real_count"] == ref.count
        torch.testing.assert_close(out["real_total"], torch.from_numpy(ref.mean) * ref.count, rtol=1e-12, atol=0)
        assert out["fid"].dtype == torch.float64
        assert float(out["fid"]) == pytest.approx(expected, rel=1e-6)
        assert "differ between ranks" in out["mismatch"]
    assert float(outs[0]["fid"]) == float(outs[1]["fid"])
