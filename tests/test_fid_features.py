"""Inception speed options (issue 9, "FID features"): precision (fp32 | tf32 | bf16), channels_last, their identity
in names, reference caches and ``fid_id``, the ``eval.fid`` settings, and ``bench/bench_fid.py features``.

CPU only, with torch-fidelity's Inception and random (He-initialised) weights (tests/conftest.py): each 16x16 image is
resized to 299x299 inside the network and costs ~0.1 s, so every test runs a handful of images. What the options do to
speed and to the real FID is measured on a GPU by ``bench/bench_fid.py features``; no timing is asserted here.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from fid_oracle import StreamingStats  # the earlier streaming statistics: the oracle (tests/helpers)
from PIL import Image

from analytic_dpm.accel import _read_tf32
from analytic_dpm.evaluation.settings import EvalSettings, SettingsError
from analytic_dpm.fid import inception_weights as iw
from analytic_dpm.fid.metrics import (
    FeatureStats,
    InceptionFeatures,
    feature_extractor_name,
    feature_options_id,
    reference_stats,
)
from analytic_dpm.fid.tm import InceptionFID
from analytic_dpm.identity import digest_json, short

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NAME = "inception-v3-compat:2048"  # what every existing cache and shard records


def _images(seed: int, n: int, size: int = 16) -> torch.Tensor:
    """Smooth random colour images (low-res noise upsampled), uint8 [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", iw.InceptionWeightsWarning)  # random weights: not the recorded hash
        return fn(*args, **kwargs)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).norm(dim=1) / b.double().norm(dim=1)).max())


