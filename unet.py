"""Stable Diffusion from scratch: the VAE and the UNet, and their loaders (the samplers and the loss
are in diffusion.py; the original single-file checkpoints are converted in weights/convert.py).

SD works in the latent space of a VAE: an image x in [-1, 1], (B, 3, H, W), is encoded to a Gaussian
posterior; a sample of it (mean + std x noise), times `scaling_factor` (0.18215), is the latent z0,
(B, 4, H/8, W/8) for SD (the VAE halves the size per level but the last; the toy's: H/4). Training
noises it, z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, and the UNet learns eps_theta(z_t, t, context),
cross-attending to a context of S vectors (77 CLIP text tokens in SD; 64 dream queries in DreamLLM).

Module attribute names are diffusers' (UNet2DConditionModel, AutoencoderKL), so a diffusers folder
loads with strict key checking and no renaming.
"""
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from plumbing.checkpoint import CheckpointError, assign, check_types, read_config, read_state_dict, weight_files


# ----------------------------------------------------------------------------------------------------
# Configs. Field defaults are diffusers' own defaults, so a config.json that leaves a key out means
# the same thing here as there; presets hold the real values.

@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    channels: tuple = (320, 640, 1280, 1280)     # per resolution level (diffusers: block_out_channels)
    cross_attn: tuple = (True, True, True, False)  # level has transformers (CrossAttnDownBlock2D)
    layers_per_block: int = 2                     # resnets per level going down (one more going up)
    n_heads: int | tuple = 8    # per level; diffusers calls this `attention_head_dim` (a misnomer)
    context_dim: int = 1280     # width of the cross-attention context (diffusers: cross_attention_dim)
    transformer_depth: int = 1  # transformer blocks per attention (transformer_layers_per_block)
    linear_proj: bool = False   # SD 2.x: Linear proj_in/proj_out; SD 1.x: 1x1 convs (same math)
    norm_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True  # timestep embedding is [cos, sin] rather than [sin, cos]
    freq_shift: int = 0
    upcast_attention: bool = False  # attention in fp32 even under fp16 (SD 2.1-768 overflows otherwise)
    sample_size: int | None = None  # latent size trained at (informational)

    def __post_init__(self):
        check_types(self)
        self.channels, self.cross_attn = tuple(self.channels), tuple(bool(c) for c in self.cross_attn)
        n = len(self.channels)
        self.n_heads = (self.n_heads,) * n if isinstance(self.n_heads, int) else tuple(self.n_heads)
        if not len(self.cross_attn) == len(self.n_heads) == n:
            raise ValueError(f"UNetConfig: channels, cross_attn and n_heads need one entry per level ({n})")
        for c, h in zip(self.channels, self.n_heads):
            if c % h or c % self.norm_groups:
                raise ValueError(f"UNetConfig: {c} channels do not split into {h} heads "
                                 f"and {self.norm_groups} norm groups")

    @classmethod
    def from_diffusers(cls, d: dict):
        _reject_unsupported("UNet2DConditionModel", d, _UNET_FIXED)
        down = tuple(d.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
        bad = [t for t in down if t not in ("CrossAttnDownBlock2D", "DownBlock2D")]
        if bad:
            raise ValueError(f"UNet down_block_types entry {bad[0]!r} is not supported "
                             "(only CrossAttnDownBlock2D, DownBlock2D)")
        cross = tuple(t == "CrossAttnDownBlock2D" for t in down)
        up = tuple(d.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
        mirror = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross))
        if up != mirror:
            raise ValueError(f"UNet up_block_types {list(up)} are not supported "
                             f"(only the mirror of the down blocks, {list(mirror)})")
        for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block"):
            if isinstance(d.get(key), (list, tuple)):
                raise ValueError(f"UNet {key}={d[key]} per level is not supported (only one int)")
        return cls(cross_attn=cross, **{ours: d[theirs] for theirs, ours in _UNET_KEYS.items() if theirs in d})

    def to_diffusers(self) -> dict:  # the config.json to save beside our own weights
        down = ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in self.cross_attn]
        return dict({theirs: getattr(self, ours) for theirs, ours in _UNET_KEYS.items()},
                    _class_name="UNet2DConditionModel", down_block_types=down,
                    up_block_types=[t.replace("Down", "Up") for t in reversed(down)])


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    channels: tuple = (64,)     # per level; the image shrinks 2x per level but the last
    layers_per_block: int = 1   # resnets per level in the encoder (one more in the decoder)
    latent_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # z0 = scaling_factor * mean: brings latents to about unit variance
    sample_size: int = 32       # image size trained at (informational)

    def __post_init__(self):
        check_types(self)
        self.channels = tuple(self.channels)

    @classmethod
    def from_diffusers(cls, d: dict):
        _reject_unsupported("AutoencoderKL", d, _VAE_FIXED)
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != kind for t in d.get(key, ())):
                raise ValueError(f"AutoencoderKL {key}={d[key]} is not supported (only {kind})")
        return cls(**{ours: d[theirs] for theirs, ours in _VAE_KEYS.items() if theirs in d})

    def to_diffusers(self) -> dict:
        n = len(self.channels)
        return dict({theirs: getattr(self, ours) for theirs, ours in _VAE_KEYS.items()}, _class_name="AutoencoderKL",
                    down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)


