"""The DDPM / improved-DDPM UNet used as the noise-prediction network eps_theta(x_t, t).

Architecture (Ho et al. 2020; Nichol & Dhariwal 2021), as used by Analytic-DPM:

* a sinusoidal embedding of the timestep followed by a two-layer MLP to ``4 * base_channels``;
* an input 3x3 conv, then for every resolution level ``num_res_blocks`` residual blocks (each
  optionally followed by self-attention) and a downsampling layer (except after the last level);
* a middle block: ResBlock -> self-attention -> ResBlock (always with attention);
* a mirrored decoder with ``num_res_blocks + 1`` residual blocks per level, each consuming one skip
  connection from the encoder, and an upsampling layer at the end of every level but the first;
* GroupNorm(32) -> SiLU -> zero-initialised 3x3 conv to ``out_channels``.

With ``use_scale_shift_norm=False`` this is the DDPM network (the CIFAR10 configuration has exactly
the 35,746,307 parameters of the official TensorFlow model); with ``use_scale_shift_norm=True`` the
time embedding modulates the second GroupNorm FiLM-style, as in improved-DDPM.

Options that make the network *identical* (not just equal in size) to the public implementations, so that
their weights load by renaming keys (``analytic_dpm.pretrained``):

* ``emb_act`` (default True): SiLU on the time embedding before each ResBlock's projection, as in DDPM
  (``temb_proj(nonlinearity(temb))``) and iDDPM (``emb_layers = SiLU, Linear``). ``False`` reproduces the
  networks this project trained before issue 8, which projected the embedding without it.
* ``time_embedding``: ``"iddpm"`` (cosines first, frequencies ``exp(-log(10000) k / half)``) or ``"ddpm"``
  (sines first, ``exp(-log(10000) k / (half - 1))``).
* ``downsample_padding``: ``"symmetric"`` (iDDPM: 3x3 stride-2 conv with padding 1) or ``"asymmetric"``
  (DDPM: zero pad right/bottom by one, then the stride-2 conv without padding).
* ``norm_eps``: the GroupNorm epsilon (1e-5 in iDDPM, 1e-6 in DDPM).
* ``num_heads_upsample``: attention heads in the decoder (iDDPM's flag; default: ``num_heads``).

The implementation is kept free of shape-dependent Python control flow in ``forward`` so that it
works under ``torch.compile(fullgraph=True)``, with ``channels_last`` inputs, and with bf16/fp16
autocast (attention is evaluated in float32 unless ``attention_float32=False``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttentionBlock",
    "Downsample",
    "ResBlock",
    "TimestepSequential",
    "UNet",
    "Upsample",
    "attention_in_float32",
    "set_attention_float32",
    "timestep_embedding",
]

GROUPNORM_GROUPS = 32


# ---------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------
TIME_EMBEDDINGS = ("iddpm", "ddpm")
DOWNSAMPLE_PADDINGS = ("symmetric", "asymmetric")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, kind: str = "iddpm") -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``t`` of shape [B] -> [B, dim] (float32).

    ``kind="iddpm"`` (improved-diffusion): frequencies ``exp(-log(max_period) k / half)``, k = 0..half-1, the
    first half of the output holds the cosines, the second half the sines. ``kind="ddpm"`` (Ho et al.'s
    ``get_timestep_embedding``): frequencies ``exp(-log(max_period) k / (half - 1))``, sines first. Both are
    zero-padded if ``dim`` is odd, and computed with the same float32 operations as those implementations.
    The timestep is embedded exactly as given (no rescaling), so a model trained with t in 1..N must be
    queried the same way.
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    if kind == "iddpm":
        freqs = torch.exp(-math.log(max_period) * k / half)
    elif kind == "ddpm":
        freqs = torch.exp(k * -(math.log(max_period) / (half - 1)))
    else:
        raise ValueError(f"unknown time embedding {kind!r}; choose one of {TIME_EMBEDDINGS}")
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    if kind == "iddpm":
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    else:
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Set all parameters of ``module`` to zero (in place) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with the 32 groups used throughout DDPM / iDDPM (eps 1e-5 in iDDPM, 1e-6 in DDPM)."""
    return nn.GroupNorm(GROUPNORM_GROUPS, channels, eps=eps)


