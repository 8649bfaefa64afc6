"""InceptionFID (torchmetrics) against the hand-written FID path; reference cache; dtypes; shard sums.

Fast tests use torch-fidelity's Inception with random (He-initialised) weights (tests/conftest.py) and a
handful of small images: the network resizes to 299x299 anyway, so each image costs ~0.1-0.3 s on CPU, and
each 2048-d FID two symmetric eigendecompositions (~1-3 s). The shard tests use 64-d synthetic features.

Tolerances: with n < 2048 images the covariances are rank-deficient, and the ~2048 - n zero eigenvalues of
sqrt(S1) S2 sqrt(S1) come out as float64 noise (~1e-16 of the largest) whose square roots (~1e-8) add up:
two exact-in-theory ways of computing FID on such sets agree to ~1e-7 relative, not better. So Inception-based
FIDs are compared at 1e-6 (and their sums at 1e-14); the full-rank synthetic shard tests check 1e-9.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fid_oracle import StreamingStats, fid_of_stream  # the earlier streaming path: the oracle (tests/helpers)

from analytic_dpm.fid import inception_weights as iw
from analytic_dpm.fid.metrics import FeatureStats, InceptionFeatures, fid_from_stats
from analytic_dpm.fid.sums import FeatureSums, fid_from_sums, load_and_merge, merge_sums
from analytic_dpm.fid.tm import InceptionFID

REPO = Path(__file__).resolve().parents[1]


def _images(seed: int, n: int, size: int = 16) -> torch.Tensor:
    """Smooth random colour images (low-res noise upsampled), uint8 [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8)


def _metric(weights, **kwargs) -> InceptionFID:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", iw.InceptionWeightsWarning)  # random weights: not the expected hash
        return InceptionFID(weights, **kwargs)


@pytest.fixture(scope="module")
def run(random_inception_weights, tmp_path_factory):
    """One reference + one sample stream through both paths (the Inception runs once per image per path)."""
    weights = random_inception_weights
    real, fake = _images(1, 6), _images(2, 8)
    fake_float = fake.float() / 127.5 - 1  # [-1, 1] float input, quantised back to the same uint8
    cache = tmp_path_factory.mktemp("fidtm") / "ref.npz"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", iw.InceptionWeightsWarning)
        old = InceptionFeatures(weights, batch_size=4)
    old_real, old_fake = old(real), old(fake)
    ref_old = StreamingStats.from_features(old_real)
    fid_old = fid_of_stream([fake[:3], fake[3:]], ref_old, old, len(fake), progress=False)

    metric = _metric(weights, batch_size=4)
    metric.reference(real, cache_path=cache, progress=False)
    ran_for_reference = metric.features.num_images
    new_fake = metric.features(fake_float)
    metric.update(fake_float[:2])  # the images path (features + sums) ...
    metric.update(features=new_fake[2:])  # ... and the features path (the Inception runs once per image)
    out = {
        "weights": weights, "real": real, "fake": fake, "cache": cache, "metric": metric,
        "old_real": old_real, "old_fake": old_fake, "new_fake": new_fake, "fid_old": fid_old,
        "fid_new_tensor": metric.compute(), "ran_for_reference": ran_for_reference,
    }  # fmt: skip
    out["fid_new"] = float(out["fid_new_tensor"])
    return out


def test_features_bit_identical_to_torch_fidelity_path(run):
    """antialias=False: torchmetrics' NoTrainInceptionV3 computes exactly torch-fidelity's features."""
    assert run["new_fake"].dtype == torch.float32
    assert torch.equal(run["new_fake"], run["old_fake"])
    assert run["ran_for_reference"] == len(run["real"])


def test_fid_equals_old_path_on_same_images(run):
    """Same images -> bit-identical features, so this is also "compute() == fid_from_stats on the same features"
    (fid_of_stream is fid_from_stats of the features' centred float64 statistics)."""
    assert np.isfinite(run["fid_old"]) and run["fid_old"] > 0
    assert run["fid_new_tensor"].dtype == torch.float64 and run["fid_new_tensor"].shape == ()
    assert run["fid_new"] == pytest.approx(run["fid_old"], rel=1e-6)  # rank-deficient: module docstring
    assert int(run["metric"].fake_features_num_samples) == len(run["fake"])