# config.json key -> our field
_UNET_KEYS = dict(in_channels="in_channels", out_channels="out_channels", block_out_channels="channels",
                  layers_per_block="layers_per_block", attention_head_dim="n_heads",
                  cross_attention_dim="context_dim", transformer_layers_per_block="transformer_depth",
                  use_linear_projection="linear_proj", norm_num_groups="norm_groups", norm_eps="norm_eps",
                  flip_sin_to_cos="flip_sin_to_cos", freq_shift="freq_shift",
                  upcast_attention="upcast_attention", sample_size="sample_size")
_VAE_KEYS = dict(in_channels="in_channels", out_channels="out_channels", block_out_channels="channels",
                 layers_per_block="layers_per_block", latent_channels="latent_channels",
                 norm_num_groups="norm_groups", scaling_factor="scaling_factor", sample_size="sample_size")
# diffusers features that SD 1.x/2.x do not use: a config.json may name them, but only with these values.
_UNET_FIXED = dict(
    mid_block_type=("UNetMidBlock2DCrossAttn",), center_input_sample=(False,), only_cross_attention=(False,),
    mid_block_only_cross_attention=(None, False), dual_cross_attention=(False,), class_embed_type=(None,),
    num_class_embeds=(None,), addition_embed_type=(None,), addition_time_embed_dim=(None,),
    encoder_hid_dim=(None,), encoder_hid_dim_type=(None,), time_embedding_type=("positional",),
    time_embedding_dim=(None,), time_embedding_act_fn=(None,), timestep_post_act=(None,),
    time_cond_proj_dim=(None,), projection_class_embeddings_input_dim=(None,), class_embeddings_concat=(False,),
    conv_in_kernel=(3,), conv_out_kernel=(3,), attention_type=("default",), cross_attention_norm=(None,),
    resnet_time_scale_shift=("default",), resnet_skip_time_act=(False,), resnet_out_scale_factor=(1.0,),
    mid_block_scale_factor=(1.0,), downsample_padding=(1,), act_fn=("silu",), dropout=(0.0,),
    num_attention_heads=(None,), reverse_transformer_layers_per_block=(None,))
# (force_upcast, a hint to pipelines to run the VAE in fp32, needs nothing here)
_VAE_FIXED = dict(act_fn=("silu",), shift_factor=(None,), latents_mean=(None,), latents_std=(None,),
                  use_quant_conv=(True,), use_post_quant_conv=(True,), mid_block_add_attention=(True,))


def _reject_unsupported(model, d, fixed):
    if d.get("_class_name", model) != model:
        raise ValueError(f"_class_name is {d['_class_name']!r}: the config of another model, not {model}")
    for key, allowed in fixed.items():
        if key in d and d[key] not in allowed:
            raise ValueError(f"{model} {key}={d[key]!r} is not supported (only {' or '.join(map(repr, allowed))})")


