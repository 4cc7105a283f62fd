"""Progressive binarization schedule (SPEC §6) and EBB masks (SPEC §2)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bdm_jax import progressive, rules
from bdm_jax.config import validate
from bdm_jax.unet import UNet
from configs import ldm4_bedrooms, tiny


def _template(cfg):
    plan = rules.build_plan(cfg.model, cfg.quant)
    net = UNet.from_config(cfg.model, plan)
    s = cfg.model.image_size
    v = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, s, s, cfg.model.in_channels)), jnp.zeros((1,), jnp.int32))
    return v["masks"]


def test_block_rings_go_outward_from_the_middle():
    cfg = ldm4_bedrooms.get_config()
    rings = progressive.block_rings(cfg.model, "block")
    assert rings["middle_block"] == 0
    assert rings["input_blocks_11"] == rings["output_blocks_0"] == 1
    assert rings["input_blocks_0"] == rings["output_blocks_11"] == 12
    levels = progressive.block_rings(cfg.model, "level")
    # middle -> 8x8 -> 16 -> 32 -> 64, the official code's 5 groups.
    assert levels["middle_block"] == 0
    assert levels["input_blocks_11"] == levels["output_blocks_0"] == 1
    assert levels["input_blocks_6"] == 2 and levels["output_blocks_5"] == 2
    assert levels["input_blocks_0"] == levels["output_blocks_11"] == 4
    assert sorted(set(levels.values())) == [0, 1, 2, 3, 4]


def test_schedule_order_and_interval():
    cfg = tiny.get_config()
    cfg.method = "binarydm"
    cfg = validate(cfg)
    template = _template(cfg)
    rings = progressive.mask_rings(template, cfg.model, "block")
    interval = 3

    def on(step):
        m = traverse_util.flatten_dict(progressive.progressive_masks(jnp.int32(step), template, rings, interval))
        return {"/".join(k[:-1]) for k, v in m.items() if k[-1] == "binarize" and float(v) == 1.0}

    assert on(0) and all(p.startswith("middle_block") for p in on(0))
    assert on(2) == on(0)
    step3 = on(3) - on(0)
    assert step3 and {p.split("/")[0] for p in step3} == {"input_blocks_3", "output_blocks_0"}
    order = progressive.schedule_order(rings)
    assert on(interval * (len(order) - 1)) == {p for group in order for p in group}
    # Monotone: once on, a layer stays on.
    for s in range(12):
        assert on(s) <= on(s + 1)


def test_mask_switch_never_recompiles():
    cfg = tiny.get_config()
    cfg.method = "binarydm"
    cfg = validate(cfg)
    template = _template(cfg)
    rings = progressive.mask_rings(template, cfg.model, "block")
    traces = []

    @jax.jit
    def masks_at(step):
        traces.append(1)
        return progressive.progressive_masks(step, template, rings, 1)

    totals = [sum(jax.tree.leaves(masks_at(jnp.int32(s)))) for s in range(8)]
    assert len(traces) == 1
    assert totals == sorted(totals) and totals[0] < totals[-1]


def test_progressive_off_and_ebb_transition():
    cfg = tiny.get_config()
    cfg.method = "binarydm"
    cfg = validate(cfg)
    template = _template(cfg)
    all_on = progressive.progressive_masks(jnp.int32(0), template, None, 1)
    flat = traverse_util.flatten_dict(all_on)
    assert all(float(v) == 1.0 for v in flat.values())
    assert any(k[-1] == "extra_bases" for k in flat)
    before = traverse_util.flatten_dict(progressive.progressive_masks(jnp.int32(9), template, None, 1, 10))
    after = traverse_util.flatten_dict(progressive.progressive_masks(jnp.int32(10), template, None, 1, 10))
    assert all(float(v) == 1.0 for v in before.values())
    assert all(float(v) == (0.0 if k[-1] == "extra_bases" else 1.0) for k, v in after.items())
    np.testing.assert_equal(len(before), len(after))


def test_rings_cover_the_layers_of_the_ldm_variants():
    # Up/down ResBlocks and SpatialTransformer layers get their block's ring; none falls outside the blocks.
    # The tiny UNet with every LDM variant switch on (the paper configs' structure, small).
    cfg = tiny.get_config()
    cfg.model.update(use_scale_shift_norm=True, resblock_updown=True, use_spatial_transformer=True,
                     cond_stage="class", context_dim=16)
    cfg.data.num_classes = 10
    cfg.method = "binarydm"
    cfg = validate(cfg)
    net = UNet.from_config(cfg.model, rules.build_plan(cfg.model, cfg.quant))
    one = jnp.zeros((1,), jnp.int32)
    template = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), one, one)["masks"]
    rings = progressive.mask_rings(template, cfg.model, "block")
    blocks = progressive.block_rings(cfg.model, "block")
    assert max(rings.values()) == max(blocks.values())  # nothing in the "outside blocks" ring
    for key, ring in rings.items():
        assert ring == blocks[key[0]], key
    assert rings[("input_blocks_2", "down", "in_conv", "binarize")] == 4 - 2  # 9 blocks, middle 4
    assert rings[("output_blocks_1", "up", "out_conv", "binarize")] == 2
    assert rings[("middle_block", "attn", "transformer_blocks_0", "attn2", "to_k", "binarize")] == 0
    assert ("input_blocks_3", "attn", "transformer_blocks_0", "ff_proj", "binarize") in rings