def test_update_with_features_equals_images_path(run):
    """update(features=...) adds the same float64 sums as update(images); they give np.mean/np.cov exactly."""
    f_fake = run["new_fake"].double().numpy()
    cov_fake = np.cov(f_fake, rowvar=False)
    metric = _metric(run["weights"])
    metric.update(features=run["new_fake"][:3])
    metric.update(features=run["new_fake"][3:])
    assert metric.features.num_images == 0
    mine, theirs = metric.fake_sums(), run["metric"].fake_sums()
    assert mine.count == theirs.count == len(f_fake)
    # (1e-6: the images path ran its first 2 images as a batch of 2, and CPU convolutions may round differently
    # for another batch size)
    torch.testing.assert_close(mine.total, theirs.total, rtol=1e-6, atol=0)
    torch.testing.assert_close(mine.outer, theirs.outer, rtol=1e-6, atol=1e-6 * float(theirs.outer.abs().max()))
    # raw sums and centred (Chan) updates give the same covariance
    np.testing.assert_allclose(mine.cov, cov_fake, rtol=0, atol=1e-12 * np.abs(cov_fake).max())
    np.testing.assert_allclose(mine.mean, f_fake.mean(0), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        metric.update()
    with pytest.raises(ValueError, match="2048"):
        metric.update(features=torch.zeros(2, 64))
    with pytest.raises(RuntimeError, match="reference"):
        metric.compute()  # no reference loaded


def test_reference_cache_reused_without_inception(run):
    first = run["metric"].real_sums()
    meta = FeatureStats.load(run["cache"]).metadata
    assert meta["num_images"] == len(run["real"]) and meta["weights"] == run["metric"].weights_id

    other = _metric(run["weights"])
    stats = other.reference(run["real"], cache_path=run["cache"], progress=False)
    assert other.features.num_images == 0  # read from the cache
    assert stats.count == len(run["real"])
    again = other.real_sums()
    assert again.count == first.count
    torch.testing.assert_close(again.total, first.total, rtol=0, atol=0)
    np.testing.assert_allclose(again.cov, first.cov, rtol=0, atol=1e-13 * np.abs(first.cov).max())
    # reset() keeps the reference (reset_real_features=False), drops the samples
    other.update(features=run["new_fake"])
    other.reset()
    assert int(other.fake_features_num_samples) == 0 and int(other.real_features_num_samples) == len(run["real"])

    foreign = StreamingStats.from_features(run["old_real"], {"weights": "sha256:" + "0" * 64})
    with pytest.raises(ValueError, match="other|weights"):
        other.load_reference(foreign)


def test_float64_states_float32_network(run):
    metric = _metric(run["weights"])

    def dtypes(m):
        states = {k: getattr(m, k).dtype for k in m._defaults}
        return states, {p.dtype for p in m.inception.parameters()}

    states, net = dtypes(metric)
    assert net == {torch.float32}
    assert states == {
        "real_features_sum": torch.float64, "real_features_cov_sum": torch.float64,
        "real_features_num_samples": torch.int64, "fake_features_sum": torch.float64,
        "fake_features_cov_sum": torch.float64, "fake_features_num_samples": torch.int64,
    }  # fmt: skip
    # casts that would round the weights or the sums are refused or reduced to device moves
    metric.to(torch.float16)
    metric.to(torch.bfloat16)
    metric.half()
    metric.set_dtype(torch.float64)
    assert dtypes(metric) == (states, net)
    with pytest.raises(ValueError, match="float64"):
        metric.set_dtype(torch.float32)
    # the weights were not rounded on the way: features still bit-identical to the old path
    assert torch.equal(metric.features(run["fake"][:1]), run["old_fake"][:1])
    with pytest.raises(TypeError, match="antialias"):
        _metric(run["weights"], antialias=True)


def test_missing_or_unsafe_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="make fid-weights"):
        InceptionFID(tmp_path / "nope.pth")

    class Evil:  # a pickle that would run code under weights_only=False
        def __reduce__(self):
            return (print, ("pickled code ran",))

    bad = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(ValueError, match="weights_only"):
        InceptionFID(bad)
    with pytest.raises(ValueError, match="weights_only"):
        InceptionFeatures(bad)