# The official scheduler_config.json of each pipeline (keys a sampler does not need, such as
# skip_prk_steps for PNDM, are kept as shipped; DDPM/DDIM ignore them).
_SD_SCHEDULER = dict(_class_name="PNDMScheduler", num_train_timesteps=1000, beta_schedule="scaled_linear",
                     beta_start=0.00085, beta_end=0.012, trained_betas=None, clip_sample=False,
                     set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
_SD2_UNET = UNetConfig(n_heads=(5, 10, 20, 20), context_dim=1024, linear_proj=True, sample_size=64)
_SD_VAE = VAEConfig(channels=(128, 256, 512, 512), layers_per_block=2, sample_size=768)

PRESETS = {
    "sd-1.5": dict(unet=UNetConfig(n_heads=8, context_dim=768, sample_size=64),
                   vae=replace(_SD_VAE, sample_size=512), scheduler=dict(_SD_SCHEDULER)),
    # DreamLLM's: the UNet it conditions on dream queries, frozen
    "sd-2.1-base": dict(unet=_SD2_UNET, vae=replace(_SD_VAE),
                        scheduler=dict(_SD_SCHEDULER, prediction_type="epsilon")),
    # 768 px, trained to predict v; its config also sets upcast_attention (the only other difference).
    "sd-2.1": dict(unet=replace(_SD2_UNET, sample_size=96, upcast_attention=True), vae=_SD_VAE,
                   scheduler=dict(_SD_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction")),
    # SD 2.x's structure shrunk for tests and the toy world: 3 UNet levels, a 4x (not 8x) VAE.
    "tiny": dict(unet=UNetConfig(channels=(32, 64, 64), cross_attn=(True, True, False), layers_per_block=1,
                                 n_heads=(2, 4, 4), context_dim=64, linear_proj=True, norm_groups=8, sample_size=16),
                 vae=VAEConfig(channels=(32, 64, 64), layers_per_block=1, norm_groups=8, sample_size=64),
                 scheduler=dict(_SD_SCHEDULER, prediction_type="epsilon")),
}


def as_config(config, cls, part):
    """A preset name or entry, a diffusers config.json dict, or one of our configs -> our config."""
    if isinstance(config, dict) and part in config:  # PRESETS[name] itself
        config = config[part]
    if isinstance(config, cls):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r} (have {', '.join(PRESETS)})")
        return PRESETS[config][part]
    return cls.from_diffusers(config)


# ----------------------------------------------------------------------------------------------------
# Shared layers

class GroupNorm(nn.GroupNorm):
    # statistics in fp32 even for half weights: the variance of large activations overflows fp16
    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        x32 = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return x32.to(x.dtype)


def attention(q, k, v, n_heads, upcast=False):
    """softmax(q k^T / sqrt(d)) v over n_heads heads: (B, T, C), (B, S, C), (B, S, C) -> (B, T, C)."""
    dtype = q.dtype
    q, k, v = (t.unflatten(-1, (n_heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, C/heads)
    if upcast:  # fp16 scores q k^T can overflow (SD 2.1-768); fp32 costs memory, so only where asked
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v)  # softmax in fp32 inside the kernel
    return out.to(dtype).transpose(1, 2).flatten(2)


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x))) + proj(silu(temb))))); the time term only in the UNet."""
    def __init__(self, cin, cout, temb_dim, groups, eps):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        if temb_dim:
            self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = GroupNorm(groups, cout, eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # a 1x1 conv matches the channels of the skip path when they change
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # one shift per channel
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout would sit here: 0 in SD)
        return self.conv_shortcut(x) + h


class Downsample(nn.Module):
    # a stride-2 3x3 conv; the UNet pads 1 on all sides, the VAE pads only right and bottom
    def __init__(self, ch, pad):
        super().__init__()
        self.pad = pad
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=pad)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad == 0 else x)


class Upsample(nn.Module):
    # nearest-neighbour 2x (or to `size`, the size of the skip it meets when H or W was odd), then a 3x3 conv
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


# ----------------------------------------------------------------------------------------------------
# The UNet's transformer: every pixel of a level is a token that attends to the other pixels
# (attn1), then to the context (attn2), then goes through a GEGLU MLP.

class Attention(nn.Module):
    def __init__(self, dim, context_dim, n_heads, upcast):
        super().__init__()
        self.n_heads, self.upcast = n_heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # list: diffusers' key is to_out.0

    def forward(self, x, context=None):  # x (B, T, dim), context (B, S, context_dim); None: self-attention
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, T, dim), (B, S, dim) x 2
        return self.to_out[0](attention(q, k, v, self.n_heads, self.upcast))


class FeedForward(nn.Module):
    """GEGLU: w2(h * gelu(gate)), [h, gate] = w1 x, hidden 4 dim. Keys ff.net.0.proj (w1), ff.net.2 (w2)."""
    def __init__(self, dim):
        super().__init__()
        self.net = nn.ModuleList([nn.ModuleDict(dict(proj=nn.Linear(dim, 2 * 4 * dim))),
                                  nn.Identity(),  # diffusers' dropout
                                  nn.Linear(4 * dim, dim)])

    def forward(self, x):
        h, gate = self.net[0].proj(x).chunk(2, dim=-1)
        return self.net[2](h * F.gelu(gate))


class TransformerBlock(nn.Module):
    def __init__(self, dim, context_dim, n_heads, upcast):
        super().__init__()
        self.norm1, self.attn1 = LayerNorm(dim), Attention(dim, dim, n_heads, upcast)
        self.norm2, self.attn2 = LayerNorm(dim), Attention(dim, context_dim, n_heads, upcast)
        self.norm3, self.ff = LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """(B, C, H, W) -> tokens (B, H*W, C) -> transformer blocks -> back, plus the input
    (diffusers' Transformer2DModel, the LDM code's SpatialTransformer)."""
    def __init__(self, ch, n_heads, c: UNetConfig):
        super().__init__()
        self.linear = c.linear_proj
        self.norm = GroupNorm(c.norm_groups, ch, eps=1e-6)
        proj = (lambda: nn.Linear(ch, ch)) if self.linear else (lambda: nn.Conv2d(ch, ch, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(ch, c.context_dim, n_heads, c.upcast_attention) for _ in range(c.transformer_depth))
        self.proj_out = proj()

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        h = h if self.linear else self.proj_in(h)  # a 1x1 conv before flattening is the same map
        h = h.flatten(2).transpose(1, 2)           # (B, H*W, C)
        h = self.proj_in(h) if self.linear else h
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h) if self.linear else h
        h = h.transpose(1, 2).unflatten(2, (H, W))  # (B, C, H, W)
        return x + (h if self.linear else self.proj_out(h))


# ----------------------------------------------------------------------------------------------------
# Blocks of one resolution level, shared by the UNet and the VAE (whose blocks have no time
# embedding and no transformers): the same classes give diffusers' keys for both.

class DownBlock(nn.Module):
    """n x (resnet [+ transformer]), then a stride-2 conv except at the lowest level."""
    def __init__(self, cin, cout, n, temb_dim, groups, eps, make_attn=None, down_pad=None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, temb_dim, groups, eps)
                                     for j in range(n))
        self.attentions = nn.ModuleList(make_attn() for _ in range(n)) if make_attn else None
        self.downsamplers = nn.ModuleList([Downsample(cout, down_pad)]) if down_pad is not None else None

    def forward(self, x, temb=None, context=None, skips=None):
        # `skips` collects the output of every layer for the UNet's way back up
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            x = self.attentions[j](x, context) if self.attentions else x
            if skips is not None:
                skips.append(x)
        if self.downsamplers:
            x = self.downsamplers[0](x)
            if skips is not None:
                skips.append(x)
        return x


class UpBlock(nn.Module):
    """The mirror: each resnet takes the running x, concatenated (UNet) with one skip from the way down."""
    def __init__(self, cins, cout, temb_dim, groups, eps, make_attn=None, upsample=True):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin, cout, temb_dim, groups, eps) for cin in cins)
        self.attentions = nn.ModuleList(make_attn() for _ in cins) if make_attn else None
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, x, temb=None, context=None, skips=None):
        for j, resnet in enumerate(self.resnets):
            x = resnet(x if skips is None else torch.cat([x, skips.pop()], dim=1), temb)  # channels: x, then skip
            x = self.attentions[j](x, context) if self.attentions else x
        if self.upsamplers:
            x = self.upsamplers[0](x, skips[-1].shape[-2:] if skips else None)
        return x


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""
    def __init__(self, ch, temb_dim, groups, eps, attn):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(ch, ch, temb_dim, groups, eps) for _ in range(2))
        self.attentions = nn.ModuleList([attn])

    def forward(self, x, temb=None, context=None):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


# ----------------------------------------------------------------------------------------------------
# The UNet: eps_theta(z_t, t, context)

def timestep_embedding(t, dim, flip_sin_to_cos, freq_shift, max_period=10000):
    """Sinusoidal features of t, (B,) -> (B, dim): frequencies max_period^(-i / (dim/2 - freq_shift)).

    Computed in forward, never stored: a buffer would stay on the meta device after loading."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * i / (half - freq_shift))  # from 1 down to ~1/max_period
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch, L, n = c.channels, c.layers_per_block, len(c.channels)
        temb_dim = 4 * ch[0]
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        # an MLP on the sinusoidal features: linear_2(silu(linear_1(.)))
        self.time_embedding = nn.ModuleDict(dict(linear_1=nn.Linear(ch[0], temb_dim),
                                                 linear_2=nn.Linear(temb_dim, temb_dim)))

        def transformer(level):  # a factory: each call gives a new SpatialTransformer for this level
            return (lambda: SpatialTransformer(ch[level], c.n_heads[level], c)) if c.cross_attn[level] else None

        block = dict(temb_dim=temb_dim, groups=c.norm_groups, eps=c.norm_eps)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], L, make_attn=transformer(i),
                      down_pad=1 if i < n - 1 else None, **block)
            for i in range(n))
        self.mid_block = MidBlock(ch[-1], attn=SpatialTransformer(ch[-1], c.n_heads[-1], c), **block)
        # the channels of the skips the way down leaves behind: conv_in, each layer, each downsampler
        skips = [ch[0]] + [ch[i] for i in range(n) for _ in range(L + (i < n - 1))]
        self.up_blocks = nn.ModuleList()
        x_ch = ch[-1]
        for i in reversed(range(n)):  # up_blocks[0] is the lowest level
            cins = []
            for _ in range(L + 1):
                cins.append(x_ch + skips.pop())
                x_ch = ch[i]
            self.up_blocks.append(UpBlock(cins, ch[i], make_attn=transformer(i), upsample=i > 0, **block))
        self.conv_norm_out = GroupNorm(c.norm_groups, ch[0], c.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def forward(self, sample, timestep, context):
        """sample (B, in, h, w), timestep int / 0-d / (B,), context (B, S, context_dim) -> (B, out, h, w):
        eps, v or x0, whichever the weights were trained to predict (the scheduler's prediction_type)."""
        c = self.config
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])  # (B,)
        temb = timestep_embedding(t, c.channels[0], c.flip_sin_to_cos, c.freq_shift)  # (B, channels[0]), fp32
        mlp = self.time_embedding
        temb = mlp.linear_2(F.silu(mlp.linear_1(temb.to(sample.dtype))))  # (B, 4 channels[0]): into every resnet
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, temb, context, skips)
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:  # each pops its layers' skips, last in first out
            x = block(x, temb, context, skips)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------------------------------
