"""UNet converters (issue 7): diffusers UNet2DModel and CompVis openaimodel state dicts -> bdm_jax params,
checked against diffusers' PyTorch forward pass (random weights, explicit configs, no downloads).

Relative error = ||ours - torch|| / ||torch|| over the whole output, float32 on CPU; measured ~1e-6
(scale-shift + ResBlock up/down 7.9e-7, SpatialTransformer with class context 8.0e-7).
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from flax import traverse_util

import torch_refs as refs
from bdm_jax import checkpoint as ckpt_lib
from bdm_jax import convert
from bdm_jax.unet import UNet
from configs import ddpm_cifar10, default, ldm4_bedrooms, ldm4_imagenet, ldm8_churches


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


# ------------------------------------------- LDM variants: scale-shift, ResBlock up/down, SpatialTransformer
# Measured (float32, CPU): scale-shift + resnet up/down UNet2DModel 7.9e-7, UNet2DConditionModel 8.0e-7.
def _cond_model_cfg(dcfg: dict, num_classes: int) -> ml_collections.ConfigDict:
    c = _model_cfg(dict(dcfg, _class_name="UNet2DConditionModel"))
    c.cond_stage, c.num_classes = "class", num_classes
    return c


@pytest.fixture(scope="module")
def churches_small():
    m = _torch_unet(refs.CHURCHES_SMALL, seed=3)
    return m, refs.numpy_state(m), _model_cfg(refs.CHURCHES_SMALL)


@pytest.fixture(scope="module")
def cin_small():
    torch.manual_seed(4)
    m = UNet2DConditionModel(**refs.CIN_SMALL).eval()
    refs.perturb_vectors(m, 4)
    table = np.random.default_rng(4).standard_normal((11, refs.CIN_SMALL["cross_attention_dim"])).astype(np.float32)
    sd = dict(refs.numpy_state(m), **{convert.COMPVIS_CLASS_EMBEDDER: table})
    return m, sd, _cond_model_cfg(refs.CIN_SMALL, 11)


def test_scale_shift_and_resblock_updown_match_diffusers(churches_small):
    m, sd, cfg = churches_small
    assert cfg.use_scale_shift_norm and cfg.resblock_updown and list(cfg.attention_resolutions) == [16, 4]
    params = convert.unet_from_diffusers(sd, cfg)
    assert params["input_blocks_3"]["down"]["emb_dense"]["kernel"].shape == (64, 2 * 16)  # scale and shift
    ours, ref = _forward_pair(m, cfg, params)
    err = refs.rel_err(ours, ref)
    print(f"scale-shift / resnet up-down UNet rel err {err:.2e}")
    assert err < 1e-4


def test_spatial_transformer_with_class_context_matches_diffusers(cin_small):
    # diffusers' UNet2DConditionModel takes the context; ours computes it from the labels with the ClassEmbedder.
    m, sd, cfg = cin_small
    assert cfg.num_head_channels == 8 and cfg.transformer_depth == 2 and cfg.context_dim == 16
    params = convert.unet_from_diffusers(sd, cfg)
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    t, y = np.array([7, 913]), np.array([3, 10])
    context = sd[convert.COMPVIS_CLASS_EMBEDDER][y][:, None, :]
    with torch.no_grad():
        ref = m(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context)).sample
    ref = ref.numpy()
    ours = jax.jit(UNet.from_config(cfg).apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                                 jnp.asarray(t), jnp.asarray(y))
    err = refs.rel_err(np.asarray(ours).transpose(0, 3, 1, 2), ref)
    print(f"SpatialTransformer UNet rel err {err:.2e}")
    assert err < 1e-4
    no_table = {k: v for k, v in sd.items() if k != convert.COMPVIS_CLASS_EMBEDDER}
    with pytest.raises(convert.ConversionError, match=r"cond_stage_model\.embedding\.weight"):
        convert.unet_from_diffusers(no_table, cfg)


@pytest.mark.parametrize("which", ["churches", "cin"])
def test_compvis_layout_of_the_variants_equals_diffusers_conversion(which, churches_small, cin_small):
    # Resampling ResBlocks at input_blocks.N.0 / output_blocks.N.{1,2}, SpatialTransformer keys, and the
    # ClassEmbedder beside the UNet (cond_stage_model.*) in a full model.ckpt with first-stage tensors.
    _, sd, cfg = churches_small if which == "churches" else cin_small
    dcfg = refs.CHURCHES_SMALL if which == "churches" else refs.CIN_SMALL
    table = sd.get(convert.COMPVIS_CLASS_EMBEDDER)
    compvis = refs.unet_to_compvis({k: v for k, v in sd.items() if k != convert.COMPVIS_CLASS_EMBEDDER}, dcfg)
    compvis["first_stage_model.quant_conv.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    if table is not None:
        compvis[convert.COMPVIS_CLASS_EMBEDDER] = table
        assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in compvis
    else:
        assert "model.diffusion_model.input_blocks.3.0.emb_layers.1.weight" in compvis  # ResBlock(down=True)
        assert "model.diffusion_model.output_blocks.2.1.in_layers.2.weight" in compvis  # ResBlock(up=True)
    compvis, _ = convert.compvis_ema(compvis)  # what convert_main does first; keeps cond_stage_model.*
    want = traverse_util.flatten_dict(convert.unet_from_diffusers(sd, cfg))
    got = traverse_util.flatten_dict(convert.unet_from_compvis(compvis, cfg))  # finish(): every key used
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))


def test_full_size_ldm8_churches_compvis_layout_converts():
    # Param count: diffusers' UNet2DModel of the same architecture (refs.LDM8_CHURCHES), 294,966,916
    # = 1125.2 MB in float32, the paper's FP size for LDM-8 Churches (SPEC §9).
    with torch.device("meta"):
        m = UNet2DModel(**refs.LDM8_CHURCHES)
    cfg = ldm8_churches.get_config()
    convert.check_unet_config(ml_collections.ConfigDict(dict(cfg.model.to_dict(), num_heads=1)),
                              convert.diffusers_unet_config(refs.LDM8_CHURCHES))
    compvis = refs.unet_to_compvis(refs.shape_state(m), refs.LDM8_CHURCHES)
    assert compvis["model.diffusion_model.input_blocks.3.0.emb_layers.1.weight"].shape == (2 * 192, 768)
    assert "model.diffusion_model.output_blocks.2.1.out_layers.3.weight" in compvis  # up ResBlock, 2x2 level
    assert "model.diffusion_model.output_blocks.5.2.out_layers.3.weight" in compvis  # after attn, 4x4 level
    params = convert.unet_from_compvis(compvis, cfg.model)
    assert convert.count_params(params) == 294_966_916 == sum(p.numel() for p in m.parameters())


def test_full_size_ldm4_imagenet_compvis_layout_converts():
    # Param count: diffusers' UNet2DConditionModel of cin256-v2's UNet (refs.LDM4_CIN) 400,920,579, plus the
    # ClassEmbedder's 1001 x 512 = 512,512: 401,433,091.
    with torch.device("meta"):
        m = UNet2DConditionModel(**refs.LDM4_CIN)
    cfg = ldm4_imagenet.get_config()
    implied = convert.diffusers_unet_config(dict(refs.LDM4_CIN, _class_name="UNet2DConditionModel"))
    convert.check_unet_config(cfg.model, implied)
    compvis = refs.unet_to_compvis(refs.shape_state(m), refs.LDM4_CIN)
    compvis[convert.COMPVIS_CLASS_EMBEDDER] = np.broadcast_to(np.float32(0), (1001, 512))
    params = convert.unet_from_compvis(compvis, cfg.model)
    assert sum(p.numel() for p in m.parameters()) == 400_920_579
    assert convert.count_params(params) == 400_920_579 + 1001 * 512 == 401_433_091


@pytest.mark.parametrize("change, match", [
    (dict(attn_norm_num_groups=None), "attn_norm_num_groups=None"),
    (dict(down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D")), "mixes conv"),
    (dict(upsample_type="conv"), "mixes conv"),
    (dict(down_block_types=("AttnDownBlock2D", "SkipDownBlock2D", "AttnDownBlock2D", "DownBlock2D")), "SkipDown"),
])
def test_unmappable_scale_shift_layouts_are_refused(change, match):
    with pytest.raises(convert.ConversionError, match=match) as e:
        convert.diffusers_unet_config(dict(refs.CHURCHES_SMALL, **change))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, match", [
    (dict(use_linear_projection=True), "use_linear_projection"),
    (dict(attention_head_dim=(2, 3, 6, 9)), "attention_head_dim"),
    (dict(transformer_layers_per_block=(1, 1, 2, 2)), "transformer_layers_per_block"),
    (dict(down_block_types=("DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                            "CrossAttnDownBlock2D")), "SimpleCrossAttnDownBlock2D"),
])
def test_unmappable_cross_attention_layouts_are_refused(change, match):
    dcfg = dict(refs.CIN_SMALL, _class_name="UNet2DConditionModel", **change)
    with pytest.raises(convert.ConversionError, match=match) as e:
        convert.diffusers_unet_config(dcfg)
    assert "\n" not in str(e.value)
