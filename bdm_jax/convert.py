"""Pretrained PyTorch checkpoints -> bdm_jax params: the UNet and the LDM first stage (issue 7).

Two source layouts:
* diffusers: `UNet2DModel` (e.g. google/ddpm-cifar10-32), `UNet2DConditionModel` (the spatial-transformer
  UNet), `VQModel`, `AutoencoderKL` state dicts, with the model's config.json;
* CompVis: the LDM repo's `model.ckpt` (openaimodel UNet under `model.diffusion_model.`, first stage under
  `first_stage_model.`, EMA copies under `model_ema.`), or a first-stage-only checkpoint.

Every converter builds a name table from the bdm config's layout (our param path <- source key, and how
to transform it: OIHW conv -> HWIO, [out, in] linear / 1x1 conv -> [in, out], separate q/k/v -> the fused
legacy per-head [q|k|v] qkv of `bdm_jax.unet.AttentionBlock`), then checks the result against the
abstract params of the bdm model: every param filled with its shape, every source tensor used.

CLI (writes a teacher workdir that `bdm_jax.checkpoint.load_params` reads, and/or an autoencoder dir
that config.autoencoder.path names):

    python -m bdm_jax.convert --kind=unet --format=diffusers --input=ddpm-cifar10-32/ \\
        --config=configs/ddpm_cifar10.py --out=workdirs/cifar10_teacher
    python -m bdm_jax.convert --kind=ldm --input=lsun_bedrooms/model.ckpt \\
        --config=configs/ldm4_bedrooms.py --out=workdirs/bedrooms_teacher

Layouts that cannot be mapped (diffusers blocks without an openaimodel twin, e.g. a UNet2DModel whose
scale-shift mid-block attention has no GroupNorm, linear proj_in, SimpleCrossAttn blocks, cross-attention
with resampling ResBlocks) raise ConversionError naming the config.json field.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from bdm_jax.autoencoder import Autoencoder
from bdm_jax.config import ADDED_MODEL_FIELDS
from bdm_jax.unet import UNet, _heads, block_specs

StateDict = Mapping[str, np.ndarray]

COMPVIS_UNET_PREFIX = "model.diffusion_model."
COMPVIS_AE_PREFIX = "first_stage_model."
# The ClassEmbedder of class-conditional LDMs (cin256-v2: nn.Embedding(1001, 512)); the UNet holds it here.
COMPVIS_CLASS_EMBEDDER = "cond_stage_model.embedding.weight"
# Tensors of a checkpoint that a converter may leave unused: the training losses (LPIPS, discriminator)
# of first-stage checkpoints.
_AE_IGNORED = ("loss.",)


class ConversionError(ValueError):
    """A checkpoint that does not fit the config; the message is one line naming key or field."""


# ------------------------------------------------------------------------------------------ loading
def load_state_dict(path: str, unsafe_pickle: bool = False) -> dict[str, np.ndarray]:
    """A checkpoint file as {key: float32/int numpy array}: .safetensors, or a torch pickle (.bin/.ckpt/.pt).

    Lightning checkpoints (`{"state_dict": ...}`) are unwrapped. Torch pickles load with
    `weights_only=True` unless `unsafe_pickle` (only for files you trust).
    """
    if not os.path.isfile(path):
        raise ConversionError(f"--input={path} is not a file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ConversionError(f"reading {path} needs the safetensors package (pip install safetensors)") from None
        try:
            return {k: _to_f32(v) for k, v in load_file(path).items()}
        except (TypeError, ValueError):  # bfloat16 tensors, which numpy cannot hold: go through torch
            from safetensors.torch import load_file as load_torch

            return _torch_to_numpy(load_torch(path))
    try:
        import torch
    except ImportError:
        raise ConversionError(f"reading {path} needs PyTorch (pip install torch, CPU build is enough)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except Exception as e:  # noqa: BLE001 - torch raises many types for refused or broken pickles
        hint = "" if unsafe_pickle else "; if you trust the file, pass --unsafe_pickle"
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConversionError(f"{path} could not be read ({type(e).__name__}: {first}){hint}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return _torch_to_numpy(obj)


def _to_f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a


def _torch_to_numpy(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    import torch

    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            out[k] = (v.float() if v.is_floating_point() else v).numpy()
    return out


# ------------------------------------------------------------------------------------ transforms
def _conv(w: np.ndarray) -> np.ndarray:
    """torch conv weight [out, in, kh, kw] -> flax HWIO."""
    return np.transpose(w, (2, 3, 1, 0))


def _dense(w: np.ndarray) -> np.ndarray:
    """torch linear [out, in] (or a 1x1 conv / conv1d [out, in, 1(, 1)]) -> flax [in, out]."""
    return np.reshape(w, w.shape[:2]).T


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int) -> np.ndarray:
    """Separate q, k, v ([out, ...] on axis 0) -> the legacy fused layout: per head [q | k | v] on axis 0."""
    c = q.shape[0]
    parts = [x.reshape(heads, c // heads, *x.shape[1:]) for x in (q, k, v)]
    return np.stack(parts, axis=1).reshape(3 * c, *q.shape[1:])


def qkv_new_to_legacy(w: np.ndarray, heads: int) -> np.ndarray:
    """openaimodel's `use_new_attention_order` qkv ([q all heads | k | v] on axis 0) -> legacy per-head."""
    q, k, v = np.split(w, 3, axis=0)
    return fuse_qkv(q, k, v, heads)