# ---------------------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------------------


def _feats(n=100, d=64, seed=0):
    rng = np.random.default_rng(seed)
    # non-negative, mean ~ spread, like Inception pool features
    return np.abs(rng.standard_normal((n, d)) * 0.3 + 0.3).astype(np.float32)


@pytest.mark.parametrize("sizes", [[100], [50, 50], [1, 2, 3, 94], [37, 0, 63], [13] * 7 + [9]])
def test_shard_sums_merge_to_one_pass(sizes, tmp_path):
    feats = _feats()
    ref = StreamingStats.from_features(_feats(seed=1))
    one = FeatureSums.from_features(feats)
    n = len(sizes)
    paths, start = [], 0
    for i, s in enumerate(sizes):
        part = FeatureSums.from_features(feats[start : start + s], {"shard": i, "num_shards": n, "cell": "a"})
        start += s
        paths.append(part.save(tmp_path / f"shard{i}.npz"))
    assert not list(tmp_path.glob("*.tmp"))
    merged = load_and_merge(reversed(paths))  # any order
    assert merged.count == 100 and merged.metadata == {"num_shards": n, "cell": "a", "shards": list(range(n))}
    torch.testing.assert_close(merged.total, one.total, rtol=1e-14, atol=0)
    torch.testing.assert_close(merged.outer, one.outer, rtol=1e-14, atol=0)
    f64 = feats.astype(np.float64)
    np.testing.assert_allclose(merged.cov, np.cov(f64, rowvar=False), rtol=0, atol=1e-13)
    np.testing.assert_allclose(merged.mean, f64.mean(0), rtol=1e-14)
    assert fid_from_sums(merged, ref) == pytest.approx(fid_from_sums(one, ref), rel=1e-9, abs=1e-12)


def test_merge_checks_shards(tmp_path):
    feats = _feats()

    def part(i, n=3, **meta):
        return FeatureSums.from_features(feats[i * 10 : (i + 1) * 10], {"shard": i, "num_shards": n, **meta})

    with pytest.raises(ValueError, match=r"shard\(s\) \[1\] of 3 missing"):
        merge_sums([part(0), part(2)])
    assert merge_sums([part(0), part(2)], require_complete=False).count == 20
    with pytest.raises(ValueError, match="more than once"):
        merge_sums([part(0), part(0), part(1), part(2)])
    with pytest.raises(ValueError, match="weights"):
        merge_sums([part(0, weights="a"), part(1, weights="b"), part(2, weights="a")])
    with pytest.raises(ValueError, match="outside"):
        merge_sums([part(0), part(1), part(2), part(5)])
    with pytest.raises(ValueError, match="nothing"):
        merge_sums([])

    # files: loaded without pickle; anything else is refused with a clear error
    evil = tmp_path / "evil.npz"
    np.savez(evil, format=np.array(["x", None], dtype=object), total=np.zeros(2))
    with pytest.raises(ValueError, match="not a FeatureSums file"):
        FeatureSums.load(evil)
    other = tmp_path / "stats.npz"
    StreamingStats.from_features(feats).save(other)
    with pytest.raises(ValueError, match="not a FeatureSums file"):
        FeatureSums.load(other)
    p = part(1).save(tmp_path / "ok.npz")
    back = FeatureSums.load(p)
    assert back.metadata == {"shard": 1, "num_shards": 3} and back.count == 10
    with np.load(p, allow_pickle=False) as z:
        assert json.loads(str(z["metadata"]))["shard"] == 1