# The VAE (AutoencoderKL): 8x smaller latents for SD (one 2x per level but the last)

class VAEAttention(nn.Module):
    """One head of self-attention over all H*W positions, at the lowest resolution."""
    def __init__(self, ch, groups):
        super().__init__()
        self.group_norm = GroupNorm(groups, ch, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x, context=None):  # context unused: the signature of the UNet's attention
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        h = self.to_out[0](attention(self.to_q(h), self.to_k(h), self.to_v(h), n_heads=1, upcast=True))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, n, g = c.channels, len(c.channels), c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(DownBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, None, g, 1e-6,
                                                   down_pad=0 if i < n - 1 else None) for i in range(n))
        self.mid_block = MidBlock(ch[-1], None, g, 1e-6, VAEAttention(ch[-1], g))
        self.conv_norm_out = GroupNorm(g, ch[-1], 1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, n, g, L = c.channels, len(c.channels), c.norm_groups, c.layers_per_block
        self.conv_in = nn.Conv2d(c.latent_channels, ch[-1], 3, padding=1)
        self.mid_block = MidBlock(ch[-1], None, g, 1e-6, VAEAttention(ch[-1], g))
        self.up_blocks = nn.ModuleList(UpBlock([ch[min(i + 1, n - 1)]] + [ch[i]] * L, ch[i], None, g, 1e-6,
                                               upsample=i > 0) for i in reversed(range(n)))
        self.conv_norm_out = GroupNorm(g, ch[0], 1e-6)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.scaling_factor = config.scaling_factor
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, x):
        """x in [-1, 1], (B, 3, H, W) -> the posterior's (mean, logvar), each (B, 4, h, w), unscaled
        (h = H/8 for SD's four levels; H/4 for the toy's three).
        A latent is mean (+ exp(logvar / 2) * noise), times scaling_factor."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # keeps exp(logvar) finite, as the original does

    def decode(self, z):
        """z (B, 4, h, w), already divided by scaling_factor -> image (B, 3, 8h, 8w) for SD (4h, 4w:
        the toy), about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