class _Table:
    """Collects our params from a state dict, remembering which source keys were used."""

    def __init__(self, sd: StateDict, what: str):
        self.sd = sd
        self.what = what
        self.used: set[str] = set()
        self.out: dict[tuple[str, ...], np.ndarray] = {}

    def has(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str) -> np.ndarray:
        if key not in self.sd:
            near = sorted(k for k in self.sd if k.rsplit(".", 2)[0] == key.rsplit(".", 2)[0])[:4]
            raise ConversionError(
                f"{self.what}: the checkpoint has no tensor {key!r} that the config's layout needs"
                + (f" (found {', '.join(near)})" if near else "") + "; is it the checkpoint of this config?"
            )
        self.used.add(key)
        return np.asarray(self.sd[key])

    def put(self, path: str, value: np.ndarray) -> None:
        self.out[tuple(path.split("/"))] = value

    def conv(self, ours: str, src: str) -> None:
        self.put(f"{ours}/kernel", _conv(self.take(f"{src}.weight")))
        self.put(f"{ours}/bias", self.take(f"{src}.bias"))

    def dense(self, ours: str, src: str) -> None:
        self.put(f"{ours}/kernel", _dense(self.take(f"{src}.weight")))
        self.put(f"{ours}/bias", self.take(f"{src}.bias"))

    def norm(self, ours: str, src: str) -> None:
        self.put(f"{ours}/scale", self.take(f"{src}.weight"))
        self.put(f"{ours}/bias", self.take(f"{src}.bias"))

    def finish(self, abstract: Any, ignore: tuple[str, ...] = ()) -> dict:
        """Nested params; every abstract leaf filled with its shape, every source key used."""
        want = traverse_util.flatten_dict(abstract)
        missing = sorted("/".join(k) for k in want if k not in self.out)
        if missing:
            raise ConversionError(f"{self.what}: no source tensor for {len(missing)} params, e.g. {missing[:3]}")
        extra = sorted("/".join(k) for k in self.out if k not in want)
        if extra:
            raise ConversionError(f"{self.what}: the checkpoint has params the config's model lacks, e.g. {extra[:3]}")
        for k, leaf in want.items():
            if tuple(self.out[k].shape) != tuple(leaf.shape):
                raise ConversionError(
                    f"{self.what}: {'/'.join(k)} has shape {tuple(self.out[k].shape)} in the checkpoint but "
                    f"{tuple(leaf.shape)} in the config's model; the config does not match the checkpoint"
                )
        unused = sorted(k for k in self.sd if k not in self.used and not k.startswith(ignore))
        if unused:
            raise ConversionError(
                f"{self.what}: {len(unused)} checkpoint tensors have no place in the config's model, e.g. "
                f"{unused[:4]}; the config does not match the checkpoint (or it has layers bdm_jax lacks)"
            )
        return traverse_util.unflatten_dict(self.out)


def _sub(sd: StateDict, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def rename_deprecated_attention(sd: StateDict) -> dict[str, np.ndarray]:
    """Old diffusers attention names (query/key/value/proj_attn, e.g. google/ddpm-cifar10-32) -> current ones."""
    names = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    pattern = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
    return {pattern.sub(lambda m: m.group(1) + names[m.group(2)] + ".", k): v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------- UNet
def abstract_unet_params(model_cfg: Any) -> Any:
    net = UNet.from_config(model_cfg)
    s, c = model_cfg.image_size, model_cfg.in_channels
    y = jnp.zeros((1,), jnp.int32) if model_cfg.num_classes else None
    return jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, s, s, c)), jnp.zeros((1,), jnp.int32), y)["params"]


