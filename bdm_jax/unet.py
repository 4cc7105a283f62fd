"""The ADM/LDM "openaimodel" UNet in flax linen, NHWC (SPEC §3, §11).

Layout (names are the param-tree names):
  time_embed_0/1 (dense) [+ label_emb | class_embedder] ; conv_in (= block input_blocks_0)
  input_blocks_i  : res [+ attn]  or  down          (per resolution level)
  middle_block    : res_0, attn, res_1
  output_blocks_i : res [+ attn] [+ up]             (skip concatenation)
  out_norm, conv_out (zero-initialised)

Variants of the LDM openaimodel (configs/default.py model.*):
* `use_scale_shift_norm`: every ResBlock's emb_dense gives 2C, h = out_norm(h) * (1 + scale) + shift;
* `resblock_updown`: `down` / `up` are ResBlocks that resample (avg-pool / nearest x2) h and the skip
  branch between their in_norm and in_conv, instead of strided / upsampling convs (LDM-8 Churches);
* `use_spatial_transformer`: `attn` is an LDM SpatialTransformer (norm, proj_in, `transformer_depth`
  blocks of self-attention `attn1`, cross-attention `attn2` on a context, GEGLU `ff`; proj_out), and
  `cond_stage="class"` builds CompVis' ClassEmbedder (`class_embedder`, num_classes x context_dim) whose
  output embedding(y)[:, None, :] is that context (LDM-4 ImageNet, cin256-v2).

Every conv/dense is a `QConv`/`QDense` that takes the `QuantPlan`; the UNet itself never branches on
layer names. The block outputs are sown as one dict {block name: features} into
`block_features/blocks` (SPEC §5), which LRM reads with `mutable=["block_features"]`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdm_jax.attention import multihead_attention
from bdm_jax.layers import QConv, QDense, QuantPlan

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BlockInfo:
    """One TimestepEmbedSequential unit of the layout (SPEC §3)."""

    name: str
    index: int  # position in input..middle..output order, 0 .. 2n
    resolution: int  # resolution of the skip feature the block produces (input) or consumes (output)
    channels: int  # channels of the block's output


def timestep_embedding(
    t: jax.Array, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = True, freq_shift: float = 0.0
) -> jax.Array:
    """Sinusoidal embedding; defaults are the LDM openaimodel's [cos | sin] with freqs exp(-ln(P) i / half).

    `flip_sin_to_cos=False, freq_shift=1` is the original DDPM's [sin | cos] with exp(-ln(P) i / (half - 1))
    (diffusers' names for the two conventions), needed to run converted DDPM checkpoints exactly.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    parts = [jnp.cos(args), jnp.sin(args)]
    emb = jnp.concatenate(parts if flip_sin_to_cos else parts[::-1], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm32(nn.Module):
    """GroupNorm computed in float32 whatever the compute dtype (as the reference's GroupNorm32)."""

    groups: int = 32
    dtype: Dtype = jnp.float32
    eps: float = 1e-5  # LDM's; the original DDPM (and its diffusers port) uses 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.GroupNorm(num_groups=self.groups, epsilon=self.eps, dtype=jnp.float32, param_dtype=jnp.float32)(
            x.astype(jnp.float32)
        )
        return y.astype(self.dtype)


def resample(x: jax.Array, how: str | None) -> jax.Array:
    """The parameter-free resampling of an up/down ResBlock (openaimodel, conv_resample off): 2x2 average
    pooling with stride 2, or nearest-neighbour x2."""
    if how == "down":
        return nn.avg_pool(x, (2, 2), strides=(2, 2))
    if how == "up":
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x


class ResBlock(nn.Module):
    out_channels: int
    dropout: float
    groups: int
    dtype: Dtype
    plan: QuantPlan | None
    eps: float = 1e-5
    use_scale_shift_norm: bool = False  # FiLM: emb_dense gives (scale, shift) for out_norm (ADM/LDM)
    resample: str | None = None  # None | "down" | "up" (resblock_updown)

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        h = nn.silu(GroupNorm32(self.groups, self.dtype, self.eps, name="in_norm")(x))
        # openaimodel resamples between in_layers[:-1] and in_conv, and the skip branch alike.
        h, x = resample(h, self.resample), resample(x, self.resample)
        h = QConv(self.out_channels, dtype=self.dtype, plan=self.plan, name="in_conv")(h)
        width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        e = QDense(width, dtype=self.dtype, plan=self.plan, name="emb_dense")(nn.silu(emb))
        e = e[:, None, None, :].astype(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = GroupNorm32(self.groups, self.dtype, self.eps, name="out_norm")(h) * (1 + scale) + shift
            h = nn.silu(h)
        else:
            h = nn.silu(GroupNorm32(self.groups, self.dtype, self.eps, name="out_norm")(h + e))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = QConv(self.out_channels, zero_init=True, dtype=self.dtype, plan=self.plan, name="out_conv")(h)
        if x.shape[-1] != self.out_channels:
            x = QConv(self.out_channels, (1, 1), dtype=self.dtype, plan=self.plan, name="skip")(x)
        return x.astype(h.dtype) + h


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions (LDM AttentionBlock, legacy qkv layout: per head [q|k|v])."""

    num_heads: int
    groups: int
    dtype: Dtype
    plan: QuantPlan | None
    eps: float = 1e-5
    attention_impl: str = "auto"  # bdm_jax.attention.IMPLS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        heads = self.num_heads
        ch = c // heads
        h = GroupNorm32(self.groups, self.dtype, self.eps, name="norm")(x).reshape(b, hgt * wid, c)
        qkv = QDense(3 * c, dtype=self.dtype, plan=self.plan, name="qkv")(h)
        qkv = qkv.reshape(b, hgt * wid, heads, 3, ch)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        out = multihead_attention(self, q, k, v, self.plan, self.dtype, self.attention_impl)
        out = out.reshape(b, hgt * wid, c)
        out = QDense(c, zero_init=True, dtype=self.dtype, plan=self.plan, name="proj_out")(out)
        return x + out.reshape(b, hgt, wid, c).astype(x.dtype)


def _layer_norm(x: jax.Array, dtype: Dtype, name: str) -> jax.Array:
    """torch LayerNorm (eps 1e-5, affine), statistics in float32 like GroupNorm32."""
    y = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name=name)(x.astype(jnp.float32))
    return y.astype(dtype)


class CrossAttention(nn.Module):
    """LDM CrossAttention: to_q on x, to_k / to_v on the context (x itself when None), all three without bias;
    to_out with bias. Its own submodule, so the quantizers q_quant ... attn_quant of attn1 and attn2 differ."""

    heads: int
    dtype: Dtype
    plan: QuantPlan | None
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        b, t, c = x.shape
        context = x if context is None else context
        proj = lambda name: QDense(c, use_bias=False, dtype=self.dtype, plan=self.plan, name=name)  # noqa: E731
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, c // self.heads)  # noqa: E731
        q, k, v = split(proj("to_q")(x)), split(proj("to_k")(context)), split(proj("to_v")(context))
        out = multihead_attention(self, q, k, v, self.plan, self.dtype, self.attention_impl).reshape(b, t, c)
        return QDense(c, dtype=self.dtype, plan=self.plan, name="to_out")(out)


class BasicTransformerBlock(nn.Module):
    """x += attn1(norm1 x); x += attn2(norm2 x, context); x += ff(norm3 x), ff = GEGLU(4c) then dense (LDM)."""

    heads: int
    dtype: Dtype
    plan: QuantPlan | None
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        c = x.shape[-1]
        attn1 = CrossAttention(self.heads, self.dtype, self.plan, self.attention_impl, name="attn1")  # self
        attn2 = CrossAttention(self.heads, self.dtype, self.plan, self.attention_impl, name="attn2")  # cross
        x = x + attn1(_layer_norm(x, self.dtype, "norm1"))
        x = x + attn2(_layer_norm(x, self.dtype, "norm2"), context)
        h = QDense(8 * c, dtype=self.dtype, plan=self.plan, name="ff_proj")(_layer_norm(x, self.dtype, "norm3"))
        h, gate = jnp.split(h, 2, axis=-1)
        h = h * jax.nn.gelu(gate, approximate=False)  # torch F.gelu: the exact erf form
        return x + QDense(c, dtype=self.dtype, plan=self.plan, name="ff_out")(h)


class SpatialTransformer(nn.Module):
    """LDM SpatialTransformer: GroupNorm (eps 1e-6; model.norm_groups groups, 32 in LDM), 1x1 proj_in, `depth`
    transformer blocks over the H*W tokens with cross-attention to `context` (B, T_ctx, context_dim),
    zero-initialised 1x1 proj_out, residual."""

    heads: int
    depth: int
    groups: int
    dtype: Dtype
    plan: QuantPlan | None
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = GroupNorm32(self.groups, self.dtype, 1e-6, name="norm")(x)
        h = QConv(c, (1, 1), dtype=self.dtype, plan=self.plan, name="proj_in")(h).reshape(b, hgt * wid, c)
        for d in range(self.depth):
            h = BasicTransformerBlock(self.heads, self.dtype, self.plan, self.attention_impl,
                                      name=f"transformer_blocks_{d}")(h, context)
        h = QConv(c, (1, 1), zero_init=True, dtype=self.dtype, plan=self.plan, name="proj_out")(
            h.reshape(b, hgt, wid, c))
        return x + h.astype(x.dtype)


class Downsample(nn.Module):
    dtype: Dtype
    plan: QuantPlan | None
    padding: int = 1  # 1: conv pad 1 (LDM); 0: pad bottom/right by 1, conv pad 0 (DDPM, TF "SAME")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = "torch" if self.padding == 1 else ((0, 1), (0, 1))
        return QConv(x.shape[-1], strides=(2, 2), padding=pad, dtype=self.dtype, plan=self.plan, name="conv")(x)


class Upsample(nn.Module):
    dtype: Dtype
    plan: QuantPlan | None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return QConv(x.shape[-1], dtype=self.dtype, plan=self.plan, name="conv")(x)


class Block(nn.Module):
    """One TimestepEmbedSequential: [res] [attn] [down | up]."""

    out_channels: int = 0  # 0: no ResBlock
    attn_heads: int = 0  # 0: no attention
    resample: str | None = None  # None | "down" | "up"
    dropout: float = 0.0
    groups: int = 32
    dtype: Dtype = jnp.float32
    plan: QuantPlan | None = None
    eps: float = 1e-5
    downsample_padding: int = 1
    attention_impl: str = "auto"
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False  # down / up are resampling ResBlocks instead of convs
    transformer_depth: int = 0  # > 0: attn is a SpatialTransformer of this depth, else an AttentionBlock

    def _res(self, channels: int, name: str, how: str | None = None) -> ResBlock:
        return ResBlock(channels, self.dropout, self.groups, self.dtype, self.plan, self.eps,
                        self.use_scale_shift_norm, how, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool, context: jax.Array | None = None) -> jax.Array:
        if self.out_channels:
            x = self._res(self.out_channels, "res")(x, emb, train)
        if self.attn_heads:
            x = attention_layer(self, self.attn_heads, "attn")(x, context)
        if self.resample and self.resblock_updown:  # openaimodel: ResBlock(ch -> ch, down/up=True)
            x = self._res(x.shape[-1], self.resample, self.resample)(x, emb, train)
        elif self.resample == "down":
            x = Downsample(self.dtype, self.plan, self.downsample_padding, name="down")(x)
        elif self.resample == "up":
            x = Upsample(self.dtype, self.plan, name="up")(x)
        return x


def attention_layer(parent: nn.Module, heads: int, name: str) -> Callable[..., jax.Array]:
    """The attention of a block, called as f(x, context): a SpatialTransformer, or an AttentionBlock that
    ignores the context. Created inside the parent's compact __call__ (its submodule `name`)."""
    if parent.transformer_depth:
        return SpatialTransformer(heads, parent.transformer_depth, parent.groups, parent.dtype, parent.plan,
                                  parent.attention_impl, name=name)
    block = AttentionBlock(heads, parent.groups, parent.dtype, parent.plan, parent.eps, parent.attention_impl,
                           name=name)
    return lambda x, context=None: block(x)


class MiddleBlock(nn.Module):
    """Res, Attn, Res at the lowest resolution."""

    channels: int
    attn_heads: int
    dropout: float
    groups: int
    dtype: Dtype
    plan: QuantPlan | None
    eps: float = 1e-5
    attention_impl: str = "auto"
    use_scale_shift_norm: bool = False
    transformer_depth: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool, context: jax.Array | None = None) -> jax.Array:
        res = lambda name: ResBlock(  # noqa: E731
            self.channels, self.dropout, self.groups, self.dtype, self.plan, self.eps, self.use_scale_shift_norm,
            name=name,
        )
        x = res("res_0")(x, emb, train)
        x = attention_layer(self, self.attn_heads, "attn")(x, context)
        return res("res_1")(x, emb, train)


def _heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    return channels // num_head_channels if num_head_channels > 0 else num_heads


def block_specs(cfg: Any) -> tuple[list[dict], dict, list[dict]]:
    """Static structure of the UNet from a model config: (input blocks, middle, output blocks).

    Each entry is a dict of Block fields plus "resolution" (SPEC §3 head/tail rule) and "channels".
    Shared by the module, rules/progressive and the converters, so the block table is computed in one place.
    `cfg` is the model ConfigDict or the UNet module; fields added later (ADDED_MODEL_FIELDS) may be absent.
    """
    mc = cfg.model_channels
    res = cfg.image_size
    attn_res = set(cfg.attention_resolutions)
    heads = lambda c: _heads(c, cfg.num_heads, cfg.num_head_channels)  # noqa: E731
    # The block kinds of the LDM variants (SPEC §11): resampling ResBlocks, SpatialTransformers.
    updown = bool(getattr(cfg, "resblock_updown", False))
    depth = getattr(cfg, "transformer_depth", 1) if getattr(cfg, "use_spatial_transformer", False) else 0
    kinds = dict(updown=updown, transformer_depth=depth)
    inputs = [dict(kind="conv_in", out_channels=0, resolution=res, channels=mc)]
    chans = [mc]
    ch = mc
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            ch = mult * mc
            inputs.append(
                dict(out_channels=ch, attn_heads=heads(ch) if res in attn_res else 0, resample=None,
                     resolution=res, channels=ch, **kinds)
            )
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            res //= 2
            inputs.append(dict(out_channels=0, attn_heads=0, resample="down", resolution=res, channels=ch, **kinds))
            chans.append(ch)
    middle = dict(resolution=res, channels=ch, attn_heads=heads(ch), **kinds)
    outputs = []
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            skip = chans.pop()
            ch = mc * mult
            up = level and i == cfg.num_res_blocks
            outputs.append(
                dict(out_channels=ch, attn_heads=heads(ch) if res in attn_res else 0,
                     resample="up" if up else None, resolution=res, channels=ch, skip_channels=skip, **kinds)
            )
            if up:
                res *= 2
    return inputs, middle, outputs


def block_infos(cfg: Any) -> list[BlockInfo]:
    """The 2n+1 blocks in UNet order with their resolutions (SPEC §3, §6)."""
    inputs, middle, outputs = block_specs(cfg)
    names = [f"input_blocks_{i}" for i in range(len(inputs))] + ["middle_block"]
    names += [f"output_blocks_{i}" for i in range(len(outputs))]
    specs = inputs + [middle] + outputs
    return [BlockInfo(n, i, s["resolution"], s["channels"]) for i, (n, s) in enumerate(zip(names, specs))]


class UNet(nn.Module):
    """openaimodel UNet. `config` is the model ConfigDict (see configs/default.py: model.*)."""

    in_channels: int
    out_channels: int
    image_size: int
    model_channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    dropout: float = 0.0
    num_heads: int = 1
    num_head_channels: int = -1
    num_classes: int = 0
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    plan: QuantPlan | None = None
    # Numerics conventions that leave the param shapes alone (configs/default.py model.*): LDM defaults.
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    attention_impl: str = "auto"  # bdm_jax.attention.IMPLS; the function computed is the same for all
    # LDM variants (configs/default.py model.*; all off = the UNet of LDM-4 Bedrooms / DDPM CIFAR-10).
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int = 512
    cond_stage: str = "none"  # none | class (CompVis ClassEmbedder -> cross-attention context)

    @classmethod
    def from_config(cls, model_cfg: Any, plan: QuantPlan | None = None) -> "UNet":
        return cls(
            in_channels=model_cfg.in_channels,
            out_channels=model_cfg.out_channels,
            image_size=model_cfg.image_size,
            model_channels=model_cfg.model_channels,
            channel_mult=tuple(model_cfg.channel_mult),
            num_res_blocks=model_cfg.num_res_blocks,
            attention_resolutions=tuple(model_cfg.attention_resolutions),
            dropout=model_cfg.dropout,
            num_heads=model_cfg.num_heads,
            num_head_channels=model_cfg.num_head_channels,
            num_classes=model_cfg.num_classes,
            norm_groups=model_cfg.norm_groups,
            dtype=jnp.dtype(model_cfg.dtype),
            plan=plan,
            # .get: configs saved before these fields existed keep today's behaviour.
            flip_sin_to_cos=model_cfg.get("flip_sin_to_cos", True),
            freq_shift=model_cfg.get("freq_shift", 0),
            norm_eps=model_cfg.get("norm_eps", 1e-5),
            downsample_padding=model_cfg.get("downsample_padding", 1),
            attention_impl=model_cfg.get("attention_impl", "auto"),
            use_scale_shift_norm=model_cfg.get("use_scale_shift_norm", False),
            resblock_updown=model_cfg.get("resblock_updown", False),
            use_spatial_transformer=model_cfg.get("use_spatial_transformer", False),
            transformer_depth=model_cfg.get("transformer_depth", 1),
            context_dim=model_cfg.get("context_dim", 512),
            cond_stage=model_cfg.get("cond_stage", "none"),
        )

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool = False):
        inputs, middle, outputs = block_specs(self)
        mc = self.model_channels
        dense = lambda n, name: QDense(n, dtype=self.dtype, plan=self.plan, name=name)  # noqa: E731
        emb = timestep_embedding(t, mc, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
        emb = dense(4 * mc, "time_embed_0")(emb)
        emb = dense(4 * mc, "time_embed_1")(nn.silu(emb))
        if self.num_classes and y is None:
            raise ValueError("model.num_classes > 0 but no labels were passed to the UNet")
        context = None
        if self.cond_stage == "class":
            # CompVis ClassEmbedder (cin256-v2): context = embedding(y)[:, None, :]; an embedding, so FP.
            table = nn.Embed(self.num_classes, self.context_dim, name="class_embedder")
            context = table(y)[:, None, :].astype(self.dtype)
        elif self.num_classes:
            emb = emb + nn.Embed(self.num_classes, 4 * mc, name="label_emb")(y).astype(emb.dtype)

        block = lambda spec, name: Block(  # noqa: E731
            out_channels=spec["out_channels"], attn_heads=spec["attn_heads"], resample=spec["resample"],
            dropout=self.dropout, groups=self.norm_groups, dtype=self.dtype, plan=self.plan, eps=self.norm_eps,
            downsample_padding=self.downsample_padding, attention_impl=self.attention_impl,
            use_scale_shift_norm=self.use_scale_shift_norm, resblock_updown=spec["updown"],
            transformer_depth=spec["transformer_depth"], name=name,
        )
        h = QConv(mc, dtype=self.dtype, plan=self.plan, name="conv_in")(x.astype(self.dtype))
        feats = {"input_blocks_0": h}
        hs = [h]
        for i, spec in enumerate(inputs[1:], start=1):
            h = block(spec, f"input_blocks_{i}")(h, emb, train, context)
            feats[f"input_blocks_{i}"] = h
            hs.append(h)

        h = MiddleBlock(middle["channels"], middle["attn_heads"], self.dropout, self.norm_groups, self.dtype,
                        self.plan, self.norm_eps, self.attention_impl, self.use_scale_shift_norm,
                        middle["transformer_depth"], name="middle_block")(h, emb, train, context)
        feats["middle_block"] = h

        for i, spec in enumerate(outputs):
            h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
            h = block(spec, f"output_blocks_{i}")(h, emb, train, context)
            feats[f"output_blocks_{i}"] = h

        # One sow of the whole dict: variable names would collide with the block submodules' names.
        self.sow("block_features", "blocks", feats)
        h = nn.silu(GroupNorm32(self.norm_groups, self.dtype, self.norm_eps, name="out_norm")(h))
        out = QConv(self.out_channels, zero_init=True, dtype=self.dtype, plan=self.plan, name="conv_out")(h)
        return out.astype(jnp.float32)