# ----------------------------------------------------------------------------------------------------
# Building and loading

def build_unet(config) -> UNet:
    """Random init from a diffusers config.json dict, a preset name or a UNetConfig (works on meta)."""
    return UNet(as_config(config, UNetConfig, "unet"))


def build_vae(config) -> VAE:
    return VAE(as_config(config, VAEConfig, "vae"))


WEIGHT_NAMES = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"]
# Old diffusers files (SD 1.5 and 2.1-base still ship them) name the VAE attention query/key/value/proj_attn.
_OLD_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _load(path, subfolder, cls, build, device, dtype, rename=lambda state: state):
    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / subfolder / "config.json").is_file():
        folder = folder / subfolder  # the folder of a whole pipeline: its unet/ or vae/
    raw = read_config(folder)
    try:
        config = cls.from_diffusers(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    files = weight_files(folder, WEIGHT_NAMES)
    state = rename(read_state_dict(files, dtype=dtype, device=device))
    with torch.device("meta"):
        model = build(config)
    return assign(model, state, files[0] if len(files) == 1 else folder).eval()


def load_unet(path, device="cpu", dtype=torch.float32) -> UNet:
    """A diffusers UNet folder (config.json + diffusion_pytorch_model[.fp16].safetensors/.bin, or shards)."""
    return _load(path, "unet", UNetConfig, UNet, device, dtype)


def load_vae(path, device="cpu", dtype=torch.float32) -> VAE:
    def rename(state):
        pattern = r"(attentions\.\d+)\.(query|key|value|proj_attn)\."
        return {re.sub(pattern, lambda m: f"{m[1]}.{_OLD_VAE_ATTN[m[2]]}.", k): v for k, v in state.items()}
    return _load(path, "vae", VAEConfig, VAE, device, dtype, rename)


def preprocess(image: Image.Image, size: int, flip=False) -> torch.Tensor:
    # PIL -> (3, size, size) in [-1, 1], what the VAE encodes, as the official training prepares it
    # (torchvision's Resize, bilinear; CenterCrop; a random flip there, `flip` here): shortest side
    # to `size`, the centre crop, mirrored left to right if `flip`
    im, k = image.convert("RGB"), size / min(image.size)
    w, h = max(size, round(im.width * k)), max(size, round(im.height * k))
    im = im if im.size == (w, h) else im.resize((w, h), Image.BILINEAR)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    im = im.crop((left, top, left + size, top + size))
    im = im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    return x.float() / 127.5 - 1