def _level_blocks(model_cfg: Any):
    """(input block index, level, j, spec) and (output block index, up-level u, j, spec) in UNet order."""
    inputs, _, outputs = block_specs(model_cfg)
    levels = len(model_cfg.channel_mult)
    ins, idx = [], 1
    for level in range(levels):
        for j in range(model_cfg.num_res_blocks + (level != levels - 1)):
            ins.append((idx, level, j, inputs[idx]))
            idx += 1
    outs = [(k, k // (model_cfg.num_res_blocks + 1), k % (model_cfg.num_res_blocks + 1), spec)
            for k, spec in enumerate(outputs)]
    return ins, outs


# Source names of a ResBlock's tensors (our layer -> the layout's module), diffusers ResnetBlock2D and
# CompVis openaimodel ResBlock; the skip conv exists only where the channels change.
_DIFFUSERS_RESBLOCK = dict(in_norm="norm1", in_conv="conv1", emb_dense="time_emb_proj", out_norm="norm2",
                           out_conv="conv2", skip="conv_shortcut")
_COMPVIS_RESBLOCK = dict(in_norm="in_layers.0", in_conv="in_layers.2", emb_dense="emb_layers.1",
                         out_norm="out_layers.0", out_conv="out_layers.3", skip="skip_connection")


def _resblock(t: "_Table", ours: str, src: str, names: Mapping[str, str]) -> None:
    """One ResBlock (scale-shift and resampling variants have the same tensors) under `names`."""
    t.norm(f"{ours}/in_norm/GroupNorm_0", f"{src}.{names['in_norm']}")
    t.conv(f"{ours}/in_conv", f"{src}.{names['in_conv']}")
    t.dense(f"{ours}/emb_dense", f"{src}.{names['emb_dense']}")
    t.norm(f"{ours}/out_norm/GroupNorm_0", f"{src}.{names['out_norm']}")
    t.conv(f"{ours}/out_conv", f"{src}.{names['out_conv']}")
    if t.has(f"{src}.{names['skip']}.weight"):
        t.conv(f"{ours}/skip", f"{src}.{names['skip']}")


def _transformer(t: _Table, ours: str, src: str, depth: int) -> None:
    """A SpatialTransformer; CompVis (`ldm.modules.attention`) and diffusers (`Transformer2DModel` with
    use_linear_projection=False) name its tensors alike below `src`."""
    t.norm(f"{ours}/norm/GroupNorm_0", f"{src}.norm")
    t.conv(f"{ours}/proj_in", f"{src}.proj_in")
    for d in range(depth):
        ob, sb = f"{ours}/transformer_blocks_{d}", f"{src}.transformer_blocks.{d}"
        for n in ("norm1", "norm2", "norm3"):
            t.norm(f"{ob}/{n}", f"{sb}.{n}")
        for a in ("attn1", "attn2"):
            for n in "qkv":  # bias-free projections
                t.put(f"{ob}/{a}/to_{n}/kernel", _dense(t.take(f"{sb}.{a}.to_{n}.weight")))
            t.dense(f"{ob}/{a}/to_out", f"{sb}.{a}.to_out.0")
        t.dense(f"{ob}/ff_proj", f"{sb}.ff.net.0.proj")  # GEGLU: [value | gate]
        t.dense(f"{ob}/ff_out", f"{sb}.ff.net.2")
    t.conv(f"{ours}/proj_out", f"{src}.proj_out")


def _class_embedder(t: _Table) -> None:
    """The CompVis ClassEmbedder (`cond_stage_model.embedding.weight`) of a cond_stage='class' config."""
    t.put("class_embedder/embedding", t.take(COMPVIS_CLASS_EMBEDDER))


def unet_from_diffusers(sd: StateDict, model_cfg: Any) -> dict:
    """diffusers `UNet2DModel` or `UNet2DConditionModel` state dict -> params of `UNet.from_config(model_cfg)`.

    UNet2DModel: (Attn)DownBlock2D / ResnetDownsampleBlock2D and their up blocks, resnet_time_scale_shift
    default or scale_shift, conv or resnet resampling (model.resblock_updown). UNet2DConditionModel
    (model.use_spatial_transformer): (CrossAttn)DownBlock2D / (CrossAttn)UpBlock2D with conv proj_in.
    diffusers has no ClassEmbedder: for model.cond_stage='class' the state dict must also hold its table
    under the CompVis name `cond_stage_model.embedding.weight`, else ConversionError names that key.
    The numerics options (heads, time embedding, eps, padding) are not in the state dict: check them with
    `check_unet_config(model_cfg, diffusers_unet_config(config_json))`.
    """
    cls = "UNet2DConditionModel" if model_cfg.get("use_spatial_transformer", False) else "UNet2DModel"
    t = _Table(rename_deprecated_attention(sd), f"diffusers {cls}")

    res = functools.partial(_resblock, t, names=_DIFFUSERS_RESBLOCK)

    def attn(ours: str, src: str, spec: dict) -> None:
        if spec["transformer_depth"]:
            _transformer(t, ours, src, spec["transformer_depth"])
            return
        heads = spec["attn_heads"]
        t.norm(f"{ours}/norm/GroupNorm_0", f"{src}.group_norm")
        w = [t.take(f"{src}.to_{n}.weight") for n in "qkv"]
        b = [t.take(f"{src}.to_{n}.bias") for n in "qkv"]
        t.put(f"{ours}/qkv/kernel", _dense(fuse_qkv(*w, heads)))
        t.put(f"{ours}/qkv/bias", fuse_qkv(*b, heads))
        t.dense(f"{ours}/proj_out", f"{src}.to_out.0")

    def resampler(ours: str, src: str, spec: dict) -> None:
        # diffusers' downsamplers.0 / upsamplers.0: a ResnetBlock2D(down/up=True) or a conv module.
        if spec["updown"]:
            res(f"{ours}/{spec['resample']}", src)
        else:
            t.conv(f"{ours}/{spec['resample']}/conv", f"{src}.conv")

    t.dense("time_embed_0", "time_embedding.linear_1")
    t.dense("time_embed_1", "time_embedding.linear_2")
    t.conv("conv_in", "conv_in")
    ins, outs = _level_blocks(model_cfg)
    for idx, level, j, spec in ins:
        if spec["resample"] == "down":
            resampler(f"input_blocks_{idx}", f"down_blocks.{level}.downsamplers.0", spec)
            continue
        res(f"input_blocks_{idx}/res", f"down_blocks.{level}.resnets.{j}")
        if spec["attn_heads"]:
            attn(f"input_blocks_{idx}/attn", f"down_blocks.{level}.attentions.{j}", spec)
    _, middle, _ = block_specs(model_cfg)
    res("middle_block/res_0", "mid_block.resnets.0")
    attn("middle_block/attn", "mid_block.attentions.0", middle)
    res("middle_block/res_1", "mid_block.resnets.1")
    for k, u, j, spec in outs:
        res(f"output_blocks_{k}/res", f"up_blocks.{u}.resnets.{j}")
        if spec["attn_heads"]:
            attn(f"output_blocks_{k}/attn", f"up_blocks.{u}.attentions.{j}", spec)
        if spec["resample"] == "up":
            resampler(f"output_blocks_{k}", f"up_blocks.{u}.upsamplers.0", spec)
    t.norm("out_norm/GroupNorm_0", "conv_norm_out")
    t.conv("conv_out", "conv_out")
    if model_cfg.get("cond_stage", "none") == "class":
        _class_embedder(t)
    elif model_cfg.num_classes:
        t.put("label_emb/embedding", t.take("class_embedding.weight"))
    return t.finish(abstract_unet_params(model_cfg))


def compvis_ema(sd: StateDict, prefix: str = COMPVIS_UNET_PREFIX) -> tuple[dict[str, np.ndarray], bool]:
    """The UNet tensors of an LDM checkpoint with the EMA copies swapped in where the checkpoint has them.

    LDM's LitEma stores `model.diffusion_model.a.b.weight` as `model_ema.diffusion_modelabweight`.
    Returns (state dict, whether EMA weights were found).
    """
    out, found = dict(sd), False
    for k in sd:
        if k.startswith(prefix):
            ema = "model_ema." + k[len("model."):].replace(".", "")
            if ema in sd:
                out[k] = sd[ema]
                found = True
    return out, found


def unet_from_compvis(sd: StateDict, model_cfg: Any, prefix: str | None = None,
                      attention_order: str = "legacy") -> dict:
    """LDM openaimodel `UNetModel` state dict (CompVis layout) -> params of `UNet.from_config(model_cfg)`.

    Covers the openaimodel variants of the UNet module: scale-shift ResBlocks (emb_layers.1 gives 2C),
    resampling ResBlocks (resblock_updown: input_blocks.N.0 and the last layer of an output block,
    output_blocks.N.1 or .2, are ResBlocks), SpatialTransformers (input_blocks.N.1.{norm, proj_in,
    transformer_blocks.D.{attn1, attn2, norm1-3, ff}, proj_out}) and, for model.cond_stage='class', the
    ClassEmbedder `cond_stage_model.embedding.weight` found beside the UNet in a full LDM checkpoint.
    `prefix`: None finds it (`model.diffusion_model.` of a full LDM checkpoint, or none for a bare UNet).
    `attention_order`: "legacy" (QKVAttentionLegacy, the LDM default) or "new" (use_new_attention_order).
    """
    if attention_order not in ("legacy", "new"):
        raise ConversionError(f"attention_order={attention_order!r} is not allowed: legacy or new")
    if prefix is None:
        prefix = COMPVIS_UNET_PREFIX if any(k.startswith(COMPVIS_UNET_PREFIX) for k in sd) else ""
    sub = _sub(sd, prefix)
    if not sub:
        raise ConversionError(f"the checkpoint has no tensors under {prefix!r}: not an LDM checkpoint")
    if model_cfg.get("cond_stage", "none") == "class" and COMPVIS_CLASS_EMBEDDER in sd:
        sub[COMPVIS_CLASS_EMBEDDER] = sd[COMPVIS_CLASS_EMBEDDER]  # the LDM's cond_stage_model, beside the UNet
    t = _Table(sub, f"CompVis UNet ({prefix or 'no prefix'})")

    res = functools.partial(_resblock, t, names=_COMPVIS_RESBLOCK)

    def attn(ours: str, src: str, spec: dict) -> None:
        if spec["transformer_depth"]:
            _transformer(t, ours, src, spec["transformer_depth"])
            return
        heads = spec["attn_heads"]
        t.norm(f"{ours}/norm/GroupNorm_0", f"{src}.norm")
        w, b = t.take(f"{src}.qkv.weight"), t.take(f"{src}.qkv.bias")
        if attention_order == "new":
            w, b = qkv_new_to_legacy(w, heads), qkv_new_to_legacy(b, heads)
        t.put(f"{ours}/qkv/kernel", _dense(w))
        t.put(f"{ours}/qkv/bias", b)
        t.dense(f"{ours}/proj_out", f"{src}.proj_out")

    t.dense("time_embed_0", "time_embed.0")
    t.dense("time_embed_1", "time_embed.2")
    t.conv("conv_in", "input_blocks.0.0")
    ins, outs = _level_blocks(model_cfg)
    for idx, _, _, spec in ins:
        if spec["resample"] == "down":  # its own TimestepEmbedSequential: a ResBlock(down=True) or Downsample
            if spec["updown"]:
                res(f"input_blocks_{idx}/down", f"input_blocks.{idx}.0")
            else:
                t.conv(f"input_blocks_{idx}/down/conv", f"input_blocks.{idx}.0.op")
            continue
        res(f"input_blocks_{idx}/res", f"input_blocks.{idx}.0")
        if spec["attn_heads"]:
            attn(f"input_blocks_{idx}/attn", f"input_blocks.{idx}.1", spec)
    _, middle, _ = block_specs(model_cfg)
    res("middle_block/res_0", "middle_block.0")
    attn("middle_block/attn", "middle_block.1", middle)
    res("middle_block/res_1", "middle_block.2")
    for k, _, _, spec in outs:
        res(f"output_blocks_{k}/res", f"output_blocks.{k}.0")
        sub = 1
        if spec["attn_heads"]:
            attn(f"output_blocks_{k}/attn", f"output_blocks.{k}.1", spec)
            sub = 2
        if spec["resample"] == "up":  # the last layer of the output block: ResBlock(up=True) or Upsample
            if spec["updown"]:
                res(f"output_blocks_{k}/up", f"output_blocks.{k}.{sub}")
            else:
                t.conv(f"output_blocks_{k}/up/conv", f"output_blocks.{k}.{sub}.conv")
    t.norm("out_norm/GroupNorm_0", "out.0")
    t.conv("conv_out", "out.2")
    if model_cfg.get("cond_stage", "none") == "class":
        _class_embedder(t)
    elif model_cfg.num_classes:
        t.put("label_emb/embedding", t.take("label_emb.weight"))
    return t.finish(abstract_unet_params(model_cfg))


# ----------------------------------------------------------------------------------- autoencoder
def abstract_autoencoder_params(ae_cfg: Any, image_channels: int) -> Any:
    ae = Autoencoder.from_config(ae_cfg, image_channels)
    s = 2 * ae.factor
    return jax.eval_shape(ae.init, jax.random.key(0), jnp.zeros((1, s, s, image_channels)))["params"]


def autoencoder_from_diffusers(sd: StateDict, ae_cfg: Any, image_channels: int) -> dict:
    """diffusers `VQModel` / `AutoencoderKL` state dict -> params of `Autoencoder.from_config(ae_cfg, ...)`."""
    t = _Table(rename_deprecated_attention(sd), f"diffusers {'VQModel' if ae_cfg.kind == 'vq' else 'AutoencoderKL'}")
    levels, nrb = len(ae_cfg.ch_mult), ae_cfg.num_res_blocks

    def res(ours: str, src: str) -> None:
        t.norm(f"{ours}/norm1", f"{src}.norm1")
        t.conv(f"{ours}/conv1", f"{src}.conv1")
        t.norm(f"{ours}/norm2", f"{src}.norm2")
        t.conv(f"{ours}/conv2", f"{src}.conv2")
        if t.has(f"{src}.conv_shortcut.weight"):
            t.conv(f"{ours}/nin_shortcut", f"{src}.conv_shortcut")

    def mid(ours: str, src: str) -> None:
        res(f"{ours}/mid_block_1", f"{src}.mid_block.resnets.0")
        a = f"{src}.mid_block.attentions.0"
        t.norm(f"{ours}/mid_attn_1/norm", f"{a}.group_norm")
        for n in "qkv":
            t.dense(f"{ours}/mid_attn_1/{n}", f"{a}.to_{n}")
        t.dense(f"{ours}/mid_attn_1/proj_out", f"{a}.to_out.0")
        res(f"{ours}/mid_block_2", f"{src}.mid_block.resnets.1")

    t.conv("encoder/conv_in", "encoder.conv_in")
    for i in range(levels):
        for j in range(nrb):
            res(f"encoder/down_{i}_block_{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i != levels - 1:
            t.conv(f"encoder/down_{i}_downsample/conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    mid("encoder", "encoder")
    t.norm("encoder/norm_out", "encoder.conv_norm_out")
    t.conv("encoder/conv_out", "encoder.conv_out")
    t.conv("quant_conv", "quant_conv")
    if ae_cfg.kind == "vq":
        t.put("quantize/embedding", t.take("quantize.embedding.weight"))
    t.conv("post_quant_conv", "post_quant_conv")
    t.conv("decoder/conv_in", "decoder.conv_in")
    mid("decoder", "decoder")
    for u in range(levels):  # diffusers' up_blocks[0] is the lowest resolution, CompVis' up[levels - 1]
        i = levels - 1 - u
        for j in range(nrb + 1):
            res(f"decoder/up_{i}_block_{j}", f"decoder.up_blocks.{u}.resnets.{j}")
        if i != 0:
            t.conv(f"decoder/up_{i}_upsample/conv", f"decoder.up_blocks.{u}.upsamplers.0.conv")
    t.norm("decoder/norm_out", "decoder.conv_norm_out")
    t.conv("decoder/conv_out", "decoder.conv_out")
    return t.finish(abstract_autoencoder_params(ae_cfg, image_channels))


def autoencoder_from_compvis(sd: StateDict, ae_cfg: Any, image_channels: int, prefix: str | None = None) -> dict:
    """CompVis first stage (`ldm.models.autoencoder.VQModel` / `AutoencoderKL`) -> Autoencoder params.

    `prefix`: None finds it (`first_stage_model.` of a full LDM checkpoint, or none for a first-stage
    checkpoint, whose `loss.*` tensors are ignored).
    """
    if prefix is None:
        prefix = COMPVIS_AE_PREFIX if any(k.startswith(COMPVIS_AE_PREFIX) for k in sd) else ""
    t = _Table(_sub(sd, prefix), f"CompVis first stage ({prefix or 'no prefix'})")
    if not t.sd:
        raise ConversionError(f"the checkpoint has no tensors under {prefix!r}: no first-stage autoencoder")
    levels_attn = sorted({k for k in t.sd if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k)})
    if levels_attn:
        raise ConversionError(
            f"the autoencoder has attention inside its levels ({levels_attn[0]}, attn_resolutions != []): "
            "not supported (VQ-f4 and KL-f8 have none)"
        )
    levels, nrb = len(ae_cfg.ch_mult), ae_cfg.num_res_blocks

    def res(ours: str, src: str) -> None:
        for n in ("norm1", "norm2"):
            t.norm(f"{ours}/{n}", f"{src}.{n}")
        for n in ("conv1", "conv2"):
            t.conv(f"{ours}/{n}", f"{src}.{n}")
        if t.has(f"{src}.nin_shortcut.weight"):
            t.conv(f"{ours}/nin_shortcut", f"{src}.nin_shortcut")

    def mid(part: str) -> None:
        res(f"{part}/mid_block_1", f"{part}.mid.block_1")
        t.norm(f"{part}/mid_attn_1/norm", f"{part}.mid.attn_1.norm")
        for n in ("q", "k", "v", "proj_out"):
            t.dense(f"{part}/mid_attn_1/{n}", f"{part}.mid.attn_1.{n}")
        res(f"{part}/mid_block_2", f"{part}.mid.block_2")

    t.conv("encoder/conv_in", "encoder.conv_in")
    for i in range(levels):
        for j in range(nrb):
            res(f"encoder/down_{i}_block_{j}", f"encoder.down.{i}.block.{j}")
        if i != levels - 1:
            t.conv(f"encoder/down_{i}_downsample/conv", f"encoder.down.{i}.downsample.conv")
    mid("encoder")
    t.norm("encoder/norm_out", "encoder.norm_out")
    t.conv("encoder/conv_out", "encoder.conv_out")
    t.conv("quant_conv", "quant_conv")
    if ae_cfg.kind == "vq":
        t.put("quantize/embedding", t.take("quantize.embedding.weight"))
    t.conv("post_quant_conv", "post_quant_conv")
    t.conv("decoder/conv_in", "decoder.conv_in")
    mid("decoder")
    for i in range(levels):
        for j in range(nrb + 1):
            res(f"decoder/up_{i}_block_{j}", f"decoder.up.{i}.block.{j}")
        if i != 0:
            t.conv(f"decoder/up_{i}_upsample/conv", f"decoder.up.{i}.upsample.conv")
    t.norm("decoder/norm_out", "decoder.norm_out")
    t.conv("decoder/conv_out", "decoder.conv_out")
    return t.finish(abstract_autoencoder_params(ae_cfg, image_channels), ignore=_AE_IGNORED)


# ------------------------------------------------------------------------ diffusers configs -> ours
# diffusers' constructor defaults, for config.json files written before a field existed.
_UNET_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True, layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None, mid_block_type="UNetMidBlock2D",
    block_out_channels=(224, 448, 672, 896),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
_AE_DEFAULTS = dict(
    in_channels=3, out_channels=3, layers_per_block=1, act_fn="silu", norm_num_groups=32, norm_type="group",
    mid_block_add_attention=True, use_quant_conv=True, use_post_quant_conv=True, vq_embed_dim=None,
    num_vq_embeddings=256, latent_channels=None, block_out_channels=(64,), down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
)


def _unsupported(what: str, field: str, value: Any, allowed: Any) -> None:
    if value != allowed:
        raise ConversionError(f"{what} config.json has {field}={value!r}; bdm_jax supports only {allowed!r}")


# UNet2DConditionModel's constructor defaults (the spatial-transformer UNet).
_COND_UNET_DEFAULTS = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280,
    transformer_layers_per_block=1, reverse_transformer_layers_per_block=None, encoder_hid_dim=None,
    attention_head_dim=8, num_attention_heads=None, dual_cross_attention=False, use_linear_projection=False,
    class_embed_type=None, addition_embed_type=None, num_class_embeds=None, resnet_time_scale_shift="default",
    resnet_skip_time_act=False, resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
    attention_type="default", mid_block_only_cross_attention=None, cross_attention_norm=None,
)
# Block type -> (has attention, how it resamples: "conv", "resnet", or None = the model's *sample_type field).
_DOWN_KINDS = {
    "UNet2DModel": {"DownBlock2D": (False, "conv"), "AttnDownBlock2D": (True, None),
                    "ResnetDownsampleBlock2D": (False, "resnet")},
    "UNet2DConditionModel": {"DownBlock2D": (False, "conv"), "CrossAttnDownBlock2D": (True, "conv"),
                             "ResnetDownsampleBlock2D": (False, "resnet")},
}
_UP_KINDS = {
    "UNet2DModel": {"UpBlock2D": (False, "conv"), "AttnUpBlock2D": (True, None),
                    "ResnetUpsampleBlock2D": (False, "resnet")},
    "UNet2DConditionModel": {"UpBlock2D": (False, "conv"), "CrossAttnUpBlock2D": (True, "conv"),
                             "ResnetUpsampleBlock2D": (False, "resnet")},
}


def _unet_levels(what: str, d: Mapping[str, Any]) -> tuple[list[int], bool]:
    """(levels with attention, resblock_updown) from the block types; ConversionError for what openaimodel lacks."""
    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    dk, uk = _DOWN_KINDS[what], _UP_KINDS[what]
    attn_levels, resampling = [], set()
    for i, kind in enumerate(down):
        up_kind = up[len(up) - 1 - i]
        if kind not in dk:
            raise ConversionError(f"{what} down block type {kind!r} is not supported ({', '.join(dk)})")
        if up_kind not in uk:
            raise ConversionError(f"{what} up block type {up_kind!r} is not supported ({', '.join(uk)})")
        if dk[kind][0] != uk[up_kind][0]:
            raise ConversionError(f"{what} has {kind} at level {i} but {up_kind} on the way up: not supported")
        if dk[kind][0]:
            attn_levels.append(i)
        if i != len(down) - 1:  # the lowest level has no down- and no upsampler
            resampling.add(("down_block_types / downsample_type", dk[kind][1] or d.get("downsample_type", "conv")))
            resampling.add(("up_block_types / upsample_type", uk[up_kind][1] or d.get("upsample_type", "conv")))
    for field, how in resampling:
        if how not in ("conv", "resnet"):
            raise ConversionError(f"{what} {field}={how!r}: only conv or resnet resampling is supported")
    if len({how for _, how in resampling}) > 1:
        raise ConversionError(
            f"{what} mixes conv and resnet resampling (down_block_types, up_block_types, downsample_type, "
            "upsample_type): openaimodel resamples all levels one way (model.resblock_updown)"
        )
    return attn_levels, ("resnet" in {how for _, how in resampling})


def _cond_heads(d: Mapping[str, Any], boc: list[int], levels: list[int]) -> tuple[int, int]:
    """UNet2DConditionModel heads (num_attention_heads, or its legacy name attention_head_dim: a count per
    level) -> (num_heads, num_head_channels) of ours: one count everywhere, or one width per head."""
    heads = d["num_attention_heads"] or d["attention_head_dim"]
    if isinstance(heads, int):
        return heads, -1
    used = sorted(set(levels) | {len(boc) - 1})  # the mid block uses the last level's count
    counts = {heads[i] for i in used}
    if len(counts) == 1:
        return counts.pop(), -1
    widths = {boc[i] // heads[i] for i in used}
    if len(widths) == 1 and all(boc[i] % heads[i] == 0 for i in used):
        return 1, widths.pop()
    raise ConversionError(
        f"UNet2DConditionModel attention_head_dim / num_attention_heads={list(heads)}: neither one head count nor "
        "one head width at every level (model.num_heads / model.num_head_channels cannot express it)"
    )


def diffusers_unet_config(dcfg: Mapping[str, Any]) -> dict:
    """diffusers `UNet2DModel` / `UNet2DConditionModel` config.json -> the bdm `model.*` fields it implies.

    `_class_name` picks the class (UNet2DModel when absent). Heads come back as num_heads/num_head_channels.
    """
    what = dcfg.get("_class_name", "UNet2DModel")
    if what not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ConversionError(f"config.json _class_name={what!r}: expected UNet2DModel or UNet2DConditionModel")
    cond = what == "UNet2DConditionModel"
    d = {**(_COND_UNET_DEFAULTS if cond else _UNET_DEFAULTS), **dcfg}
    checks = [("center_input_sample", False), ("time_embedding_type", "positional"), ("mid_block_scale_factor", 1),
              ("act_fn", "silu"), ("class_embed_type", None)]
    if cond:
        checks += [("mid_block_type", "UNetMidBlock2DCrossAttn"), ("only_cross_attention", False),
                   ("dual_cross_attention", False), ("use_linear_projection", False), ("addition_embed_type", None),
                   ("num_class_embeds", None), ("encoder_hid_dim", None), ("resnet_skip_time_act", False),
                   ("resnet_out_scale_factor", 1.0), ("time_embedding_act_fn", None), ("timestep_post_act", None),
                   ("time_cond_proj_dim", None), ("conv_in_kernel", 3), ("conv_out_kernel", 3),
                   ("attention_type", "default"), ("cross_attention_norm", None),
                   ("reverse_transformer_layers_per_block", None)]
        if d["mid_block_only_cross_attention"] not in (None, False):
            _unsupported(what, "mid_block_only_cross_attention", d["mid_block_only_cross_attention"], None)
        for field in ("transformer_layers_per_block", "cross_attention_dim", "layers_per_block"):
            if not isinstance(d[field], int):
                _unsupported(what, field, d[field], "one int for every level")
    else:
        checks += [("add_attention", True), ("mid_block_type", "UNetMidBlock2D")]
    for field, allowed in checks:
        _unsupported(what, field, d[field], allowed)
    if d["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        raise ConversionError(f"{what} config.json has resnet_time_scale_shift={d['resnet_time_scale_shift']!r}; "
                              "bdm_jax supports only 'default' and 'scale_shift'")
    if not cond:
        attn_groups = d["attn_norm_num_groups"]
        if d["resnet_time_scale_shift"] == "scale_shift" and attn_groups is None:
            # diffusers then builds the mid-block attention without GroupNorm; openaimodel always has one.
            raise ConversionError(
                f"{what} config.json has resnet_time_scale_shift='scale_shift' with attn_norm_num_groups=None (a "
                f"mid-block attention without GroupNorm): bdm_jax supports it only with attn_norm_num_groups="
                f"{d['norm_num_groups']} (= norm_num_groups)"
            )
        if attn_groups not in (None, d["norm_num_groups"]):
            _unsupported(what, "attn_norm_num_groups", attn_groups, None)
    boc = list(d["block_out_channels"])
    mc = boc[0]
    if any(c % mc for c in boc):
        raise ConversionError(f"{what} block_out_channels={boc} are not multiples of the first")
    if d["time_embedding_dim"] not in (None, 4 * mc):
        _unsupported(what, "time_embedding_dim", d["time_embedding_dim"], None)
    if d["downsample_padding"] not in (0, 1):
        _unsupported(what, "downsample_padding", d["downsample_padding"], 1)
    attn_levels, updown = _unet_levels(what, d)
    if cond and updown and attn_levels:
        raise ConversionError(f"{what} with resnet resampling and cross-attention blocks: no openaimodel equivalent")
    size = d["sample_size"]
    if not isinstance(size, int):
        raise ConversionError(f"{what} sample_size={size!r}: a square int size is needed")
    out = dict(
        in_channels=d["in_channels"], out_channels=d["out_channels"], image_size=size, model_channels=mc,
        channel_mult=[c // mc for c in boc], num_res_blocks=d["layers_per_block"],
        attention_resolutions=[size // 2**i for i in attn_levels],
        norm_groups=d["norm_num_groups"], flip_sin_to_cos=bool(d["flip_sin_to_cos"]), freq_shift=d["freq_shift"],
        norm_eps=float(d["norm_eps"]), downsample_padding=d["downsample_padding"],
        use_scale_shift_norm=d["resnet_time_scale_shift"] == "scale_shift", resblock_updown=updown,
        use_spatial_transformer=cond,
    )
    if cond:
        # The context comes from outside diffusers' model (ours: the ClassEmbedder), so no num_classes here.
        heads, head_channels = _cond_heads(d, boc, attn_levels)
        out.update(transformer_depth=d["transformer_layers_per_block"], context_dim=d["cross_attention_dim"],
                   num_heads=heads, num_head_channels=head_channels)
    else:
        head_dim = d["attention_head_dim"]
        # diffusers: heads = channels // attention_head_dim, one head when it is null.
        out.update(num_classes=d["num_class_embeds"] or 0, num_heads=1,
                   num_head_channels=-1 if head_dim is None else head_dim)
    return out


def check_unet_config(model_cfg: Any, implied: Mapping[str, Any]) -> None:
    """One-line ConversionError naming the first model.* field that differs from what the checkpoint needs."""
    for key, value in implied.items():
        if key in ("num_heads", "num_head_channels"):
            continue
        have = model_cfg.get(key, ADDED_MODEL_FIELDS.get(key))
        have = list(have) if isinstance(have, (list, tuple)) else have
        same = abs(have - value) <= 1e-12 * abs(value) if isinstance(value, float) else have == value
        if not same:
            raise ConversionError(
                f"the checkpoint needs model.{key}={value!r} but the config has {have!r}; "
                f"pass --config.model.{key}={value!r} (or use the matching config)"
            )
    widths = {model_cfg.model_channels * m for m in model_cfg.channel_mult}
    for w in sorted(widths):
        ours = _heads(w, model_cfg.num_heads, model_cfg.num_head_channels)
        theirs = _heads(w, implied["num_heads"], implied["num_head_channels"])
        if ours != theirs:
            nhc = implied["num_head_channels"]
            hint = (f"--config.model.num_head_channels={nhc}" if nhc > 0
                    else f"--config.model.num_heads={implied['num_heads']} --config.model.num_head_channels=-1")
            raise ConversionError(
                f"the checkpoint has {theirs} attention heads at {w} channels but the config gives {ours}; pass {hint}"
            )


def diffusers_autoencoder_config(dcfg: Mapping[str, Any]) -> dict:
    """diffusers `VQModel` / `AutoencoderKL` config.json -> bdm `autoencoder.*` fields (+ image_channels)."""
    cls = dcfg.get("_class_name", "")
    if cls not in ("VQModel", "AutoencoderKL"):
        raise ConversionError(f"config.json _class_name={cls!r}: expected VQModel or AutoencoderKL")
    d = {**_AE_DEFAULTS, **dcfg}
    for field, allowed in (("act_fn", "silu"), ("norm_type", "group"), ("mid_block_add_attention", True),
                           ("use_quant_conv", True), ("use_post_quant_conv", True)):
        _unsupported(cls, field, d[field], allowed)
    if d["in_channels"] != d["out_channels"]:
        raise ConversionError(
            f"{cls} in_channels={d['in_channels']} != out_channels={d['out_channels']}: not supported"
        )
    for f, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(k != kind for k in d[f]):
            raise ConversionError(f"{cls} {f}={list(d[f])}: only {kind} is supported")
    boc = list(d["block_out_channels"])
    ch = boc[0]
    z = d["latent_channels"] if d["latent_channels"] is not None else (3 if cls == "VQModel" else 4)
    out = dict(kind="vq" if cls == "VQModel" else "kl", ch=ch, ch_mult=[c // ch for c in boc],
               num_res_blocks=d["layers_per_block"], z_channels=z, norm_groups=d["norm_num_groups"],
               image_channels=d["in_channels"])
    if cls == "VQModel":
        out.update(embed_dim=d["vq_embed_dim"] or z, n_embed=d["num_vq_embeddings"])
    else:
        out.update(embed_dim=z)
    return out


def check_autoencoder_config(cfg: Any, implied: Mapping[str, Any]) -> None:
    for key, value in implied.items():
        field = "data.channels" if key == "image_channels" else f"autoencoder.{key}"
        have = cfg.data.channels if key == "image_channels" else cfg.autoencoder[key]
        have = list(have) if isinstance(have, (list, tuple)) else have
        if have != value:
            raise ConversionError(
                f"the checkpoint needs {field}={value!r} but the config has {have!r}; pass --config.{field}={value!r}"
            )


def check_schedule(sd: StateDict, cfg: Any) -> None:
    """A full LDM checkpoint stores its betas (and maybe scale_factor): they must match the config."""
    from bdm_jax.diffusion import get_beta_schedule

    if "betas" in sd:
        d = cfg.diffusion
        ours = get_beta_schedule(d.beta_schedule, d.timesteps, d.beta_start, d.beta_end)
        theirs = np.asarray(sd["betas"], np.float64)
        if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-4, atol=1e-8):
            raise ConversionError(
                f"the checkpoint's betas ({theirs.shape[0]} steps, {theirs[0]:.6g} .. {theirs[-1]:.6g}) differ from "
                f"config.diffusion ({d.beta_schedule}, {d.timesteps} steps, {ours[0]:.6g} .. {ours[-1]:.6g})"
            )
    if "scale_factor" in sd and cfg.autoencoder.kind != "none":
        s = float(np.asarray(sd["scale_factor"]))
        if abs(s - cfg.autoencoder.scale_factor) > 1e-6 * abs(s):
            raise ConversionError(
                f"the checkpoint has scale_factor={s!r} but the config has autoencoder.scale_factor="
                f"{cfg.autoencoder.scale_factor!r}; pass --config.autoencoder.scale_factor={s!r}"
            )


# -------------------------------------------------------------------------------------- writing
def write_teacher(workdir: str, cfg: ml_collections.ConfigDict, params: Any, info: dict | None = None) -> str:
    """A workdir whose newest checkpoint (step 0) holds `params` as params and EMA params of an FP run.

    `bdm_jax.checkpoint.load_params(workdir, cfg)` reads it as a teacher, sample.py samples it, and
    train.py with `--config.method=fp` resumes (fine-tunes) it.
    """
    from bdm_jax import checkpoint as ckpt_lib
    from bdm_jax.config import validate
    from bdm_jax.train_state import TrainState, make_optimizer

    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.method = "fp"  # the converted model is full precision
    cfg = validate(cfg)
    workdir = os.path.abspath(workdir)
    mngr = ckpt_lib.manager(workdir, keep=cfg.train.keep_checkpoints)
    if mngr.latest_step() is not None:
        raise ConversionError(f"--out={workdir} already has checkpoints; choose a new directory")
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    tx = make_optimizer(cfg.train)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(cfg.seed)))
    ckpt_lib.save(mngr, 0, state, cfg)
    mngr.wait_until_finished()
    ckpt_lib.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
    if info:
        ckpt_lib.write_json(os.path.join(workdir, "converted_from.json"), info)
    return workdir


def count_params(params: Any) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------------------------- CLI
def _diffusers_files(path: str) -> tuple[str, dict]:
    """(weights file, config.json dict) of a diffusers model directory or of a weights file beside its config."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    weights = path
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                 if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise ConversionError(f"--input={path} has no diffusion_pytorch_model.safetensors or .bin")
        weights = found[0]
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"no config.json next to {weights}: a diffusers model directory is expected")
    with open(cfg_path) as f:
        return weights, json.load(f)


def convert_main(cfg: ml_collections.ConfigDict, kind: str, fmt: str, src: str, out: str, ema: str = "auto",
                 attention_order: str = "legacy", unsafe_pickle: bool = False,
                 log: Callable[[str], None] = print) -> dict:
    """What the CLI does; returns {"unet": workdir, "autoencoder": dir} of what it wrote."""
    from bdm_jax import autoencoder as ae_lib
    from bdm_jax.config import validate

    if kind not in ("unet", "autoencoder", "ldm"):
        raise ConversionError(f"--kind={kind!r} is not allowed: unet, autoencoder or ldm")
    if fmt not in ("diffusers", "compvis"):
        raise ConversionError(f"--format={fmt!r} is not allowed: diffusers or compvis")
    if kind == "ldm" and fmt != "compvis":
        raise ConversionError("--kind=ldm reads a CompVis LDM model.ckpt: use --format=compvis")
    if ema not in ("auto", "ema", "raw"):
        raise ConversionError(f"--ema={ema!r} is not allowed: auto, ema or raw")
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    out = os.path.abspath(out)
    if kind != "autoencoder" and os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(
            os.path.join(out, "checkpoints")):
        raise ConversionError(f"--out={out} already has checkpoints; choose a new directory")
    if fmt == "diffusers":
        weights, dcfg = _diffusers_files(src)
        sd = load_state_dict(weights, unsafe_pickle)
    else:
        weights, dcfg = src, None
        sd = load_state_dict(src, unsafe_pickle)
    info = {"source": os.path.abspath(weights), "format": fmt}

    # Convert everything first, write after: a mismatch leaves nothing half-written.
    ae_params = params = None
    ae_dir = out if kind == "autoencoder" else os.path.join(out, "autoencoder")
    if kind in ("autoencoder", "ldm"):
        if cfg.autoencoder.kind == "none":
            raise ConversionError("config.autoencoder.kind='none': use a latent-diffusion config or set it to vq or kl")
        if dcfg is not None:
            check_autoencoder_config(cfg, diffusers_autoencoder_config(dcfg))
            ae_params = autoencoder_from_diffusers(sd, cfg.autoencoder, cfg.data.channels)
            if "scaling_factor" in dcfg and dcfg["scaling_factor"] != cfg.autoencoder.scale_factor:
                # diffusers writes a scaling_factor into every VAE config, meaningful or not: only a note.
                log(f"note: config.json has scaling_factor={dcfg['scaling_factor']} but the config "
                    f"autoencoder.scale_factor={cfg.autoencoder.scale_factor}; the config's value is used")
        else:
            ae_params = autoencoder_from_compvis(sd, cfg.autoencoder, cfg.data.channels)
        with cfg.unlocked():
            cfg.autoencoder.path = ae_dir
    if kind in ("unet", "ldm"):
        validate(cfg)
        if dcfg is not None:
            check_unet_config(cfg.model, diffusers_unet_config(dcfg))
            params = unet_from_diffusers(sd, cfg.model)
        else:
            check_schedule(sd, cfg)
            use_ema = False
            if ema != "raw":
                sd_ema, use_ema = compvis_ema(sd)
                if ema == "ema" and not use_ema:
                    raise ConversionError(f"--ema=ema but {src} has no model_ema.* tensors")
                sd = sd_ema
            info["ema"] = use_ema
            log(f"UNet weights: {'EMA (model_ema.*)' if use_ema else 'model.diffusion_model.* (no EMA copy used)'}")
            params = unet_from_compvis(sd, cfg.model, attention_order=attention_order)
        if kind == "unet" and cfg.autoencoder.kind != "none" and not cfg.autoencoder.path:
            log("note: config.autoencoder.path is empty, so this teacher's samples decode with a random "
                "autoencoder; convert the first stage too (--kind=autoencoder or --kind=ldm) and pass its path")

    written: dict[str, str] = {}
    if ae_params is not None:
        ae_lib.save_params(ae_dir, cfg.autoencoder, cfg.data.channels, ae_params, info)
        written["autoencoder"] = ae_dir
        log(f"autoencoder ({cfg.autoencoder.kind}, {count_params(ae_params):,} params) -> {ae_dir}")
    if params is not None:
        write_teacher(out, cfg, params, info)
        written["unet"] = out
        log(f"UNet ({count_params(params):,} params) -> teacher workdir {out}")
    return written


def _cli() -> None:
    import sys

    from absl import app, flags
    from ml_collections import config_flags

    from bdm_jax.cli import run_main

    config = config_flags.DEFINE_config_file("config", None, "The bdm config the weights are for (configs/*.py).",
                                             lock_config=True)
    kind = flags.DEFINE_enum("kind", "unet", ["unet", "autoencoder", "ldm"],
                             "unet: a teacher workdir; autoencoder: a first-stage dir; ldm: both from one model.ckpt.")
    fmt = flags.DEFINE_enum("format", "compvis", ["diffusers", "compvis"], "Source layout.")
    src = flags.DEFINE_string("input", None, "diffusers model dir (config.json + weights) or checkpoint file.")
    out = flags.DEFINE_string("out", None, "Output: teacher workdir (unet, ldm) or autoencoder dir.")
    ema = flags.DEFINE_enum("ema", "auto", ["auto", "ema", "raw"], "CompVis UNet: EMA weights if present / "
                            "required / never.")
    order = flags.DEFINE_enum("attention_order", "legacy", ["legacy", "new"],
                              "CompVis UNet qkv layout (use_new_attention_order=True: new).")
    unsafe = flags.DEFINE_bool("unsafe_pickle", False, "torch.load with weights_only=False (trusted files only).")
    flags.mark_flags_as_required(["config", "input", "out"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        written = convert_main(config.value, kind.value, fmt.value, src.value, out.value, ema.value, order.value,
                               unsafe.value)
        if "unet" in written:
            print(f"teacher: --config.teacher_workdir={written['unet']}")
        if "autoencoder" in written:
            print(f"autoencoder: --config.autoencoder.path={written['autoencoder']}")

    sys.exit(run_main(main))


if __name__ == "__main__":
    _cli()
