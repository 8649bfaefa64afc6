"""Key-by-key correspondence between our UNet and the improved-diffusion / DDPM state dicts.

The networks are the same function (``analytic_dpm.nets.UNet`` has the options that make it so); only names and
three storage details differ:

* ResBlock children: ours ``in_norm, in_conv, emb_proj, out_norm, out_conv, skip``; iDDPM ``in_layers.0,
  in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection``; DDPM ``norm1, conv1, temb_proj, norm2,
  conv2, nin_shortcut``.
* Attention ``qkv``: ours is one 1x1 conv whose output channels are ordered (3, heads, d). iDDPM's is a conv1d
  (weight [3C, C, 1]) ordered (heads, 3, d) (its legacy ``QKVAttention`` splits each head's slice into q, k, v);
  DDPM has three convs ``q, k, v`` (one head). ``proj_out`` is a conv1d in iDDPM (a trailing 1 is added).
* DDPM's module tree: ``temb.dense.{0,1}``, ``conv_in``, ``down.{level}.block/attn.{i}``,
  ``down.{level}.downsample.conv``, ``mid.block_1/attn_1/block_2``, ``up.{level}.block/attn.{i}``,
  ``up.{level}.upsample.conv``, ``norm_out``, ``conv_out``; ours flattens it into ``input_blocks``,
  ``middle_block``, ``output_blocks`` exactly as iDDPM does.
* Covariance heads (baofff/Extended-Analytic-DPM, :class:`analytic_dpm.nets.HeadUNet`): ours ``unet.*`` (the
  backbone, mapped as above) and ``head.{i}``; iDDPM ``UNetModel4Pretrained`` keeps the backbone's keys and adds
  ``out2.{i}`` with the same indices (simple: 0 GroupNorm, 2 conv; complex: 0 ResBlock, 1 GroupNorm, 3 conv);
  DDPM ``Model4Pretrained`` adds ``before_out`` (complex: a ResnetBlock), ``norm_out2``, ``conv_out2``.

The correspondence is derived by walking *our* model (it may live on the meta device), so it covers every
configuration the UNet can express; :func:`convert` then reports every key that is missing, unexpected or of the
wrong shape in the other project's names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ..nets.heads import HeadUNet
from ..nets.unet import AttentionBlock, Downsample, ResBlock, UNet, Upsample

__all__ = [
    "DDPM_HEAD_PREFIXES",
    "IDDPM_HEAD_PREFIXES",
    "Conversion",
    "Entry",
    "convert",
    "ddpm_entries",
    "ddpm_head_entries",
    "describe_mismatch",
    "iddpm_entries",
    "iddpm_head_entries",
    "strip_prefix",
]

#: key prefixes of the covariance head in the authors' two formats (the rest is the backbone, unchanged)
IDDPM_HEAD_PREFIXES = ("out2.",)
DDPM_HEAD_PREFIXES = ("before_out.", "norm_out2.", "conv_out2.")

_IDDPM_RESBLOCK = {
    "in_norm": "in_layers.0", "in_conv": "in_layers.2", "emb_proj": "emb_layers.1",
    "out_norm": "out_layers.0", "out_conv": "out_layers.3", "skip": "skip_connection",
}  # fmt: skip
_DDPM_RESBLOCK = {
    "in_norm": "norm1", "in_conv": "conv1", "emb_proj": "temb_proj",
    "out_norm": "norm2", "out_conv": "conv2", "skip": "nin_shortcut",
}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """One of our parameters and where it comes from.

    ``kind``: ``copy`` (same tensor), ``conv1d`` (add a trailing 1: iDDPM's 1-D convs), ``qkv_iddpm`` (permute
    the output channels from (heads, 3, d) to (3, heads, d), then add the trailing 1), ``cat`` (concatenate
    DDPM's q, k, v along the output channels).
    """

    ours: str
    theirs: tuple[str, ...]
    their_shapes: tuple[tuple[int, ...], ...]
    kind: str = "copy"
    heads: int = 1


@dataclass
class Conversion:
    """The outcome of :func:`convert`: our state dict, and everything that did not fit (in their names)."""

    state_dict: dict[str, Tensor] = field(default_factory=dict)
    missing: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # (their key, expected shape)
    unexpected: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # (their key, its shape)
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, got, want

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Drop ``prefix`` (``nn.DataParallel``'s ``module.``) when every key carries it."""
    keys = list(state_dict)
    if keys and all(k.startswith(prefix) for k in keys):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


# ---------------------------------------------------------------------------------------------------------
# Building the correspondence from our model
# ---------------------------------------------------------------------------------------------------------
def _entries(unet: nn.Module, units: dict[str, str], resblock_names: dict[str, str], fmt: str) -> list[Entry]:
    """Walk our state dict (of a UNet, or of a covariance head); ``units`` maps our module paths to theirs (a path
    not listed keeps its name)."""
    modules = dict(unet.named_modules())
    entries: list[Entry] = []
    for key, value in unet.state_dict().items():
        shape = tuple(value.shape)
        owner, leaf = key.rsplit(".", 1)
        parent_path, _, child = owner.rpartition(".")
        parent = modules.get(parent_path)
        if isinstance(parent, ResBlock):
            their_parent = units.get(parent_path, parent_path)
            entries.append(Entry(key, (f"{their_parent}.{resblock_names[child]}.{leaf}",), (shape,)))
        elif isinstance(parent, AttentionBlock):
            their_parent = units.get(parent_path, parent_path)
            entries.append(_attention_entry(key, their_parent, child, leaf, shape, parent.num_heads, fmt))
        elif isinstance(parent, (Downsample, Upsample)):  # their conv is `op` (iDDPM down) or `conv`
            their_parent = units.get(parent_path, parent_path)
            their_child = "conv" if fmt == "ddpm" else child
            entries.append(Entry(key, (f"{their_parent}.{their_child}.{leaf}",), (shape,)))
        else:
            entries.append(Entry(key, (f"{units.get(owner, owner)}.{leaf}",), (shape,)))
    return entries


def _attention_entry(key: str, their_parent: str, child: str, leaf: str, shape: tuple[int, ...], heads: int,
                     fmt: str) -> Entry:
    if child == "norm":
        return Entry(key, (f"{their_parent}.norm.{leaf}",), (shape,))
    if fmt == "ddpm":
        if child == "qkv":  # [3C, ...] <- q, k, v each [C, ...]
            part = (shape[0] // 3, *shape[1:])
            names = tuple(f"{their_parent}.{n}.{leaf}" for n in ("q", "k", "v"))
            return Entry(key, names, (part, part, part), kind="cat")
        return Entry(key, (f"{their_parent}.{child}.{leaf}",), (shape,))
    # iDDPM: conv1d weights [C_out, C_in, 1]; the qkv output channels are ordered (heads, 3, d)
    their_shape = shape[:3] if leaf == "weight" else shape
    kind = "qkv_iddpm" if child == "qkv" else ("conv1d" if leaf == "weight" else "copy")
    return Entry(key, (f"{their_parent}.{child}.{leaf}",), (their_shape,), kind=kind, heads=heads)


def iddpm_entries(unet: UNet) -> list[Entry]:
    """Our UNet <- an openai/improved-diffusion ``UNetModel`` state dict (same module tree, other leaf names)."""
    return _entries(unet, {}, _IDDPM_RESBLOCK, "iddpm")


def ddpm_entries(unet: UNet) -> list[Entry]:
    """Our UNet <- a DDPM/DDIM ``Model`` state dict (ermongroup/ddim, pesser/pytorch_diffusion)."""
    units = {
        "time_embed.0": "temb.dense.0", "time_embed.2": "temb.dense.1", "input_blocks.0.0": "conv_in",
        "middle_block.0": "mid.block_1", "middle_block.1": "mid.attn_1", "middle_block.2": "mid.block_2",
        "out.0": "norm_out", "out.2": "conv_out",
    }  # fmt: skip
    levels, nrb = len(unet.channel_mult), unet.num_res_blocks
    i = 1
    for level in range(levels):  # encoder: nrb x [ResBlock, (attention)], then a Downsample (not after the last)
        for b in range(nrb):
            for k, module in enumerate(unet.input_blocks[i]):
                units[f"input_blocks.{i}.{k}"] = _ddpm_unit("down", level, b, module)
            i += 1
        if level != levels - 1:
            units[f"input_blocks.{i}.0"] = f"down.{level}.downsample"
            i += 1
    j = 0
    for level in reversed(range(levels)):  # decoder: (nrb + 1) x [ResBlock, (attention), (Upsample)]
        for b in range(nrb + 1):
            for k, module in enumerate(unet.output_blocks[j]):
                units[f"output_blocks.{j}.{k}"] = _ddpm_unit("up", level, b, module)
            j += 1
    return _entries(unet, units, _DDPM_RESBLOCK, "ddpm")


def _prefixed(entries: list[Entry], prefix: str) -> list[Entry]:
    return [replace(e, ours=prefix + e.ours) for e in entries]


def iddpm_head_entries(model: HeadUNet) -> list[Entry]:
    """Our HeadUNet <- an Extended-Analytic-DPM ``UNetModel4Pretrained`` state dict (iDDPM backbone + ``out2``)."""
    units = {str(i): f"out2.{i}" for i in range(len(model.head))}  # same indices: [ResBlock,] GN, SiLU, conv
    return [*_prefixed(iddpm_entries(model.unet), "unet."),
            *_prefixed(_entries(model.head, units, _IDDPM_RESBLOCK, "iddpm"), "head.")]


def ddpm_head_entries(model: HeadUNet) -> list[Entry]:
    """Our HeadUNet <- an Extended-Analytic-DPM ``Model4Pretrained`` state dict (DDPM ``Model`` + ``before_out``
    (complex), ``norm_out2``, ``conv_out2``)."""
    names = ["before_out"] if model.head.mode == "complex" else []
    names += ["norm_out2", "silu", "conv_out2"]  # the SiLU has no parameters
    units = {str(i): name for i, name in enumerate(names)}
    return [*_prefixed(ddpm_entries(model.unet), "unet."),
            *_prefixed(_entries(model.head, units, _DDPM_RESBLOCK, "ddpm"), "head.")]


def _ddpm_unit(side: str, level: int, b: int, module: nn.Module) -> str:
    if isinstance(module, ResBlock):
        return f"{side}.{level}.block.{b}"
    if isinstance(module, AttentionBlock):
        return f"{side}.{level}.attn.{b}"
    if isinstance(module, Upsample):
        return f"{side}.{level}.upsample"
    raise TypeError(f"no DDPM counterpart for {type(module).__name__}")  # pragma: no cover - UNet invariant


# ---------------------------------------------------------------------------------------------------------
# Conversion and its report
# ---------------------------------------------------------------------------------------------------------
def _apply(entry: Entry, tensors: list[Tensor]) -> Tensor:
    if entry.kind == "copy":
        return tensors[0]
    if entry.kind == "conv1d":
        return tensors[0].unsqueeze(-1)
    if entry.kind == "cat":
        return torch.cat(tensors, dim=0)
    if entry.kind == "qkv_iddpm":  # output channels (heads, 3, d) -> (3, heads, d)
        t = tensors[0]
        three_c = t.shape[0]
        d = three_c // (3 * entry.heads)
        t = t.reshape(entry.heads, 3, d, *t.shape[1:]).transpose(0, 1).reshape(three_c, *t.shape[1:])
        return t.unsqueeze(-1) if t.ndim == 3 else t
    raise ValueError(f"unknown entry kind {entry.kind!r}")  # pragma: no cover


def convert(entries: Iterable[Entry], state_dict: Mapping[str, Tensor], ignore: Iterable[str] = ()) -> Conversion:
    """Our state dict from ``state_dict`` (theirs); keys in ``ignore`` are dropped silently.

    Floating tensors are cast to float32 and made contiguous (tensors on the meta device are only reshaped).
    """
    result = Conversion()
    used = set(ignore)
    for entry in entries:
        sources = []
        for name, want in zip(entry.theirs, entry.their_shapes, strict=True):
            used.add(name)
            tensor = state_dict.get(name)
            if tensor is None:
                result.missing.append((name, want))
            elif tuple(tensor.shape) != want:
                result.wrong_shape.append((name, tuple(tensor.shape), want))
            else:
                sources.append(tensor)
        if len(sources) == len(entry.theirs):
            out = _apply(entry, sources)
            if out.device.type != "meta" and out.is_floating_point():
                out = out.to(torch.float32).contiguous()
            result.state_dict[entry.ours] = out
    result.unexpected = [(k, tuple(v.shape)) for k, v in state_dict.items() if k not in used]
    return result


def _fmt(items: list, limit: int = 6) -> str:
    shown = []
    for item in items[:limit]:
        if len(item) == 3:
            shown.append(f"{item[0]} (file {list(item[1])}, flags expect {list(item[2])})")
        else:
            shown.append(f"{item[0]} {list(item[1])}")
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(shown) + more


def describe_mismatch(conversion: Conversion, what: str, hints: list[str]) -> str:
    """A message naming the missing / unexpected / wrongly shaped keys and the options that are probably wrong."""
    parts = [f"the weights in {what} do not match the options given:"]
    if conversion.missing:
        parts.append(f"{len(conversion.missing)} keys missing from the file: {_fmt(conversion.missing)}.")
    if conversion.unexpected:
        parts.append(f"{len(conversion.unexpected)} unexpected keys in the file: {_fmt(conversion.unexpected)}.")
    if conversion.wrong_shape:
        parts.append(f"{len(conversion.wrong_shape)} keys with the wrong shape: {_fmt(conversion.wrong_shape)}.")
    if hints:
        parts.append("Probably wrong: " + "; ".join(hints) + ".")
    else:
        parts.append("Check the architecture options against the ones the network was trained with.")
    return " ".join(parts)
