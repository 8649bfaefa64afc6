"""Content hashes that identify what produced a number: network weights, Gamma, data, settings.

Every evaluation result row records these (``analytic_dpm.evaluation.results``), so a rerun reuses a row only when
it was computed by the same network, Gamma, data and settings. Hashes are sha256 over a canonical byte encoding:

* tensors: dtype, shape and the raw bytes (contiguous, on the CPU);
* a network: its state dict, keys sorted (parameters and persistent buffers);
* a file (weights, reference statistics): its bytes (:func:`file_sha256`);
* settings: canonical JSON (sorted keys, no whitespace); floats by ``repr``, so 0.1 and 0.1000001 differ.

``short`` hashes are the first 16 hex digits (64 bits): enough to tell runs apart, short enough for a CSV column.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["digest_json", "digest_state_dict", "digest_tensor", "file_sha256", "short"]

SHORT = 16


def short(hexdigest: str) -> str:
    return hexdigest.removeprefix("sha256:")[:SHORT]


def _update_tensor(h, t: Tensor) -> None:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def digest_tensor(t: Tensor) -> str:
    """``sha256:<hex>`` of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256()
    _update_tensor(h, torch.as_tensor(t))
    return f"sha256:{h.hexdigest()}"


def digest_state_dict(module_or_state: nn.Module | Mapping[str, Tensor]) -> str:
    """``sha256:<hex>`` of a network's weights (state dict, keys sorted): its content, whatever file it came from."""
    sd = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    h = hashlib.sha256()
    for key in sorted(sd):
        value = sd[key]
        if not isinstance(value, Tensor):
            continue
        h.update(key.encode() + b"\0")
        _update_tensor(h, value)
    return f"sha256:{h.hexdigest()}"


def _canonical(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float):
        return repr(obj) if not math.isfinite(obj) else obj
    if isinstance(obj, Tensor):
        return digest_tensor(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return repr(obj)


def digest_json(obj: Any) -> str:
    """``sha256:<hex>`` of a JSON-able object in canonical form (sorted keys, tensors by content)."""
    text = json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"))
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """``sha256:<hex>`` of a file's bytes (a weights file, a statistics file), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return f"sha256:{h.hexdigest()}"