def test_metric_shards_equal_one_pass(run, tmp_path):
    """Three jobs each update their shard and save fake_sums; merged into a fresh metric: same FID."""
    feats = run["new_fake"]
    ref = FeatureStats.load(run["cache"])
    paths = []
    for i, (a, b) in enumerate([(0, 1), (1, 6), (6, 8)]):  # uneven
        job = _metric(run["weights"])
        job.update(features=feats[a:b])
        paths.append(job.fake_sums({"shard": i, "num_shards": 3}).save(tmp_path / f"s{i}.npz"))
    merged = load_and_merge(paths)
    assert merged.metadata["weights"] == run["metric"].weights_id

    one = FeatureSums.from_features(feats)  # what one job's single update(features=feats) adds
    assert merged.count == one.count
    torch.testing.assert_close(merged.total, one.total, rtol=1e-14, atol=0)
    torch.testing.assert_close(merged.outer, one.outer, rtol=1e-14, atol=1e-14 * float(one.outer.abs().max()))

    fresh = _metric(run["weights"])
    fresh.load_reference(ref)
    fresh.add_fake_sums(merged)
    value = float(fresh.compute())
    assert value == pytest.approx(run["fid_new"], rel=1e-6)  # rank-deficient: module docstring
    with pytest.raises(ValueError, match="weights"):
        fresh.add_fake_sums(FeatureSums(merged.total, merged.outer, merged.count, {"weights": "sha256:x"}))


@pytest.mark.slow
def test_full_rank_2048_shards_fid_to_1e9(tmp_path):
    """With more samples than dimensions (full rank, as for real 10k-50k sets) merged shards give the
    one-pass FID to float64 rounding."""
    feats, ref = _feats(2300, 2048, seed=3), StreamingStats.from_features(_feats(2300, 2048, seed=4))
    one = FeatureSums.from_features(feats)
    parts = [FeatureSums.from_features(feats[a:b], {"shard": i, "num_shards": 3})
             for i, (a, b) in enumerate([(0, 700), (700, 701), (701, 2300)])]  # fmt: skip
    merged = load_and_merge([p.save(tmp_path / f"{i}.npz") for i, p in enumerate(parts)])
    assert fid_from_sums(merged, ref) == pytest.approx(fid_from_sums(one, ref), rel=1e-9)
    assert fid_from_sums(one, ref) == pytest.approx(
        fid_from_stats(
            feats.astype(np.float64).mean(0), np.cov(feats.astype(np.float64), rowvar=False), ref.mean, ref.cov
        ),
        rel=1e-9,
    )


# ---------------------------------------------------------------------------------------------------------
# real weights (slow)
# ---------------------------------------------------------------------------------------------------------


def _cifar_jpeg(split: str, n: int) -> torch.Tensor | None:
    import io

    path = Path("/work/shared/data/cifar10/jpeg_q75.npz")
    if not path.is_file():
        return None
    from PIL import Image

    with np.load(path, allow_pickle=False) as z:
        h, b, o = z[f"{split}_header"].tobytes(), z[f"{split}_bodies"].tobytes(), z[f"{split}_offsets"]
        imgs = [np.asarray(Image.open(io.BytesIO(h + b[o[i] : o[i + 1]])).convert("RGB")) for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.slow
def test_real_weights_antialias_is_the_difference():
    """Real weights: ours == torchmetrics with antialias=False (its own eigvals formula, 1e-6); its default
    antialias=True resize changes the features by percents and the FID visibly."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    weights = REPO / iw.DEFAULT_WEIGHTS_PATH
    if not weights.is_file():
        pytest.skip(f"no {weights}: run `make fid-weights`")
    real, fake = _cifar_jpeg("train", 12), _cifar_jpeg("test", 12)
    if real is None:
        real, fake = _images(1, 12, 32), _images(2, 12, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", iw.InceptionWeightsWarning)  # the file must have the recorded hash
        ours = InceptionFID(weights, batch_size=12)
    ours.update(real, real=True)
    ours.update(fake)
    values = {}
    for aa in (False, True):
        tm = FrechetInceptionDistance(feature_extractor_weights_path=str(weights), antialias=aa)
        tm.update(real, real=True)
        tm.update(fake, real=False)
        values[aa] = float(tm.compute())
        if not aa:
            torch.testing.assert_close(tm.fake_features_sum, ours.fake_features_sum, rtol=1e-12, atol=0)
    value = float(ours.compute())
    assert value == pytest.approx(values[False], rel=1e-6)
    assert abs(values[True] - value) > 1e-4 * value
