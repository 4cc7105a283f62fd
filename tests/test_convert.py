"""UNet converters (issue 7): diffusers UNet2DModel and CompVis openaimodel state dicts -> bdm_jax params,
checked against diffusers' PyTorch forward pass (random weights, explicit configs, no downloads).

Relative error = ||ours - torch|| / ||torch|| over the whole output, float32 on CPU; measured ~1e-6.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from flax import traverse_util

import torch_refs as refs
from bdm_jax import checkpoint as ckpt_lib
from bdm_jax import convert
from bdm_jax.unet import UNet
from configs import ddpm_cifar10, default, ldm4_bedrooms


def _model_cfg(dcfg: dict) -> ml_collections.ConfigDict:
    c = default.get_config().model
    for k, v in convert.diffusers_unet_config(dcfg).items():
        c[k] = v
    return c


def _torch_unet(dcfg: dict, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    m = UNet2DModel(**dcfg).eval()
    refs.perturb_vectors(m, seed)
    return m


def _forward_pair(m: UNet2DModel, model_cfg, params, tiny_second: bool = False) -> tuple[np.ndarray, np.ndarray]:
    s, c = model_cfg.image_size, model_cfg.in_channels
    x = np.random.default_rng(1).standard_normal((2, c, s, s)).astype(np.float32)
    if tiny_second:  # with conv_in's bias 0 the first GroupNorm of example 1 sees variance << eps
        x[1] *= 1e-4
    t = np.array([7, 913])
    with torch.no_grad():
        ref = m(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    ours = jax.jit(UNet.from_config(model_cfg).apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                                       jnp.asarray(t))
    return np.asarray(ours).transpose(0, 3, 1, 2), ref


@pytest.fixture(scope="module")
def ldm_small():
    m = _torch_unet(refs.LDM_SMALL, seed=1)
    return m, refs.numpy_state(m), _model_cfg(refs.LDM_SMALL)


def test_ddpm_unet_matches_diffusers():
    # DDPM conventions: [sin|cos] time embedding with freq shift 1, eps 1e-6, asymmetric downsample padding.
    # The second example is nearly zero, so the GroupNorm eps matters too.
    m = _torch_unet(refs.DDPM_SMALL)
    with torch.no_grad():
        m.conv_in.bias.zero_()
    cfg = _model_cfg(refs.DDPM_SMALL)
    params = convert.unet_from_diffusers(refs.numpy_state(m), cfg)
    ours, ref = _forward_pair(m, cfg, params, tiny_second=True)
    err = refs.rel_err(ours, ref)
    print(f"DDPM-layout UNet rel err {err:.2e}")
    assert err < 1e-4


def test_ldm_unet_with_head_channels_matches_diffusers(ldm_small):
    m, sd, cfg = ldm_small
    assert cfg.num_head_channels == 8 and list(cfg.attention_resolutions) == [8, 4, 2]
    params = convert.unet_from_diffusers(sd, cfg)
    ours, ref = _forward_pair(m, cfg, params)
    err = refs.rel_err(ours, ref)
    print(f"LDM-layout UNet rel err {err:.2e}")
    assert err < 1e-4


def test_compvis_unet_equals_diffusers_conversion(ldm_small):
    # The same weights in the LDM repo's layout, inside a full model.ckpt: EMA copies (LitEma names) hold the
    # real weights, model.diffusion_model.* is noise, plus first-stage and schedule tensors.
    _, sd, cfg = ldm_small
    compvis = refs.unet_to_compvis(sd, refs.LDM_SMALL)
    ckpt = {k: np.full_like(v, 0.5) for k, v in compvis.items()}
    ckpt.update({"model_ema." + k[len("model."):].replace(".", ""): v for k, v in compvis.items()})
    ckpt.update({"model_ema.num_updates": np.array(3), "betas": np.zeros(10, np.float32),
                 "first_stage_model.quant_conv.weight": np.zeros((3, 3, 1, 1), np.float32)})
    ema_sd, found = convert.compvis_ema(ckpt)
    assert found
    want = traverse_util.flatten_dict(convert.unet_from_diffusers(sd, cfg))
    got = traverse_util.flatten_dict(convert.unet_from_compvis(ema_sd, cfg))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))
    raw = traverse_util.flatten_dict(convert.unet_from_compvis(ckpt, cfg))
    assert float(raw[("conv_in", "bias")][0]) == 0.5  # without the EMA swap: the non-EMA tensors


def test_compvis_new_attention_order():
    q, k, v = (np.arange(12, dtype=np.float32).reshape(6, 2) + 100 * i for i in range(3))
    new = np.concatenate([q, k, v])  # QKVAttention: [q all heads | k | v]
    legacy = convert.qkv_new_to_legacy(new, heads=3)
    np.testing.assert_array_equal(legacy[:6], np.concatenate([q[:2], k[:2], v[:2]]))
    np.testing.assert_array_equal(legacy, refs._legacy_qkv(q, k, v, 3))


def test_deprecated_diffusers_attention_names(ldm_small):
    # Old Hub checkpoints (google/ddpm-cifar10-32) name the attention tensors query/key/value/proj_attn.
    _, sd, cfg = ldm_small
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in sd.items()}
    assert any(".proj_attn." in k for k in old)
    a = traverse_util.flatten_dict(convert.unet_from_diffusers(old, cfg))
    b = traverse_util.flatten_dict(convert.unet_from_diffusers(sd, cfg))
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_full_size_ddpm_cifar10_converts_into_its_config():
    # google/ddpm-cifar10-32's exact structure (shapes only: meta tensors, zero-stride arrays).
    with torch.device("meta"):
        m = UNet2DModel(**refs.DDPM_CIFAR10)
    cfg = ddpm_cifar10.get_config()
    convert.check_unet_config(cfg.model, convert.diffusers_unet_config(refs.DDPM_CIFAR10))
    params = convert.unet_from_diffusers(refs.shape_state(m), cfg.model)
    assert convert.count_params(params) == 35_746_307 == sum(p.numel() for p in m.parameters())


def test_full_size_ldm4_bedrooms_compvis_layout_converts():
    with torch.device("meta"):
        m = UNet2DModel(**refs.LDM4_BEDROOMS)
    compvis = refs.unet_to_compvis(refs.shape_state(m), refs.LDM4_BEDROOMS)
    assert "model.diffusion_model.input_blocks.4.1.qkv.weight" in compvis  # level 1 (32x32) attention
    assert compvis["model.diffusion_model.middle_block.1.qkv.weight"].shape == (3 * 896, 896, 1)
    params = convert.unet_from_compvis(compvis, ldm4_bedrooms.get_config().model)
    assert convert.count_params(params) == 274_056_163


def test_config_mismatch_is_one_line(ldm_small):
    _, sd, cfg = ldm_small
    wrong = ml_collections.ConfigDict(cfg.to_dict())
    wrong.num_res_blocks = 1
    with pytest.raises(convert.ConversionError, match="no place in the config's model|shape"):
        convert.unet_from_diffusers(sd, wrong)
    implied = convert.diffusers_unet_config(refs.DDPM_SMALL)
    with pytest.raises(convert.ConversionError, match=r"model\.flip_sin_to_cos=False"):
        convert.check_unet_config(default_with(implied, flip_sin_to_cos=True), implied)
    with pytest.raises(convert.ConversionError, match="attention heads"):
        convert.check_unet_config(default_with(implied, num_head_channels=16), implied)
    with pytest.raises(convert.ConversionError, match="resnet_time_scale_shift"):
        convert.diffusers_unet_config(dict(refs.LDM_SMALL, resnet_time_scale_shift="scale_shift"))
    extra = dict(sd, **{"down_blocks.9.resnets.0.conv1.weight": np.zeros((1,), np.float32)})
    with pytest.raises(convert.ConversionError, match=r"down_blocks\.9"):
        convert.unet_from_diffusers(extra, cfg)


def default_with(implied: dict, **changes) -> ml_collections.ConfigDict:
    c = default.get_config().model
    for k, v in {**implied, **changes}.items():
        c[k] = v
    return c


def test_cli_writes_a_teacher_workdir(tmp_path):
    # A diffusers model directory (config.json + safetensors) -> teacher workdir -> load_params.
    m = _torch_unet(refs.DDPM_SMALL, seed=2)
    m.save_pretrained(tmp_path / "ddpm")
    cfg = default.get_config()
    cfg.data.image_size, cfg.data.channels = 16, 3
    for k, v in convert.diffusers_unet_config(refs.DDPM_SMALL).items():
        if k not in ("image_size", "in_channels", "out_channels", "num_heads", "num_head_channels"):
            cfg.model[k] = v
    out = tmp_path / "teacher"
    written = convert.convert_main(cfg, "unet", "diffusers", str(tmp_path / "ddpm"), str(out), log=lambda s: None)
    assert written == {"unet": str(out)}
    params, step = ckpt_lib.load_params(str(out), cfg)
    assert step == 0
    want = traverse_util.flatten_dict(convert.unet_from_diffusers(refs.numpy_state(m), cfg.model))
    got = traverse_util.flatten_dict(params)
    assert all(np.allclose(got[k], want[k], rtol=0, atol=0) for k in want)
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == "fp" and saved["model"]["norm_eps"] == 1e-6
    with pytest.raises(convert.ConversionError, match="already has checkpoints"):
        convert.convert_main(cfg, "unet", "diffusers", str(tmp_path / "ddpm"), str(out), log=lambda s: None)
    cfg.model.norm_eps = 1e-5
    with pytest.raises(convert.ConversionError, match=r"model\.norm_eps=1e-06"):
        convert.convert_main(cfg, "unet", "diffusers", str(tmp_path / "ddpm"), str(tmp_path / "t2"), log=lambda s: None)
