"""Efficiency accounting (SPEC §9): paper numbers for LDM-4, hand-counted MACs/BOPs, and the real bytes of an
exported digits model. ~30 s on a free 2-core CPU (one CLI subprocess, one export)."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from bdm_jax import efficiency, export, rules
from bdm_jax.export import packed_plan
from bdm_jax.unet import UNet
from configs import ldm4_bedrooms, ldm8_churches
from export_fixtures import digits_config, random_student, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def by_name(report):
    return {s["name"]: s for s in report["settings"]}


@pytest.fixture(scope="module")
def ldm4():
    return by_name(efficiency.efficiency_report(ldm4_bedrooms.get_config()))


def test_ldm4_fp_matches_the_paper_exactly(ldm4):
    fp = ldm4["FP"]
    assert fp["params"] == 274_056_163  # SPEC §11
    assert round(fp["fp32_bytes"] / 2**20, 1) == 1045.4  # paper: 1045.4 MB
    assert round(fp["ops"] / 1e9, 1) == 96.0  # paper: 96.0 GOPs = conv + dense MACs


def test_ldm4_binarydm_rows_are_close_to_the_paper(ldm4):
    w11, w1 = ldm4["BinaryDM W1.1A4"], ldm4["BinaryDM W1A4"]
    assert abs(w11["packed_bytes"] / 2**20 - 42.1) < 0.5  # paper v1 W1.1A4: 42.1 MB (24.8x)
    assert abs(w1["ops"] / 1e9 - 6.3) < 0.3  # paper ICLR W1A4: 6.3 GOPs (see docs/EFFICIENCY.md)
    assert w1["packed_bytes"] == w1["ideal_bytes"]  # every LDM-4 fan-in is a multiple of 32: no padding
    fp_macs = ldm4["FP"]["flops"]
    assert w1["bops"] / 64 + w1["flops"] == w1["ops"] and w1["flops"] < 0.001 * fp_macs


def test_tiny_costs_by_hand():
    report = efficiency.efficiency_report(tiny_config())
    s = by_name(report)["BinaryDM W1.1A4"]
    rows = {r["path"]: r for r in s["layers"]}
    r = rows["middle_block/res_0/in_conv"]  # 4x4 output, fan-in 3*3*64, 64 out, 2 bases (res 4 >= 8/2), A4
    assert r["macs"] == 16 * 576 * 64 and r["w_bits"] == 2 and r["a_bits"] == 4
    assert r["bops"] == r["macs"] * 2 * 4 and r["flops"] == 0
    assert r["packed_bytes"] == 2 * 18 * 64 * 4 + 2 * 64 * 4 + 64 * 4 + 4  # words + scales + bias + act_step
    r = rows["conv_in"]  # FP: 8x8 output, fan-in 9, 32 out
    assert r["macs"] == r["flops"] == 64 * 9 * 32 and r["bops"] == 0 and r["packed_bytes"] == r["fp32_bytes"]
    r = rows["middle_block/attn"]  # 16 tokens, 64 channels: two 16x16x64 matmuls, not in OPs
    assert r["macs"] == 2 * 16 * 16 * 64 and r["flops"] == r["bops"] == 0
    assert s["ops"] == sum(x["bops"] for x in s["layers"]) / 64 + sum(x["flops"] for x in s["layers"])
    assert s["fp32_bytes"] == by_name(report)["FP"]["fp32_bytes"] == _param_bytes(tiny_config(), fp=True)


def _param_bytes(cfg, fp=False, packed=None):
    """Bytes of the params of the FP model, the student, or the packed model ("w11" / "w1") per eval_shape."""
    c = efficiency.method_config(cfg, cfg.quant.act_bits)
    plan = None if fp else rules.build_plan(c.model, c.quant)
    if packed:
        bases = {p: 1 if packed == "w1" else s.bases for p, s in plan.as_dict().items() if s.bases}
        plan = packed_plan(plan, bases, 32)
    model = UNet.from_config(c.model, plan)
    tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))["params"]
    return sum(math.prod(v.shape) * v.dtype.itemsize for v in jax.tree.leaves(tree))


@pytest.mark.parametrize("act_bits", [32, 4])
def test_accounted_bytes_equal_the_models_param_bytes(act_bits):
    cfg = tiny_config(act_bits=act_bits)
    s = by_name(efficiency.efficiency_report(cfg))
    assert s[f"BinaryDM W1.1A{act_bits}"]["fake_quant_bytes"] == _param_bytes(cfg)
    assert s[f"BinaryDM W1.1A{act_bits}"]["packed_bytes"] == _param_bytes(cfg, packed="w11")
    assert s[f"BinaryDM W1A{act_bits}"]["packed_bytes"] == _param_bytes(cfg, packed="w1")


def test_packed_digits_file_size_matches_the_accounting(tmp_path):
    cfg, _, state = random_student(digits_config())
    m = export.export_params(cfg, state["ema_params"], state["masks"], str(tmp_path / "packed"))
    report = by_name(efficiency.efficiency_report(cfg))
    accounted = report["BinaryDM W1.1A32"]["packed_bytes"]
    on_disk = os.path.getsize(tmp_path / "packed" / export.WEIGHTS_FILE)
    assert m["payload_bytes"] == accounted
    # The only overhead is the safetensors header (8-byte length + JSON): a fixed cost per tensor, 5.6% of
    # the 0.3 MB digits model (1.5% at 64 channels), negligible for the paper models.
    with open(tmp_path / "packed" / export.WEIGHTS_FILE, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    assert on_disk == header + accounted
    assert on_disk < 1.07 * accounted
    assert report["FP"]["fp32_bytes"] / on_disk > 7  # FP32 weights vs the packed file


def test_cli_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "eff.json"
    res = subprocess.run(
        [sys.executable, "-m", "bdm_jax.efficiency", "--config=configs/tiny.py", f"--out={out}",
         "--per_layer=BinaryDM W1A8"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "BinaryDM W1.1A4" in res.stdout and "middle_block/res_0/in_conv" in res.stdout
    report = json.loads(out.read_text())
    assert [s["name"] for s in report["settings"]] == ["FP"] + [
        f"BinaryDM {w}A{a}" for w in ("W1.1", "W1") for a in (32, 8, 4)]


def test_ldm8_churches_against_the_paper():
    # Paper v1 (SPEC §9), LDM-8 Churches: FP 1125.2 MB / 17.36 GFLOPs; W1A4 41.5 MB / 1.09 GFLOPs.
    # Measured here: FP 1125.2 MB exactly (294,966,916 params) but 18.64 G conv+dense MACs (+7.4%; the paper's
    # count for this UNet with ResBlock up/down is not reproduced, the cause is not established), W1A4 OPs
    # 1.18 G (15.8x vs the paper's 16.0x), W1A4 39.2 MB and W1.1A4 43.4 MB around the paper's 41.5 MB.
    s = by_name(efficiency.efficiency_report(ldm8_churches.get_config()))
    fp, w1, w11 = s["FP"], s["BinaryDM W1A4"], s["BinaryDM W1.1A4"]
    assert fp["params"] == 294_966_916 and round(fp["fp32_bytes"] / 2**20, 1) == 1125.2
    assert abs(fp["ops"] / 17.36e9 - 1) < 0.08 and abs(w1["ops"] / 1.09e9 - 1) < 0.1
    assert w1["packed_bytes"] / 2**20 < 41.5 < w11["packed_bytes"] / 2**20
    # The up/down ResBlocks' convs are counted at the resolution they run at (after the resampling).
    rows = {r["path"]: r for r in w1["layers"]}
    assert rows["input_blocks_3/down/in_conv"]["macs"] == 16 * 16 * (9 * 192) * 192
    assert rows["output_blocks_2/up/in_conv"]["macs"] == 4 * 4 * (9 * 768) * 768


def test_cross_attention_costs_by_hand():
    # SpatialTransformer of the tiny variant: self-attention over T = H*W tokens, cross-attention to 1 token.
    cfg = tiny_config()
    cfg.model.use_spatial_transformer = True
    cfg.model.cond_stage = "class"
    cfg.model.context_dim = 16
    cfg.data.num_classes = 10
    s = by_name(efficiency.efficiency_report(cfg))["BinaryDM W1A8"]
    rows = {r["path"]: r for r in s["layers"]}
    base = "middle_block/attn/transformer_blocks_0"
    assert rows[f"{base}/attn1"]["macs"] == 2 * 16 * 16 * 64 and rows[f"{base}/attn2"]["macs"] == 2 * 16 * 1 * 64
    assert rows[f"{base}/attn2/to_k"]["macs"] == 1 * 16 * 64  # one context token, context_dim 16 -> 64
    assert rows[f"{base}/ff_proj"]["macs"] == 16 * 64 * 512 and rows[f"{base}/ff_proj"]["w_bits"] == 1
    assert rows["class_embedder"]["kind"] == "norm/embed" and rows["class_embedder"]["w_bits"] == 32
