"""UNet: parameter counts of the paper models, shapes, sown block features, the quantized path, and the LDM
variants (scale-shift norm, ResBlock up/down, SpatialTransformer with the class context; SPEC §11)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdm_jax import rules
from bdm_jax.config import validate
from bdm_jax.qat import block_features, student_from_teacher, zero_masks
from bdm_jax.unet import UNet, block_infos, block_specs
from configs import ddpm_cifar10, ldm4_bedrooms, ldm4_imagenet, ldm8_churches, tiny


def _count(cfg):
    net = UNet.from_config(cfg.model)
    s, c = cfg.model.image_size, cfg.model.in_channels
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, s, s, c)), jnp.zeros((1,), jnp.int32))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_ddpm_cifar10_param_count():
    # diffusers UNet2DModel for google/ddpm-cifar10-32 and the LDM openaimodel with that config (SPEC §11).
    assert _count(ddpm_cifar10.get_config()) == 35_746_307


def test_ldm4_bedrooms_param_count():
    assert _count(ldm4_bedrooms.get_config()) == 274_056_163


def test_block_layout_of_paper_models():
    for cfg in (ddpm_cifar10.get_config(), ldm4_bedrooms.get_config()):
        blocks = block_infos(cfg.model)
        assert len(blocks) == 25  # 12 input + middle + 12 output (SPEC §3)
        assert blocks[12].name == "middle_block"
        res = cfg.model.image_size
        head = [b.name for b in blocks if b.resolution >= res // 2]
        # SPEC §3: the first and last 6 blocks are the head/tail at >= 1/2 resolution.
        assert head == [f"input_blocks_{i}" for i in range(6)] + [f"output_blocks_{i}" for i in range(6, 12)]


@pytest.fixture(scope="module")
def tiny_setup():
    cfg = validate(tiny.get_config())
    net = UNet.from_config(cfg.model)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([3, 70], jnp.int32)
    params = net.init(jax.random.key(0), x, t)["params"]
    # Make the zero-initialised output convs non-zero so outputs depend on every layer.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    return cfg, net, params, x, t


def test_output_shape_dtype_and_features(tiny_setup):
    cfg, net, params, x, t = tiny_setup
    out, state = net.apply({"params": params}, x, t, mutable=["block_features"])
    chex.assert_shape(out, x.shape)
    assert out.dtype == jnp.float32
    feats = block_features(state)
    infos = block_infos(cfg.model)
    assert set(feats) == {b.name for b in infos}
    _, _, outputs = block_specs(cfg.model)
    upsampling = {f"output_blocks_{i}" for i, o in enumerate(outputs) if o["resample"] == "up"}
    assert upsampling
    for b in infos:
        h, w, c = feats[b.name].shape[1:]
        # Block resolution is the skip resolution; an upsampling output block emits twice that.
        assert (h, c) == (b.resolution * (2 if b.name in upsampling else 1), b.channels), b.name


def test_zero_init_output_conv():
    cfg = validate(tiny.get_config())
    net = UNet.from_config(cfg.model)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    params = net.init(jax.random.key(0), x, jnp.zeros((2,), jnp.int32))["params"]
    assert not np.any(np.asarray(params["conv_out"]["kernel"]))
    np.testing.assert_array_equal(net.apply({"params": params}, x, jnp.zeros((2,), jnp.int32)), 0.0)


def test_bfloat16_compute_keeps_float32_params(tiny_setup):
    _, _, params, x, t = tiny_setup
    cfg = tiny.get_config()
    cfg.model.dtype = "bfloat16"
    net = UNet.from_config(cfg.model)
    p16 = net.init(jax.random.key(0), x, t)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(p16))
    out32 = UNet.from_config(validate(tiny.get_config()).model).apply({"params": params}, x, t)
    out16 = net.apply({"params": params}, x, t)
    assert out16.dtype == jnp.float32
    np.testing.assert_allclose(out16, out32, atol=0.1 * float(jnp.abs(out32).max()))


def _student(cfg, params, x, t, act_bits=32):
    with cfg.unlocked():
        cfg.method = "binarydm"
        cfg.quant.act_bits = act_bits
        cfg.quant.quantize_attention = None
    cfg = validate(cfg)
    plan = rules.build_plan(cfg.model, cfg.quant)
    net = UNet.from_config(cfg.model, plan)
    variables = net.init(jax.random.key(0), x, t)
    sparams = student_from_teacher(variables["params"], params, plan)
    if act_bits < 32:  # any positive step: this test is about masks, not calibration
        sparams = jax.tree_util.tree_map_with_path(
            lambda k, v: jnp.full_like(v, 0.05) if k[-1].key == "act_step" else v, sparams)
    return net, sparams, variables["masks"]


@pytest.mark.parametrize("act_bits", [32, 4])
def test_masks_zero_is_exactly_fp(tiny_setup, act_bits):
    cfg, net, params, x, t = tiny_setup
    student, sparams, masks = _student(cfg.copy_and_resolve_references(), params, x, t, act_bits)
    fp_out = net.apply({"params": params}, x, t)
    off = student.apply({"params": sparams, "masks": zero_masks(masks)}, x, t)
    np.testing.assert_array_equal(off, fp_out)
    on = student.apply({"params": sparams, "masks": masks}, x, t)
    assert float(jnp.abs(on - fp_out).max()) > 1e-3


def test_class_conditional_needs_labels():
    cfg = tiny.get_config()
    cfg.model.num_classes = 10
    cfg = validate(cfg)
    net = UNet.from_config(cfg.model)
    x = jnp.zeros((2, 8, 8, 1))
    t = jnp.zeros((2,), jnp.int32)
    variables = net.init(jax.random.key(0), x, t, jnp.array([1, 2]))
    assert variables["params"]["label_emb"]["embedding"].shape == (10, 4 * cfg.model.model_channels)
    with pytest.raises(ValueError, match="num_classes"):
        net.apply(variables, x, t)


# ------------------------------------------------------------------- LDM variants (SPEC §11, issues 6/7)
def test_ldm8_churches_param_count():
    # = diffusers UNet2DModel of the same architecture (tests/test_convert.py, meta device), and
    # 294,966,916 x 4 bytes = 1125.2 MB, the paper's FP size of LDM-8 Churches (SPEC §9).
    assert _count(ldm8_churches.get_config()) == 294_966_916


def test_ldm4_imagenet_param_count():
    # diffusers UNet2DConditionModel of cin256-v2's UNet 400,920,579 (tests/test_convert.py) + the 1001 x 512
    # ClassEmbedder table the UNet holds.
    cfg = ldm4_imagenet.get_config()
    net = UNet.from_config(cfg.model)
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,), jnp.int32),
                            jnp.zeros((1,), jnp.int32))["params"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 401_433_091
    assert shapes["class_embedder"]["embedding"].shape == (1001, 512) and "label_emb" not in shapes


def test_block_layout_of_the_ldm_variants():
    churches = ldm8_churches.get_config().model
    blocks = block_infos(churches)
    assert len(blocks) == 31 and blocks[15].name == "middle_block"  # 5 levels: 15 + 1 + 15 (2n + 1)
    inputs, middle, outputs = block_specs(churches)
    downs = [i for i, s in enumerate(inputs) if s.get("resample") == "down"]
    assert downs == [3, 6, 9, 12] and all(inputs[i]["updown"] and not inputs[i]["out_channels"] for i in downs)
    assert [o["resample"] for o in outputs].count("up") == 4 and middle["transformer_depth"] == 0
    assert {s["attn_heads"] for s in inputs[1:] + outputs if s["attn_heads"]} == {8}
    imagenet = ldm4_imagenet.get_config().model
    inputs, middle, _ = block_specs(imagenet)
    assert len(block_infos(imagenet)) == 25 and middle["transformer_depth"] == 1 and middle["attn_heads"] == 1
    assert [s["resolution"] for s in inputs[1:] if s["attn_heads"]] == [32, 32, 16, 16, 8, 8]


def _variant_config(act_bits: int = 32):
    """tiny with every variant on: scale-shift, ResBlock up/down, SpatialTransformer, class context."""
    cfg = tiny.get_config()
    cfg.model.use_scale_shift_norm = True
    cfg.model.resblock_updown = True
    cfg.model.use_spatial_transformer = True
    cfg.model.cond_stage = "class"
    cfg.model.context_dim = 16
    cfg.model.num_head_channels = 16
    cfg.data.num_classes = 10  # linked: model.num_classes = 10 too
    cfg.method = "binarydm"
    cfg.quant.act_bits = act_bits
    return validate(cfg)


@pytest.fixture(scope="module")
def variant_setup():
    cfg = _variant_config()
    net = UNet.from_config(cfg.model)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t, y = jnp.array([3, 70], jnp.int32), jnp.array([2, 7], jnp.int32)
    # Random non-zero params drawn with numpy from the abstract tree: no eager init (slow on a CPU).
    shapes = jax.eval_shape(net.init, jax.random.key(0), x, t, y)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), jnp.float32), shapes)
    return cfg, net, params, x, t, y


def test_variant_student_with_masks_zero_is_exactly_fp(variant_setup, act_bits=4):
    # Every new conv/dense (up/down ResBlocks, proj_in/out, to_q/k/v/out, ff) and the quantizers of attn1
    # and attn2 go through the plan; mask 0 must bypass all of them. The labels reach the output.
    cfg, net, params, x, t, y = variant_setup
    with pytest.raises(ValueError, match="num_classes"):
        jax.eval_shape(net.apply, {"params": params}, x, t)
    cfg = _variant_config(act_bits)
    plan = rules.build_plan(cfg.model, cfg.quant)
    assert plan.get("input_blocks_2/down/in_conv").bases >= 1
    assert plan.get("middle_block/attn/transformer_blocks_0/attn2/to_k").bases == 2  # res 4 >= 8 / 2
    assert plan.get("middle_block/attn/transformer_blocks_0/attn2/k_quant").act_bits == 4
    assert plan.get("middle_block/attn/transformer_blocks_0/attn1/k_quant").act_bits == 4
    student = UNet.from_config(cfg.model, plan)
    variables = jax.eval_shape(student.init, jax.random.key(0), x, t, y)
    variables = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), dict(variables))  # masks 1: fully binarized
    # Jitted: eager flax applies of this UNet take seconds each on a CPU.
    sparams = jax.jit(student_from_teacher, static_argnums=2)(variables["params"], params, plan)
    sparams = jax.tree_util.tree_map_with_path(
        lambda k, v: jnp.full_like(v, 0.05) if k[-1].key == "act_step" else v, sparams)
    apply = jax.jit(student.apply)
    off = apply({"params": sparams, "masks": zero_masks(variables["masks"])}, x, t, y)
    np.testing.assert_array_equal(off, jax.jit(net.apply)({"params": params}, x, t, y))
    on = apply({"params": sparams, "masks": variables["masks"]}, x, t, y)
    assert float(jnp.abs(on - off).max()) > 1e-3
    other = apply({"params": sparams, "masks": variables["masks"]}, x, t, y[::-1])  # the class context matters
    assert float(jnp.abs(on - other).max()) > 1e-4
