"""Frozen first-stage autoencoders of latent diffusion (SPEC §7, §11): VQ-f4 (VQModel), KL-f8 (AutoencoderKL).

The CompVis `ldm.modules.diffusionmodules.model` Encoder/Decoder in flax linen, NHWC. Param names follow
the CompVis layout, flattened one level: encoder/down_{i}_block_{j}/conv1, encoder/down_{i}_downsample,
encoder/mid_attn_1/q, decoder/up_{i}_block_{j}, decoder/up_{i}_upsample, quant_conv, quantize/embedding,
post_quant_conv (`bdm_jax.convert` fills them from CompVis or diffusers state dicts). Attention only in
the middle block: VQ-f4 and KL-f8 have attn_resolutions = [], and diffusers' models have no other.

    ae = Autoencoder.from_config(config.autoencoder, image_channels=3)
    moments = ae.apply(v, images, method=Autoencoder.encode)   # vq: pre-quantization latents
    z = posterior_latents(ae.kind, moments, rng, sample=True)   # kl: mean + std * noise
    images = ae.apply(v, z, method=Autoencoder.decode)          # vq: nearest code first

The networks never train (only the UNet is binarized, SPEC §7): no dropout, no losses, no codebook update.
GroupNorm, attention softmax and the codebook search run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

KINDS = ("vq", "kl")
# Fields of config.autoencoder that fix the param shapes (plus the image channels); saved with the params.
ARCH_FIELDS = ("kind", "ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "n_embed", "norm_groups")
ARCH_FILE = "autoencoder.json"
PARAMS_DIR = "params"


class AutoencoderError(ValueError):
    """An autoencoder checkpoint that cannot be used with the config; the message names the field."""


def _conv(features: int, kernel: int, dtype: Dtype, name: str | None, stride: int = 1, padding: Any = None) -> nn.Conv:
    pad = padding if padding is not None else [(kernel // 2, kernel // 2)] * 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=pad, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


def _norm(x: jax.Array, groups: int, dtype: Dtype, name: str) -> jax.Array:
    """GroupNorm (eps 1e-6, as CompVis `Normalize` and diffusers' VAEs), statistics in float32."""
    y = nn.GroupNorm(groups, epsilon=1e-6, dtype=jnp.float32, use_fast_variance=False, name=name)(x.astype(jnp.float32))
    return y.astype(dtype)


class ResnetBlock(nn.Module):
    out_channels: int
    groups: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(nn.silu(_norm(x, self.groups, self.dtype, "norm1")))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(nn.silu(_norm(h, self.groups, self.dtype, "norm2")))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "nin_shortcut")(x)
        return x.astype(h.dtype) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q, k, v, proj_out are 1x1 convs (= dense on C)."""

    groups: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = _norm(x, self.groups, self.dtype, "norm").reshape(b, hgt * wid, c)
        dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name)  # noqa: E731
        q, k, v = dense("q")(h), dense("k")(h), dense("v")(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / math.sqrt(c)
        w = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = dense("proj_out")(jnp.einsum("bqk,bkc->bqc", w, v))
        return x + out.reshape(b, hgt, wid, c).astype(x.dtype)


class Downsample(nn.Module):
    """Pad bottom/right by one, then a stride-2 3x3 conv without padding (CompVis; diffusers padding=0)."""

    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(x.shape[-1], 3, self.dtype, "conv", stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, self.dtype, "conv")(x)


def _mid(x: jax.Array, groups: int, dtype: Dtype) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, groups, dtype, name="mid_block_1")(x)
    x = AttnBlock(groups, dtype, name="mid_attn_1")(x)
    return ResnetBlock(c, groups, dtype, name="mid_block_2")(x)


class Encoder(nn.Module):
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    out_channels: int  # z_channels, doubled for kl (mean and log-variance)
    groups: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _conv(self.ch, 3, self.dtype, "conv_in")(x.astype(self.dtype))
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * mult, self.groups, self.dtype, name=f"down_{i}_block_{j}")(h)
            if i != len(self.ch_mult) - 1:
                h = Downsample(self.dtype, name=f"down_{i}_downsample")(h)
        h = _mid(h, self.groups, self.dtype)
        h = nn.silu(_norm(h, self.groups, self.dtype, "norm_out"))
        return _conv(self.out_channels, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    out_channels: int  # image channels
    groups: int
    dtype: Dtype

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        h = _conv(self.ch * self.ch_mult[-1], 3, self.dtype, "conv_in")(z.astype(self.dtype))
        h = _mid(h, self.groups, self.dtype)
        for i in reversed(range(len(self.ch_mult))):
            for j in range(self.num_res_blocks + 1):
                h = ResnetBlock(self.ch * self.ch_mult[i], self.groups, self.dtype, name=f"up_{i}_block_{j}")(h)
            if i != 0:
                h = Upsample(self.dtype, name=f"up_{i}_upsample")(h)
        h = nn.silu(_norm(h, self.groups, self.dtype, "norm_out"))
        return _conv(self.out_channels, 3, self.dtype, "conv_out")(h)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry lookup (VQ-GAN), forward only."""

    n_embed: int
    embed_dim: int

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        # VQ-GAN's init U(-1/n, 1/n); only random-init (test) autoencoders keep it.
        bound = 1.0 / self.n_embed
        init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)  # noqa: E731
        codebook = self.param("embedding", init, (self.n_embed, self.embed_dim))

        def nearest(zi: jax.Array) -> jax.Array:
            # One image at a time: the (positions x codes) distance matrix of a whole batch of LDM-4 latents
            # (B * 4096 x 8192) would not fit.
            flat = zi.reshape(-1, self.embed_dim).astype(jnp.float32)
            d = (jnp.sum(flat**2, axis=1, keepdims=True) - 2.0 * flat @ codebook.T
                 + jnp.sum(codebook**2, axis=1)[None])
            return jnp.take(codebook, jnp.argmin(d, axis=1), axis=0).reshape(zi.shape)

        return jax.lax.map(nearest, z).astype(z.dtype)


