"""Reference PyTorch models for the converter tests: diffusers models from explicit configs with random
weights, and their state dicts renamed to the CompVis (LDM repo) layout.

The CompVis renames are written from the LDM repo's module structure (openaimodel `UNetModel`:
input_blocks.{i}.{0 res | 1 attn | 0.op down | 0 ResBlock(down)}, output_blocks.{i}.{0 res | 1 attn | 1/2 up},
ResBlock in_layers.{0,2} / emb_layers.1 / out_layers.{0,3}
/ skip_connection, AttentionBlock norm / qkv (conv1d, per head [q|k|v]) / proj_out; first stage
`Encoder`/`Decoder`: down.{i}.block.{j}, down.{i}.downsample.conv, mid.block_1 / attn_1 (1x1 convs q, k, v,
proj_out) / block_2, up.{i}.block.{j}, up.{i}.upsample.conv, norm_out), independently of bdm_jax.convert.
"""

from __future__ import annotations

import re

import numpy as np
import torch

# google/ddpm-cifar10-32's config.json (SPEC §11), and a small-channel variant of the same layout.
DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    act_fn="silu", center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional",
)
DDPM_SMALL = dict(DDPM_CIFAR10, sample_size=16, block_out_channels=(32, 64, 64, 64), norm_num_groups=8)
# LDM openaimodel-style: attention at three resolutions with 8 channels per head (heads 2/3/4 per level).
LDM_SMALL = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 48, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
    norm_num_groups=8,
)
# LDM-4 Bedrooms' UNet as a diffusers config (its layout is diffusers' UNet2DModel default).
LDM4_BEDROOMS = dict(
    sample_size=64, in_channels=3, out_channels=3, block_out_channels=(224, 448, 672, 896), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32,
)

# LDM-8 Churches-style UNet2DModel (lsun_churches-ldm-kl-8.yaml: use_scale_shift_norm, resblock_updown), small:
# both resnet-resampling block kinds (AttnDownBlock2D with downsample_type=resnet, ResnetDownsampleBlock2D).
# attn_norm_num_groups keeps the mid-block attention's GroupNorm, which openaimodel always has.
CHURCHES_SMALL = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32, 64), layers_per_block=2,
    down_block_types=("AttnDownBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D"),
    downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift", attention_head_dim=8,
    norm_num_groups=8, attn_norm_num_groups=8,
)
# The full LDM-8 Churches UNet as a UNet2DModel. Its 8 heads at every width are not expressible there
# (attention_head_dim is one channels-per-head for all levels); heads do not change the parameter shapes.
LDM8_CHURCHES = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(192, 384, 384, 768, 768), layers_per_block=2,
    down_block_types=("AttnDownBlock2D",) * 4 + ("DownBlock2D",),
    up_block_types=("ResnetUpsampleBlock2D",) + ("AttnUpBlock2D",) * 4,
    downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift", attention_head_dim=None,
    attn_norm_num_groups=32,
)
# Class-conditional LDM (cin256-v2.yaml: SpatialTransformer with cross-attention to the ClassEmbedder) as a
# UNet2DConditionModel, small: attention_head_dim is diffusers' legacy name for the head COUNT per level
# (here 8 channels per head), transformer depth 2 to cover the block loop.
CIN_SMALL = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 48, 80), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 6, 10), cross_attention_dim=16, transformer_layers_per_block=2, norm_num_groups=8,
)
# cin256-v2's UNet: model_channels 192, mult (1, 2, 3, 5), attention at ds 2/4/8, ONE head (num_heads: 1), context 512.
LDM4_CIN = dict(
    sample_size=64, in_channels=3, out_channels=3, block_out_channels=(192, 384, 576, 960), layers_per_block=2,
    down_block_types=CIN_SMALL["down_block_types"], up_block_types=CIN_SMALL["up_block_types"],
    attention_head_dim=1, cross_attention_dim=512, transformer_layers_per_block=1,
)

VAE_SMALL = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=2,
                 norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3)
VQ_SMALL = dict(VAE_SMALL, latent_channels=3, num_vq_embeddings=64, vq_embed_dim=3)
KL_SMALL = dict(VAE_SMALL, latent_channels=4)
# models/first_stage_models/{vq-f4,kl-f8}/config.yaml of the LDM repo, as diffusers configs.
VQ_F4 = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512), layers_per_block=2,
             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
             latent_channels=3, num_vq_embeddings=8192, vq_embed_dim=3)
KL_F8 = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             latent_channels=4)


def perturb_vectors(model: torch.nn.Module, seed: int = 0) -> None:
    """Random GroupNorm scales/biases and conv/linear biases (defaults 1/0 would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def shape_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Zero-stride float32 arrays with the shapes of a (meta-device) model's state dict: no memory."""
    return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """||ours - ref|| / ||ref|| (Frobenius over the whole tensor)."""
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(np.asarray(ref, np.float64)))


# ----------------------------------------------------------------------------------------- UNet
class _Tracked(dict):
    """A dict that records which keys were read."""

    def __init__(self, data: dict, used: set):
        super().__init__(data)
        self.used = used

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)


def _legacy_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int) -> np.ndarray:
    """openaimodel QKVAttentionLegacy layout: rows of head 0 [q0; k0; v0], then head 1, ..."""
    ch = q.shape[0] // heads
    rows = []
    for h in range(heads):
        rows += [q[h * ch:(h + 1) * ch], k[h * ch:(h + 1) * ch], v[h * ch:(h + 1) * ch]]
    return np.concatenate(rows, axis=0)


