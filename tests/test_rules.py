"""Layer rules → plan (SPEC §3): which layers are FP, multi-basis, single basis; activation bits."""

import functools

import pytest

from bdm_jax import rules
from bdm_jax.config import ConfigError, validate
from configs import ddpm_cifar10, ldm4_bedrooms, ldm4_imagenet, ldm8_churches


@functools.lru_cache(maxsize=None)
def _layers(name):
    cfg = {"cifar": ddpm_cifar10, "ldm4": ldm4_bedrooms}[name].get_config()
    return rules.enumerate_layers(cfg.model)


def _plan(name, **quant):
    cfg = {"cifar": ddpm_cifar10, "ldm4": ldm4_bedrooms}[name].get_config()
    cfg.method = quant.pop("method", "binarydm")
    for k, v in quant.items():
        cfg.quant[k] = v
    cfg = validate(cfg)
    return rules.build_plan(cfg.model, cfg.quant, _layers(name)), cfg


HEAD = {f"input_blocks_{i}" for i in range(6)} | {f"output_blocks_{i}" for i in range(6, 12)}
FP_LAYERS = {"time_embed_0", "time_embed_1", "conv_in", "conv_out"}


@pytest.mark.parametrize("name", ["cifar", "ldm4"])
def test_default_binarydm_plan_matches_spec_section_3(name):
    plan, _ = _plan(name)
    layers = [li for li in _layers(name) if li.kind != "act"]
    fp = {li.path for li in layers if plan.get(li.path).bases == 0}
    multi = {li.path for li in layers if plan.get(li.path).bases == 2}
    single = {li.path for li in layers if plan.get(li.path).bases == 1}
    assert fp == FP_LAYERS
    assert multi == {li.path for li in layers if li.block in HEAD and li.path != "conv_in"}
    assert single == {li.path for li in layers if li.block not in HEAD and li.path not in FP_LAYERS}
    # Every kind of layer the SPEC lists as single basis is present among the single-basis ones.
    for part in ("attn/qkv", "attn/proj_out", "res/emb_dense", "res/skip", "down/conv", "up/conv", "middle_block"):
        assert any(part in p for p in single), part
    assert all(plan.get(p).act_bits == 32 for p in multi | single)


def test_baseline_is_single_basis_everywhere_but_fp_layers():
    plan, _ = _plan("cifar", method="baseline")
    for li in _layers("cifar"):
        if li.kind == "act":
            assert plan.get(li.path).act_bits == 32
        else:
            assert plan.get(li.path).bases == (0 if li.path in FP_LAYERS else 1), li.path


def test_head_tail_blocks_ablation():
    plan, _ = _plan("ldm4", head_tail_blocks=3)
    multi_blocks = {li.block for li in _layers("ldm4") if li.kind != "act" and plan.get(li.path).bases == 2}
    assert multi_blocks == {"input_blocks_1", "input_blocks_2", "output_blocks_9", "output_blocks_10",
                            "output_blocks_11"}
    plan0, _ = _plan("ldm4", head_tail_blocks=0)
    assert not any(plan0.get(li.path).bases == 2 for li in _layers("ldm4"))


def test_activation_bits_and_attention_operands():
    plan, _ = _plan("cifar", act_bits=4)
    acts = [li for li in _layers("cifar") if li.kind == "act"]
    assert acts and all(plan.get(li.path).act_bits == 4 for li in acts)
    for li in _layers("cifar"):
        if li.kind != "act":
            assert plan.get(li.path).act_bits == (32 if li.path in FP_LAYERS else 4)
    plan_noattn, _ = _plan("cifar", act_bits=8, quantize_attention=False)
    assert all(plan_noattn.get(li.path).act_bits == 32 for li in acts)


def test_user_rules_override_and_must_match():
    plan, _ = _plan("cifar", rules=("^conv_out$=1", r"middle_block/attn/.*=fp"))
    assert plan.get("conv_out").bases == 1
    assert plan.get("middle_block/attn/qkv").bases == 0
    with pytest.raises(ValueError, match="matches no layer"):
        _plan("cifar", rules=("^no_such_layer$=2",))
    with pytest.raises(ValueError, match="treatment"):
        _plan("cifar", rules=("conv_out=three",))


def test_plan_table_lists_every_weight_layer():
    plan, _ = _plan("cifar")
    table = rules.plan_table(_layers("cifar"), plan)
    assert "conv_out" in table and "2 bases" in table and "1 basis" in table and "FP" in table
    n_weight_layers = sum(li.kind != "act" for li in _layers("cifar"))
    assert len([ln for ln in table.splitlines() if ln.split() and ln.split()[-1] == "32"]) == n_weight_layers


def test_bad_quant_values_are_rejected():
    cfg = ddpm_cifar10.get_config()
    cfg.method = "binarydm"
    cfg.quant.lrm_k = 1000
    with pytest.raises(ConfigError, match="quant.lrm_k"):
        validate(cfg)
    cfg = ddpm_cifar10.get_config()
    cfg.quant.act_bits = 6
    with pytest.raises(ConfigError, match="quant.act_bits=6"):
        validate(cfg)
    cfg = ddpm_cifar10.get_config()
    cfg.quant.lrm_precision = "bf16"
    with pytest.raises(ConfigError, match="quant.lrm_precision='bf16'.*features"):
        validate(cfg)


# ------------------------------------------------------------------- LDM variants (SPEC §3 on §11's models)
@functools.lru_cache(maxsize=None)
def _variant(name):
    cfg = {"churches": ldm8_churches, "imagenet": ldm4_imagenet}[name].get_config()
    cfg.method = "binarydm"
    cfg.quant.act_bits = 4
    cfg = validate(cfg)
    layers = rules.enumerate_layers(cfg.model)
    return cfg, layers, rules.build_plan(cfg.model, cfg.quant, layers)


@pytest.mark.parametrize("name", ["churches", "imagenet"])
def test_variant_plans_follow_spec_section_3(name):
    # FP: only the time MLP, conv_in, conv_out (the ClassEmbedder is a table, not a conv/dense: FP, no row);
    # multi-basis: every layer of the >= 1/2-resolution blocks, the first and last 6; all others one basis.
    cfg, layers, plan = _variant(name)
    weights = [li for li in layers if li.kind != "act"]
    n = len({li.block for li in weights if li.block})
    head = {f"input_blocks_{i}" for i in range(6)} | {f"output_blocks_{i}" for i in range(n // 2 - 6, n // 2)}
    assert {li.path for li in weights if plan.get(li.path).bases == 0} == FP_LAYERS
    assert {li.path for li in weights if plan.get(li.path).bases == 2} == {
        li.path for li in weights if li.block in head and li.path != "conv_in"}
    assert all(plan.get(li.path).act_bits == 4 for li in layers if li.path not in FP_LAYERS)
    new = ({"down/in_conv", "down/emb_dense", "down/out_conv", "up/in_conv", "up/out_conv"} if name == "churches"
           else {"attn/proj_in", "attn1/to_q", "attn2/to_k", "attn2/to_v", "attn2/to_out", "ff_proj", "ff_out",
                 "attn/proj_out", "attn1/q_quant", "attn2/k_quant", "attn2/attn_quant"})
    table = rules.plan_table(layers, plan)
    for part in new:
        hits = [li.path for li in layers if li.path.endswith(part) or f"/{part}/" in li.path + "/"]
        assert hits and all(p in table for p in hits), part
    assert "class_embedder" not in table and "label_emb" not in table