class TimestepBlock(nn.Module):
    """Marker base class: modules whose ``forward`` takes ``(x, emb)``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class TimestepSequential(nn.Sequential):
    """A ``Sequential`` that passes the time embedding to the children that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


# ---------------------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------------------
class Downsample(nn.Module):
    """Halve the spatial size: a stride-2 3x3 conv (``use_conv``) or 2x2 average pooling.

    ``padding="symmetric"`` pads the conv by one pixel on every side (iDDPM); ``"asymmetric"`` pads only the
    right and bottom by one and convolves without padding (DDPM's TensorFlow ``"SAME"`` stride-2 conv). The
    pad is a parameter-free module, so the conv's state-dict keys (``op.weight``, ``op.bias``) are the same.
    """

    def __init__(self, channels: int, use_conv: bool = True, padding: str = "symmetric"):
        super().__init__()
        if padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(f"unknown downsample padding {padding!r}; choose one of {DOWNSAMPLE_PADDINGS}")
        asymmetric = use_conv and padding == "asymmetric"
        self.pad: nn.Module = nn.ZeroPad2d((0, 1, 0, 1)) if asymmetric else nn.Identity()
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self.pad(x))


class Upsample(nn.Module):
    """Double the spatial size by nearest-neighbour interpolation, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ---------------------------------------------------------------------------------------------------------
# Residual block
# ---------------------------------------------------------------------------------------------------------
class ResBlock(TimestepBlock):
    """Residual block conditioned on the time embedding.

    ``x -> GN -> SiLU -> [resample] -> conv3x3 -> (+ emb  |  GN * (1 + scale) + shift) -> [GN] -> SiLU
    -> dropout -> conv3x3 (zero-init)``, plus a skip connection (identity, or a 1x1 conv when the channel
    count changes). With ``up``/``down`` the block also resamples (BigGAN-style, iDDPM's
    ``resblock_updown``); the resampling is then parameter-free (nearest / average pooling).

    The time embedding enters as ``emb_proj(SiLU(emb))`` (DDPM / iDDPM) when ``emb_act``, else as
    ``emb_proj(emb)`` (this project's networks trained before issue 8).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        emb_act: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.emb_act = bool(emb_act)

        self.in_norm = group_norm(channels, norm_eps)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        # Parameter-free resampling applied to both the hidden path and the skip path.
        if up:
            self.h_resample: nn.Module = Upsample(channels, use_conv=False)
            self.x_resample: nn.Module = Upsample(channels, use_conv=False)
        elif down:
            self.h_resample = Downsample(channels, use_conv=False)
            self.x_resample = Downsample(channels, use_conv=False)
        else:
            self.h_resample = self.x_resample = nn.Identity()

        # Projects the (SiLU-activated, if emb_act) time embedding to a per-channel bias, or scale and shift.
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)

        self.out_norm = group_norm(out_channels, norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))

        if out_channels == channels:
            self.skip: nn.Module = nn.Identity()
        else:
            self.skip = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self.h_resample(h))
        x = self.x_resample(x)

        emb_out = self.emb_proj(F.silu(emb) if self.emb_act else emb)[:, :, None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


# ---------------------------------------------------------------------------------------------------------
# Self-attention
# ---------------------------------------------------------------------------------------------------------
class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, with a residual connection.

    ``GN -> 1x1 conv to q, k, v -> softmax(q k^T / sqrt(d)) v -> 1x1 conv (zero-init)``, the attention through
    ``F.scaled_dot_product_attention``. With ``attention_float32`` (the default) q, k, v are cast to float32 and
    autocast is disabled around the attention, so softmax(q k^T / sqrt(d)) is float32 whatever the precision of
    the rest of the network. Without it the attention runs in the dtype q, k, v arrive in: bfloat16 under bf16
    autocast (which lets SDPA pick its fused flash/memory-efficient kernels on a GPU), float32 otherwise (then
    both settings give the same numbers). The layout manipulation goes through NHWC, which is a free view for
    ``channels_last`` inputs.

    The ``qkv`` conv's output channels are ordered ``(3, heads, d)``: all queries, then all keys, then all
    values, each split into heads. (iDDPM orders them ``(heads, 3, d)`` and DDPM has three separate convs;
    ``analytic_dpm.pretrained.unet_mapping`` permutes their weights into this order.)
    """

    def __init__(self, channels: int, num_heads: int = 1, norm_eps: float = 1e-5, attention_float32: bool = True):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"attention channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.attention_float32 = bool(attention_float32)
        self.norm = group_norm(channels, norm_eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm(x))
        # [B, 3C, H, W] -> [B, HW, 3, heads, d] -> three [B, heads, HW, d] tensors.
        qkv = qkv.permute(0, 2, 3, 1).reshape(b, height * width, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.attention_float32:
            with torch.autocast(device_type=x.device.type, enabled=False):
                h = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        else:  # the dtype q, k, v arrive in (bf16 under autocast)
            h = F.scaled_dot_product_attention(q, k, v)
        # [B, heads, HW, d] -> [B, H, W, C] -> [B, C, H, W] (channels_last strides).
        h = h.to(qkv.dtype).transpose(1, 2).reshape(b, height, width, c).permute(0, 3, 1, 2)
        return x + self.proj_out(h)


def set_attention_float32(model: nn.Module, value: bool) -> int:
    """Set ``attention_float32`` on every :class:`AttentionBlock` inside ``model`` (a run-time choice: the weights
    are the same); returns how many blocks there are (0: a network without this package's attention)."""
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    for block in blocks:
        block.attention_float32 = bool(value)
    return len(blocks)


def attention_in_float32(model: nn.Module) -> bool | None:
    """Whether every :class:`AttentionBlock` of ``model`` evaluates attention in float32 (None: it has none)."""
    flags = {m.attention_float32 for m in model.modules() if isinstance(m, AttentionBlock)}
    return None if not flags else all(flags)


# ---------------------------------------------------------------------------------------------------------
# The UNet
# ---------------------------------------------------------------------------------------------------------
class UNet(nn.Module):
    """DDPM / iDDPM UNet predicting the noise eps from ``(x_t, t)``.

    Args:
        in_channels: image channels.
        out_channels: output channels (defaults to ``in_channels``; Analytic-DPM does not learn sigma).
        image_size: training resolution; only used to turn ``attention_resolutions`` into levels and to
            check that the image can be halved ``len(channel_mult) - 1`` times.
        base_channels: channels of the first level (``model_channels`` in iDDPM, ``ch`` in DDPM).
        channel_mult: channel multiplier of each resolution level.
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
        attention_resolutions: feature-map resolutions (e.g. ``[16, 8]`` for a 32x32 image) at which
            self-attention follows every residual block. The middle block always has attention.
        dropout: dropout rate inside the residual blocks.
        num_heads: attention heads (ignored if ``num_head_channels`` is given).
        num_head_channels: if given (not None / -1), channels per head; the number of heads is then
            ``channels // num_head_channels``.
        use_scale_shift_norm: FiLM-style conditioning (iDDPM) instead of adding the embedding (DDPM).
        resblock_updown: resample with (parameter-free) up/down ResBlocks instead of Up/Downsample layers.
        conv_resample: use 3x3 convs in Up/Downsample layers (else nearest / average pooling only).
        emb_act: SiLU on the time embedding before every ResBlock's projection (DDPM / iDDPM; the default).
            ``False`` reproduces networks trained by this project before issue 8 (checkpoints whose stored
            model config lacks the key).
        time_embedding: ``"iddpm"`` or ``"ddpm"`` sinusoidal embedding (see :func:`timestep_embedding`).
        downsample_padding: ``"symmetric"`` (iDDPM) or ``"asymmetric"`` (DDPM) padding of the stride-2 conv.
        norm_eps: GroupNorm epsilon (1e-5: iDDPM; 1e-6: DDPM).
        num_heads_upsample: attention heads in the decoder blocks (iDDPM's flag; None or -1: ``num_heads``).
            Ignored when ``num_head_channels`` is given.
        attention_float32: evaluate softmax(q k^T / sqrt(d)) v in float32 under autocast (the default; see
            :class:`AttentionBlock`). ``False``: in the autocast dtype (bf16), faster on GPUs; changes numbers
            only under autocast. Weights are the same either way (a run-time choice, not an architecture).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        image_size: int = 32,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] | int | str = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        num_head_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        conv_resample: bool = True,
        emb_act: bool = True,
        time_embedding: str = "iddpm",
        downsample_padding: str = "symmetric",
        norm_eps: float = 1e-5,
        num_heads_upsample: int | None = None,
        attention_float32: bool = True,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attn_res = _parse_resolutions(attention_resolutions)
        out_channels = in_channels if out_channels is None else int(out_channels)
        if num_head_channels == -1:  # iDDPM's spelling of "not set"
            num_head_channels = None
        if num_heads_upsample is None or num_heads_upsample == -1:  # iDDPM: -1 = same as num_heads
            num_heads_upsample = num_heads
        _validate(
            in_channels, out_channels, image_size, base_channels, channel_mult, num_res_blocks, attn_res,
            dropout, num_heads, num_head_channels, num_heads_upsample,
        )  # fmt: skip
        if time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding must be one of {TIME_EMBEDDINGS}, got {time_embedding!r}")
        if time_embedding == "ddpm" and base_channels < 4:
            raise ValueError("the ddpm time embedding needs base_channels >= 4 (it divides by half - 1)")
        if downsample_padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(f"downsample_padding must be one of {DOWNSAMPLE_PADDINGS}, got {downsample_padding!r}")
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {norm_eps}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size = image_size
        self.base_channels = base_channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attn_res
        self.dropout = float(dropout)
        self.use_scale_shift_norm = bool(use_scale_shift_norm)
        self.emb_act = bool(emb_act)
        self.time_embedding = time_embedding
        self.downsample_padding = downsample_padding
        self.norm_eps = float(norm_eps)
        self.num_heads = num_heads
        self.num_heads_upsample = num_heads_upsample
        self.attention_float32 = bool(attention_float32)

        emb_dim = 4 * base_channels

        def heads_for(ch: int, decoder: bool = False) -> int:
            if num_head_channels:
                return ch // num_head_channels
            return num_heads_upsample if decoder else num_heads

        def resblock(ch_in: int, ch_out: int | None = None, **kw) -> ResBlock:
            return ResBlock(
                ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm=use_scale_shift_norm, emb_act=emb_act,
                norm_eps=norm_eps, **kw,
            )  # fmt: skip

        def attention(ch: int, decoder: bool = False) -> AttentionBlock:
            return AttentionBlock(ch, heads_for(ch, decoder), norm_eps=norm_eps, attention_float32=attention_float32)

        # Timestep embedding MLP.
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )

        # Encoder. `skip_chans` records the channels of every tensor pushed onto the skip stack.
        self.input_blocks = nn.ModuleList(
            [TimestepSequential(nn.Conv2d(in_channels, base_channels, 3, padding=1))]
        )
        skip_chans = [base_channels]
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, base_channels * mult)]
                ch = base_channels * mult
                if res in attn_res:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                if resblock_updown:
                    down: nn.Module = resblock(ch, down=True)
                else:
                    down = Downsample(ch, conv_resample, padding=downsample_padding)
                self.input_blocks.append(TimestepSequential(down))
                skip_chans.append(ch)
                res //= 2

        # Bottleneck.
        self.middle_block = TimestepSequential(resblock(ch), attention(ch), resblock(ch))

        # Decoder: each block concatenates one skip connection.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_chans.pop(), base_channels * mult)]
                ch = base_channels * mult
                if res in attn_res:
                    layers.append(attention(ch, decoder=True))
                if level != 0 and i == num_res_blocks:
                    layers.append(resblock(ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    res *= 2
                self.output_blocks.append(TimestepSequential(*layers))

        # Output head; the conv is zero-initialised so the network starts by predicting eps = 0.
        self.out = nn.Sequential(
            group_norm(ch, norm_eps),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)),
        )

    def features(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last decoder feature map (the input of the output GroupNorm, ``base_channels * channel_mult[0]``
        channels at full resolution) and the time embedding [B, 4 * base_channels], for ``x`` [B, C, H, W] at
        timesteps ``t`` [B]. A covariance head (:mod:`analytic_dpm.nets.heads`) reads both, so the backbone runs
        once for eps and the head."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.base_channels, kind=self.time_embedding))

        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return h, emb

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict eps for images ``x`` [B, C, H, W] at timesteps ``t`` [B] (int or float, used as given)."""
        h, _ = self.features(x, t)
        return self.out(h).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------------------------------------
def _parse_resolutions(value: Sequence[int] | int | str | None) -> tuple[int, ...]:
    """Accept ``[16, 8]``, ``16``, ``"16,8"`` or ``None``/``[]`` (no attention besides the middle block)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _validate(
    in_channels: int,
    out_channels: int,
    image_size: int,
    base_channels: int,
    channel_mult: tuple[int, ...],
    num_res_blocks: int,
    attn_res: tuple[int, ...],
    dropout: float,
    num_heads: int,
    num_head_channels: int | None,
    num_heads_upsample: int | None = None,
) -> None:
    """Raise ``ValueError`` with a clear message for an inconsistent configuration."""
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels/out_channels must be positive, got {in_channels}/{out_channels}")
    if not channel_mult or any(m < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult}")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    bad = sorted({base_channels * m for m in channel_mult if (base_channels * m) % GROUPNORM_GROUPS})
    if base_channels < 1 or bad:
        raise ValueError(
            f"every level's channel count (base_channels * channel_mult) must be a positive multiple of "
            f"{GROUPNORM_GROUPS} for GroupNorm({GROUPNORM_GROUPS}); got base_channels={base_channels}, "
            f"channel_mult={channel_mult} (offending channel counts: {bad})"
        )
    n_down = len(channel_mult) - 1
    if image_size < 1 or image_size % (2**n_down) != 0:
        raise ValueError(
            f"image_size={image_size} cannot be halved {n_down} times (len(channel_mult) - 1) "
            f"without remainder; use fewer levels or a different image size"
        )
    reachable = [image_size // 2**level for level in range(len(channel_mult))]
    unreachable = [r for r in attn_res if r not in reachable]
    if unreachable:
        raise ValueError(
            f"attention_resolutions {list(unreachable)} are not feature-map resolutions of this UNet "
            f"(image_size={image_size}, channel_mult={channel_mult} gives {reachable})"
        )
    attn_chans = {base_channels * channel_mult[-1]}  # middle block
    attn_chans |= {base_channels * channel_mult[reachable.index(r)] for r in attn_res}
    if num_head_channels is not None:
        if num_head_channels < 1:
            raise ValueError(f"num_head_channels must be positive, got {num_head_channels}")
        bad = sorted(c for c in attn_chans if c % num_head_channels)
        if bad:
            raise ValueError(
                f"attention channels {bad} are not divisible by num_head_channels={num_head_channels}"
            )
    else:
        if num_heads < 1:
            raise ValueError(f"num_heads must be positive, got {num_heads}")
        bad = sorted(c for c in attn_chans if c % num_heads)
        if bad:
            raise ValueError(f"attention channels {bad} are not divisible by num_heads={num_heads}")
        if num_heads_upsample is not None:
            if num_heads_upsample < 1:
                raise ValueError(f"num_heads_upsample must be positive (or -1 = num_heads), got {num_heads_upsample}")
            decoder_chans = {base_channels * channel_mult[reachable.index(r)] for r in attn_res}
            bad = sorted(c for c in decoder_chans if c % num_heads_upsample)
            if bad:
                raise ValueError(
                    f"decoder attention channels {bad} are not divisible by num_heads_upsample={num_heads_upsample}"
                )