def unet_to_compvis(sd: dict, dcfg: dict, prefix: str = "model.diffusion_model.") -> dict[str, np.ndarray]:
    """A diffusers UNet2DModel / UNet2DConditionModel state dict under LDM openaimodel names (qkv conv1d
    fused, 1x1 convs 3-D; Transformer2DModel keys are already the SpatialTransformer's)."""
    used: set[str] = set()
    full, sd = sd, _Tracked(sd, used)
    nrb = dcfg["layers_per_block"]
    boc = dcfg["block_out_channels"]
    head_dim = dcfg["attention_head_dim"]
    heads = lambda c: 1 if head_dim is None else c // head_dim  # noqa: E731
    out: dict[str, np.ndarray] = {}

    def res(src: str, dst: str) -> None:
        for a, b in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                     ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")):
            for p in ("weight", "bias"):
                if f"{src}.{a}.{p}" in sd:
                    out[f"{dst}.{b}.{p}"] = sd[f"{src}.{a}.{p}"]

    def resampler(src: str, dst: str, conv_name: str) -> None:
        # diffusers' downsamplers.0 / upsamplers.0: a conv module, or a ResnetBlock2D (openaimodel: ResBlock(down/up))
        if f"{src}.conv.weight" in full:
            for p in ("weight", "bias"):
                out[f"{dst}.{conv_name}.{p}"] = sd[f"{src}.conv.{p}"]
        else:
            res(src, dst)

    def attn(src: str, dst: str, c: int) -> None:
        if f"{src}.proj_in.weight" in full:  # Transformer2DModel: the LDM SpatialTransformer's names
            for key in [k for k in full if k.startswith(src + ".")]:
                out[dst + key[len(src):]] = sd[key]
            return
        out[f"{dst}.norm.weight"] = sd[f"{src}.group_norm.weight"]
        out[f"{dst}.norm.bias"] = sd[f"{src}.group_norm.bias"]
        for p in ("weight", "bias"):
            q, k, v = (sd[f"{src}.to_{n}.{p}"] for n in "qkv")
            fused = _legacy_qkv(q, k, v, heads(c))
            out[f"{dst}.qkv.{p}"] = fused[..., None] if p == "weight" else fused
            w = sd[f"{src}.to_out.0.{p}"]
            out[f"{dst}.proj_out.{p}"] = w[..., None] if p == "weight" else w

    for src, dst in (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                     ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")):
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = sd[f"{src}.{p}"]
    idx = 1
    for level, kind in enumerate(dcfg["down_block_types"]):
        for j in range(nrb):
            res(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{idx}.0")
            if kind.startswith(("Attn", "CrossAttn")):
                attn(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{idx}.1", boc[level])
            idx += 1
        if level != len(boc) - 1:
            resampler(f"down_blocks.{level}.downsamplers.0", f"input_blocks.{idx}.0", "op")
            idx += 1
    res("mid_block.resnets.0", "middle_block.0")
    attn("mid_block.attentions.0", "middle_block.1", boc[-1])
    res("mid_block.resnets.1", "middle_block.2")
    k = 0
    for u, kind in enumerate(dcfg["up_block_types"]):
        c = boc[len(boc) - 1 - u]
        for j in range(nrb + 1):
            res(f"up_blocks.{u}.resnets.{j}", f"output_blocks.{k}.0")
            has_attn = kind.startswith(("Attn", "CrossAttn"))
            if has_attn:
                attn(f"up_blocks.{u}.attentions.{j}", f"output_blocks.{k}.1", c)
            if j == nrb and u != len(boc) - 1:  # openaimodel: the block's last layer, after res [+ attn]
                resampler(f"up_blocks.{u}.upsamplers.0", f"output_blocks.{k}.{2 if has_attn else 1}", "conv")
            k += 1
    assert used == set(full), f"diffusers tensors without a CompVis name: {sorted(set(full) - used)[:3]}"
    return {prefix + key: v for key, v in out.items()}


# ---------------------------------------------------------------------------------- first stage
def autoencoder_to_compvis(sd: dict, levels: int, prefix: str = "first_stage_model.") -> dict[str, np.ndarray]:
    """A diffusers VQModel/AutoencoderKL state dict under the LDM first-stage names (attention as 1x1 convs)."""
    subs = [
        (r"^(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"\1.down.\2.block.\3."),
        (r"^(encoder)\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"\1.down.\2.downsample.conv."),
        (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
        (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.conv_norm_out\.", ".norm_out."),
    ]
    out = {}
    for key, v in sd.items():
        new = key
        for pat, rep in subs:
            new = re.sub(pat, rep, new)
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", new)
        if m:  # diffusers counts decoder levels from the bottom, CompVis from the top
            level = levels - 1 - int(m.group(1))
            new = (f"decoder.up.{level}.block.{m.group(3)}.{m.group(4)}" if m.group(2) == "resnets"
                   else f"decoder.up.{level}.upsample.{m.group(4)}")
        if ".mid.attn_1." in new and new.endswith("weight") and not new.endswith("norm.weight"):
            v = v[..., None, None]  # CompVis attention projections are 1x1 Conv2d
        out[prefix + new] = v
    return out