class Autoencoder(nn.Module):
    """VQModel / AutoencoderKL of the LDM first stage. `encode` -> moments, `decode` latents -> images."""

    kind: str  # vq | kl
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    n_embed: int
    image_channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, ae_cfg: Any, image_channels: int) -> "Autoencoder":
        if ae_cfg.kind not in KINDS:
            raise AutoencoderError(f"config.autoencoder.kind={ae_cfg.kind!r} is not allowed: one of {', '.join(KINDS)}")
        return cls(kind=ae_cfg.kind, ch=ae_cfg.ch, ch_mult=tuple(ae_cfg.ch_mult), num_res_blocks=ae_cfg.num_res_blocks,
                   z_channels=ae_cfg.z_channels, embed_dim=ae_cfg.embed_dim, n_embed=ae_cfg.n_embed,
                   image_channels=image_channels, norm_groups=ae_cfg.norm_groups, dtype=jnp.dtype(ae_cfg.dtype))

    @property
    def factor(self) -> int:
        """Spatial downsampling factor f (VQ-f4: 4, KL-f8: 8)."""
        return 2 ** (len(self.ch_mult) - 1)

    def setup(self):
        kl = self.kind == "kl"
        self.encoder = Encoder(self.ch, self.ch_mult, self.num_res_blocks, self.z_channels * (2 if kl else 1),
                               self.norm_groups, self.dtype)
        self.quant_conv = _conv(self.embed_dim * (2 if kl else 1), 1, self.dtype, None)
        if not kl:
            self.quantize = VectorQuantizer(self.n_embed, self.embed_dim)
        self.post_quant_conv = _conv(self.z_channels, 1, self.dtype, None)
        self.decoder = Decoder(self.ch, self.ch_mult, self.num_res_blocks, self.image_channels, self.norm_groups,
                               self.dtype)

    def encode(self, x: jax.Array) -> jax.Array:
        """Images [-1, 1] -> float32 moments: vq: pre-quantization latents (LDM's `encode`); kl: [mean | logvar]."""
        return self.quant_conv(self.encoder(x)).astype(jnp.float32)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents (unscaled) -> float32 images; vq snaps z to the codebook first (LDM's `decode`)."""
        if self.kind == "vq":
            z = self.quantize(z)
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        moments = self.encode(x)
        return self.decode(moments[..., : self.embed_dim])


def posterior_latents(kind: str, moments: jax.Array, rng: jax.Array | None, sample: bool) -> jax.Array:
    """Unscaled latents from `encode`'s moments: vq as is; kl a draw of N(mean, exp(logvar)) or its mean.

    logvar is clipped to [-30, 20] as in the LDM DiagonalGaussianDistribution.
    """
    if kind == "vq":
        return moments
    mean, logvar = jnp.split(moments, 2, axis=-1)
    if not sample:
        return mean
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    return mean + std * jax.random.normal(rng, mean.shape, mean.dtype)


def random_params(module: Autoencoder, seed: int) -> Any:
    """Random params for tests and smoke runs: torch-style U(+-1/sqrt(fan_in)) kernels, zero biases, unit
    norms, U(+-1/n) codes. Drawn with numpy: XLA takes ~20 s on a CPU to compile flax's threefry init
    of even a tiny autoencoder."""
    import numpy as np

    s = 2 * module.factor
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, s, s, module.image_channels)))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
        elif name == "embedding":
            bound = 1.0 / shape[0]
        else:
            return jnp.full(shape, 1.0 if name == "scale" else 0.0, jnp.float32)
        return jnp.asarray(rng.uniform(-bound, bound, shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# ------------------------------------------------------------------------------------------ files
def architecture(ae_cfg: Any, image_channels: int) -> dict:
    """The fields that fix the param shapes of an autoencoder (saved next to its params)."""
    arch = {f: (list(ae_cfg[f]) if f == "ch_mult" else ae_cfg[f]) for f in ARCH_FIELDS}
    if arch["kind"] == "kl":
        arch.pop("n_embed")  # no codebook
    arch["image_channels"] = image_channels
    return arch


def save_params(path: str, ae_cfg: Any, image_channels: int, params: Any, meta: dict | None = None) -> str:
    """Write `params` (orbax, <path>/params) and the architecture JSON (<path>/autoencoder.json)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    target = os.path.join(path, PARAMS_DIR)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(target, jax.tree.map(jnp.asarray, params), force=True)
    ckptr.wait_until_finished()
    info = {"architecture": architecture(ae_cfg, image_channels), **(meta or {})}
    tmp = os.path.join(path, ARCH_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, ARCH_FILE))
    return path


def load_params(path: str, ae_cfg: Any, image_channels: int) -> Any:
    """Params saved by `save_params`, after checking their architecture against config.autoencoder."""
    import orbax.checkpoint as ocp

    info_path = os.path.join(path, ARCH_FILE)
    if not os.path.isfile(info_path):
        raise AutoencoderError(
            f"config.autoencoder.path={path!r} has no {ARCH_FILE}: write it with `python -m bdm_jax.convert`"
        )
    with open(info_path) as f:
        have = json.load(f)["architecture"]
    want = architecture(ae_cfg, image_channels)
    for key, value in want.items():
        if have.get(key) != value:
            field = "data.channels" if key == "image_channels" else f"autoencoder.{key}"
            raise AutoencoderError(
                f"autoencoder {path} was written for {field}={have.get(key)!r} but the config says {value!r}; "
                "use the matching config"
            )
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), PARAMS_DIR))
    except Exception as e:  # noqa: BLE001 - orbax raises several types; reported with the path
        raise AutoencoderError(
            f"autoencoder params in {path} could not be restored ({type(e).__name__}: {e})"
        ) from None
    return jax.tree.map(jnp.asarray, params)