class _Tiny(torch.nn.Module):
    """A stand-in network (cheap): 2048 features per image, or an error when ``fail``."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2048, kernel_size=1)
        self.fail = fail

    def forward(self, x):
        if self.fail:
            raise RuntimeError("boom")
        return self.conv(x.float()).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def feats(random_inception_weights):
    """The same 3 images through every option (one shared network for the options that do not change it)."""
    weights = random_inception_weights
    x = _images(3, 3)
    fp32 = _quiet(InceptionFeatures, weights, batch_size=4)
    out = {"weights": weights, "x": x, "fp32": fp32, "f_fp32": fp32(x)}
    for precision in ("tf32", "bf16"):
        ext = InceptionFeatures(weights, batch_size=4, precision=precision, check_hash=False, model=fp32.model)
        out[f"f_{precision}"] = ext(x)
        out[precision] = ext
    cl = _quiet(InceptionFeatures, weights, batch_size=4, channels_last=True)  # its own network: converted in place
    out["cl"], out["f_cl"] = cl, cl(x)
    return out


# ------------------------------------------------------------------------------------------- numbers
def test_bf16_reaches_the_network_and_stays_close(feats):
    """bf16 autocast really runs the convolutions in bfloat16: the features differ from fp32, but by little. Measured
    with these random weights and images: max relative L2 1.4e-2 (8 mantissa bits through ~50 layers); tolerance 3e-2.
    The real weights on the GPU are what ``bench_fid.py features`` measures."""
    f32, f16 = feats["f_fp32"], feats["f_bf16"]
    assert f16.dtype == torch.float32 and f16.shape == f32.shape == (3, 2048)
    assert not torch.equal(f16, f32)
    assert _rel_l2(f16, f32) < 3e-2
    assert next(feats["fp32"].model.parameters()).dtype == torch.float32  # autocast only: weights untouched


def test_channels_last_same_features(feats):
    """Other convolution kernels, same numbers up to float32 rounding (measured: 3.3e-7 relative L2; tolerance 1e-5)."""
    conv = feats["cl"].model.Conv2d_1a_3x3.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert feats["f_cl"].dtype == torch.float32
    assert _rel_l2(feats["f_cl"], feats["f_fp32"]) < 1e-5


def test_tf32_on_cpu_equals_fp32(feats):
    assert torch.equal(feats["f_tf32"], feats["f_fp32"])


def test_switches_and_autocast_restored_also_after_an_error(feats):
    """The TF32 switches and the autocast state are the same after a call as before it, whatever the option, also when
    the network raises; an outer autocast does not reach an fp32 extractor."""
    before_cudnn, before_matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False  # both away from their defaults on purpose
    torch.set_float32_matmul_precision("high")
    try:
        state = _read_tf32()
        for precision in ("fp32", "tf32", "bf16"):
            for fail in (False, True):
                ext = InceptionFeatures(None, precision=precision, model=_Tiny(fail))
                if fail:
                    with pytest.raises(RuntimeError, match="boom"):
                        ext(feats["x"][:1])
                else:
                    ext(feats["x"][:1])
                assert _read_tf32() == state, (precision, fail)
                assert not torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = feats["fp32"](feats["x"][:2])
            assert torch.is_autocast_enabled("cpu")
        assert torch.equal(inside, feats["f_fp32"][:2])
    finally:
        torch.backends.cudnn.allow_tf32 = before_cudnn
        torch.set_float32_matmul_precision(before_matmul)


# ------------------------------------------------------------------------------------------- identity
def test_options_id_and_name():
    assert feature_options_id() == "" and feature_extractor_name() == DEFAULT_NAME
    assert [feature_options_id(p, cl) for p in ("fp32", "tf32", "bf16") for cl in (False, True)] == [
        "", "fp32+cl", "tf32", "tf32+cl", "bf16", "bf16+cl"]
    default = InceptionFeatures(None, model=_Tiny())
    assert default.options_id == "" and default.name == DEFAULT_NAME and not default.allow_tf32
    bf16 = InceptionFeatures(None, model=_Tiny(), precision="bf16")
    assert bf16.name == DEFAULT_NAME + ":bf16"
    old = InceptionFeatures(None, model=_Tiny(), allow_tf32=True)  # the older argument = precision="tf32"
    assert old.precision == "tf32" and old.allow_tf32 and old.name == DEFAULT_NAME + ":tf32"
    assert InceptionFeatures(None, model=_Tiny(), precision="tf32", allow_tf32=True).precision == "tf32"
    with pytest.raises(ValueError, match="allow_tf32"):
        InceptionFeatures(None, model=_Tiny(), precision="bf16", allow_tf32=True)
    with pytest.raises(ValueError, match="allow_tf32"):  # an explicit fp32 is told apart from the default
        InceptionFeatures(None, model=_Tiny(), precision="fp32", allow_tf32=True)
    with pytest.raises(ValueError, match="fp32.*tf32.*bf16"):
        InceptionFeatures(None, model=_Tiny(), precision="fp16")
    with pytest.raises(ValueError, match="channels_last"):
        InceptionFeatures(None, model=_Tiny(), channels_last="yes")


def test_reference_cache_recomputed_for_other_options(feats, tmp_path):
    """A cache written with fp32 features is recomputed (not reused) for bf16, and the other way round."""
    x, cache = feats["x"][:2], tmp_path / "ref.npz"
    fp32, bf16 = feats["fp32"], feats["bf16"]
    reference_stats(x, cache_path=cache, features=fp32, progress=False)
    assert FeatureStats.load(cache).metadata["feature_extractor"] == DEFAULT_NAME
    for ext, name in ((bf16, DEFAULT_NAME + ":bf16"), (fp32, DEFAULT_NAME)):
        ran = ext.num_images
        with pytest.warns(UserWarning, match="feature_extractor"):
            stats = reference_stats(x, cache_path=cache, features=ext, progress=False)
        assert ext.num_images == ran + 2  # recomputed
        assert FeatureStats.load(cache).metadata["feature_extractor"] == stats.metadata["feature_extractor"] == name
    ran = fp32.num_images
    reference_stats(x, cache_path=cache, features=fp32, progress=False)
    assert fp32.num_images == ran  # same options: reused
    # without an extractor, the default one would be built: its name is the default name (reused here)
    assert reference_stats(x, feats["weights"], cache, progress=False).metadata["feature_extractor"] == DEFAULT_NAME


def test_inception_fid_passes_the_options(feats):
    metric = _quiet(InceptionFID, feats["weights"], batch_size=4, precision="bf16", channels_last=True)
    assert metric.extractor_name == metric.features.name == DEFAULT_NAME + ":bf16+cl"
    assert metric.options_id == "bf16+cl" and metric.features.channels_last
    metric.to(torch.float64)  # dtype casts keep the float32 network; the memory format stays
    weight = metric.inception.Conv2d_1a_3x3.conv.weight
    assert weight.dtype == torch.float32 and weight.is_contiguous(memory_format=torch.channels_last)
    f = metric.features(feats["x"])
    assert f.dtype == torch.float32 and not torch.equal(f, feats["f_fp32"]) and _rel_l2(f, feats["f_fp32"]) < 3e-2
    stats = StreamingStats.from_features(feats["f_fp32"], {"feature_extractor": DEFAULT_NAME})
    with pytest.raises(ValueError, match="feature extractor"):
        metric.load_reference(stats)  # fp32 statistics into a bf16 metric: refused, not mixed
    metric.load_reference(StreamingStats.from_features(f, {"feature_extractor": metric.extractor_name}))


# ------------------------------------------------------------------------------------------- settings
def _settings(**fid) -> EvalSettings:
    return EvalSettings.from_config({"K": [10], "trajectory": ["even"], "method": ["ddim"], "metrics": ["fid"],
                                     "fid": fid})


def test_settings_parse_and_refuse():
    s = _settings()
    assert s.fid.feature_precision == "fp32" and s.fid.channels_last is False
    s = _settings(feature_precision="bf16", channels_last=True)
    assert s.fid.feature_precision == "bf16" and s.fid.channels_last is True
    with pytest.raises(SettingsError, match=r"eval\.fid\.feature_precision.*'bf17'.*fp32, tf32, bf16"):
        _settings(feature_precision="bf17")
    with pytest.raises(SettingsError, match=r"eval\.fid\.channels_last must be true or false"):
        _settings(channels_last="yes")
    import yaml

    fid_yaml = yaml.safe_load((ROOT / "conf" / "eval" / "default.yaml").read_text())["fid"]
    assert fid_yaml["feature_precision"] == "fp32" and fid_yaml["channels_last"] is False


class _Data:
    """The part of a datamodule that ``fid_context`` reads."""

    name = "tiny"

    def __init__(self, images):
        self.images = images

    def train_pool(self, n=None, generator=None):
        return self.images if n is None else self.images[:n]


def test_fid_identity_unchanged_at_defaults(feats, tmp_path):
    """Defaults: the FID identity (hashed into fid_id) and the reference cache's file name are exactly what they were
    before the options existed. Other options add ``feature_options`` and get a cache file of their own."""
    from analytic_dpm.evaluation.reference import fid_context

    data = _Data(feats["x"][:2])

    def context(**options):
        s = _settings(weights_path=str(feats["weights"]), reference_cache=str(tmp_path), **options)
        return _quiet(fid_context, s, data, torch.device("cpu"))

    default, bf16 = context(), context(feature_precision="bf16", channels_last=True)
    assert default.metric.extractor_name == DEFAULT_NAME and default.metric.options_id == ""
    assert default.identity == {"weights": default.metric.weights_id,
                                "reference": {"fingerprint": default.identity["reference"]["fingerprint"],
                                              "num_images": 2, "weights": default.metric.weights_id}}
    digest = default.identity["reference"]["fingerprint"].split(":")[1][:10]
    assert Path(default.reference_path).name == f"tiny_train_2_{digest}.npz"
    assert FeatureStats.load(default.reference_path).metadata["feature_extractor"] == DEFAULT_NAME
    assert bf16.identity == {**default.identity, "feature_options": "bf16+cl"}
    assert short(digest_json(bf16.identity)) != short(digest_json(default.identity))
    assert Path(bf16.reference_path).name == f"tiny_train_2_{digest}_bf16+cl.npz"
    assert bf16.metric.features.precision == "bf16" and bf16.metric.features.channels_last


def test_reference_cache_named_by_the_images(feats, tmp_path):
    """Two datasets of the same name and size (two image folders) get cache files of their own, so neither
    recomputes at every run; a cache written under the name without the digest is reused for the same images
    (kept under its old name too) and left alone for other images."""
    from analytic_dpm.evaluation.reference import fid_context, reference_cache_path

    x = feats["x"]
    a, b = _Data(x[:2]), _Data(x[1:3])
    s = _settings(weights_path=str(feats["weights"]), reference_cache=str(tmp_path))
    ctx_a = _quiet(fid_context, s, a, torch.device("cpu"))
    ctx_b = _quiet(fid_context, s, b, torch.device("cpu"))
    assert ctx_a.reference_path != ctx_b.reference_path
    assert len(list(tmp_path.glob("tiny_train_2_*.npz"))) == 2
    fingerprint_a = ctx_a.identity["reference"]["fingerprint"]
    assert FeatureStats.load(ctx_a.reference_path).metadata["fingerprint"] == fingerprint_a
    # b's statistics again: read from its own file (the Inception does not run)
    with mock.patch.object(type(ctx_b.metric.features), "__call__", side_effect=AssertionError("recomputed")):
        again = _quiet(fid_context, s, b, torch.device("cpu"))
    assert again.identity == ctx_b.identity

    legacy_dir = tmp_path / "legacy"
    legacy = reference_cache_path(legacy_dir, "tiny", None, 2)
    assert legacy.name == "tiny_train_2.npz"
    Path(ctx_a.reference_path).rename(legacy)  # a's statistics under the old name
    s_legacy = _settings(weights_path=str(feats["weights"]), reference_cache=str(legacy_dir))
    with mock.patch.object(type(ctx_a.metric.features), "__call__", side_effect=AssertionError("recomputed")):
        reused = _quiet(fid_context, s_legacy, a, torch.device("cpu"))
    assert Path(reused.reference_path).name == Path(ctx_a.reference_path).name and legacy.is_file()
    assert reused.identity == ctx_a.identity
    other = _quiet(fid_context, s_legacy, b, torch.device("cpu"))  # other images: computed, old file untouched
    assert other.identity == ctx_b.identity
    assert FeatureStats.load(legacy).metadata["fingerprint"] == fingerprint_a


# ------------------------------------------------------------------------------------------- benchmark
@pytest.fixture(scope="module")
def bench():
    """``bench/bench_fid.py`` imported in this process (saves the imports of a subprocess)."""
    spec = importlib.util.spec_from_file_location("bench_fid", ROOT / "bench" / "bench_fid.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _jpeg_npz(path: Path, n_test: int, n_train: int) -> Path:
    """The layout of the CIFAR-10 JPEG copy that ``cifar_jpeg`` reads: ``{split}_header`` + the slice
    ``{split}_bodies[offsets[i]:offsets[i+1]]`` is image i's JPEG file (here: an empty header, whole files)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("test", n_test), ("train", n_train)):
        files = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
            files.append(buf.getvalue())
        arrays[f"{split}_header"] = np.zeros(0, np.uint8)
        arrays[f"{split}_bodies"] = np.frombuffer(b"".join(files), np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
    np.savez(path, **arrays)
    return path


def test_bench_features_end_to_end(bench, random_inception_weights, tmp_path, capsys):
    data, out = _jpeg_npz(tmp_path / "jpeg.npz", 6, 6), tmp_path / "variants.json"
    common = ["features", "--weights", str(random_inception_weights), "--data", str(data), "--n-test", "6",
              "--n-train", "6", "--device", "cpu"]
    assert bench.main([*common, "--variants", "bf16+cl:4,fp32:4,fp32+cl:6", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (res["n_test"], res["n_train"], res["device"]) == (6, 6, "cpu")
    rows = {r["variant"]: r for r in res["variants"]}
    assert list(rows) == ["fp32:4", "bf16+cl:4", "fp32+cl:6"]  # the baseline runs first
    for r in rows.values():
        assert r["status"] == "done" and r["images_per_s"] > 0 and np.isfinite(r["fid"])
    assert rows["fp32:4"]["verdict"] == "baseline" and rows["fp32:4"]["dfid"] == 0
    assert rows["fp32+cl:6"]["verdict"] == "ok" and abs(rows["fp32+cl:6"]["dfid"]) < 1e-6
    assert rows["bf16+cl:4"]["dfid"] != 0 and rows["bf16+cl:4"]["verdict"] in ("ok", "moves FID")
    assert rows["bf16+cl:4"]["name"] == DEFAULT_NAME + ":bf16+cl"
    assert res["recommended"] in rows
    assert bench.verdict(0.02, 0.01) == "moves FID" and bench.verdict(-0.01, 0.01) == "ok"
    assert "recommended" in capsys.readouterr().out

    # no time left: every variant is recorded as skipped, none runs
    assert bench.main([*common, "--variants", "fp32:4,tf32:4", "--budget-s", "0", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["status"] for r in res["variants"]] == ["skipped", "skipped"] and res["recommended"] is None


def test_bench_variants_parsing_and_estimate(bench):
    v = bench.parse_variants("bf16+cl:500, tf32:200,fp32:200")
    assert [x.label for x in v] == ["fp32:200", "bf16+cl:500", "tf32:200"]
    assert [x.label for x in bench.parse_variants(bench.VARIANTS)][0] == "fp32:200"
    for bad, match in (("bf17:200", "PRECISION"), ("fp32", "PRECISION"), ("fp32+nhwc:200", "PRECISION"),
                       ("fp32:0", "BATCH"), ("bf16:200", "plain fp32"), ("fp32:8,fp32:8", "twice")):
        with pytest.raises(ValueError, match=match):
            bench.parse_variants(bad)
    done = [{"status": "done", "seconds": 30.0}, {"status": "failed"}, {"status": "done", "seconds": 12.0}]
    assert bench.estimate_seconds(done) == 30.0 and bench.estimate_seconds([]) is None
    assert bench.skip_reason(None, 1e9, 30.0) is None  # no budget: everything runs
    assert bench.skip_reason(100.0, 50.0, None) is None  # nothing measured yet: try it
    assert bench.skip_reason(100.0, 50.0, 30.0) is None
    assert "20 s of --budget-s left" in bench.skip_reason(100.0, 80.0, 30.0)
    assert bench.skip_reason(100.0, 100.0, None) is not None
