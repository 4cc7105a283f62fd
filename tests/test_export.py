"""Packed export and inference (bdm_jax.export, packed layers): exact equality with the fake-quant model,
manifest contents, and every bad input. ~60 s on a free 2-core CPU (mostly two sampler compilations)."""

import functools
import json
import math
import os
import shutil
from typing import Any

import flax.linen as nn

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdm_jax import diffusion, export, pack, quant
from bdm_jax.layers import LayerSpec, QAct, QConv, QDense, QuantPlan
from bdm_jax.trainer import generate
from export_fixtures import student_workdir, tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """W1A4 (attention quantized, 2 bases head/tail) and W1A32 after EBB (second basis dropped), exported."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, act, extra in (("a4", 4, 1.0), ("ebb", 32, 0.0)):
        wd = str(root / f"work_{name}")
        cfg, setup, state = student_workdir(wd, tiny_config(act_bits=act), seed=1, extra_bases=extra)
        manifest = export.export_workdir(wd, str(root / f"packed_{name}"))
        out[name] = dict(workdir=wd, packed=str(root / f"packed_{name}"), cfg=cfg, setup=setup, state=state,
                         manifest=manifest)
    return out


# ------------------------------------------------------------------------------------------- layers


class One(nn.Module):
    """A single layer named "l" (plans address layers by module path)."""

    layer: Any
    plan: QuantPlan

    @nn.compact
    def __call__(self, x):
        return self.layer(plan=self.plan, name="l")(x)


def _layer_case(layer, x, bases, act_bits, extra):
    k = bases if extra else 1
    fq = QuantPlan.from_dict({"l": LayerSpec(bases, act_bits)})
    pk = QuantPlan(QuantPlan.from_dict({"l": LayerSpec(k, act_bits)}).entries, packed=True, word_bits=32)
    variables = One(layer, fq).init(jax.random.key(0), x)
    params = jax.tree.map(np.asarray, variables["params"])
    p = params["l"]
    p["scales"] = np.asarray(quant.init_scales(p["kernel"], bases)) * np.linspace(0.7, 1.3, p["kernel"].shape[-1],
                                                                                 dtype=np.float32)
    if "act_step" in p:
        p["act_step"] = np.float32(0.07)
    masks = jax.tree.map(jnp.ones_like, variables["masks"])
    if bases > 1:
        masks["l"]["extra_bases"] = jnp.asarray(extra, jnp.float32)
    packed = export._unflat(export.pack_params(params, {"l": k}, 32))
    assert set(packed["l"]) == (set(p) - {"kernel"}) | {"kernel_bits"}
    want = jax.jit(One(layer, fq).apply)({"params": params, "masks": masks}, x)
    got = jax.jit(One(layer, pk).apply)({"params": packed}, x)
    np.testing.assert_array_equal(got, want)
    return packed["l"]


@pytest.mark.parametrize("bases,act_bits,extra", [(1, 32, 1.0), (2, 4, 1.0), (2, 8, 0.0)])
def test_packed_conv_and_dense_equal_fake_quant(bases, act_bits, extra):
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 5))  # fan-in 45: not a multiple of 8 or 32
    conv = functools.partial(QConv, 7, strides=(2, 2))
    packed = _layer_case(conv, x, bases, act_bits, extra)
    assert packed["kernel_bits"].dtype == np.uint32
    assert packed["kernel_bits"].shape == (bases if extra else 1, 2, 7)
    xd = jax.random.normal(jax.random.key(2), (3, 4, 13))
    _layer_case(functools.partial(QDense, 6), xd, bases, act_bits, extra)


def test_packed_act_quantizer_is_the_mask_one_quantizer():
    x = jax.random.normal(jax.random.key(3), (2, 5, 4))
    plan = QuantPlan.from_dict({"": LayerSpec(0, 4)})
    variables = QAct(plan).init(jax.random.key(0), x)
    params = {"act_step": jnp.float32(0.3)}
    want = QAct(plan).apply({"params": params, "masks": variables["masks"]}, x)  # init masks: 1
    got = QAct(QuantPlan(plan.entries, packed=True)).apply({"params": params}, x)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, x)


# ------------------------------------------------------------------------------------------- UNet


def test_packed_unet_forward_equals_fake_quant(runs):
    # (the W1A4 run is compared through whole sampling trajectories below)
    r = runs["ebb"]
    pm = export.load_packed(r["packed"])
    x = jax.random.normal(jax.random.key(4), (2, 8, 8, 1))
    t = jnp.asarray([3, 77], jnp.int32)
    st = r["state"]
    want = jax.jit(r["setup"].model.apply)({"params": st["ema_params"], "masks": st["masks"]}, x, t)
    got = jax.jit(pm.model.apply)({"params": pm.params}, x, t)
    np.testing.assert_array_equal(got, want)
    # the device params of the packed model hold no float kernel of a binarized layer
    flat = export._flat(pm.params)
    for rec in pm.manifest["layers"]:
        if rec["bases"]:
            assert f"{rec['path']}/kernel" not in flat
            assert flat[f"{rec['path']}/kernel_bits"].dtype == jnp.uint32


def test_sampler_never_holds_all_unpacked_kernels(runs):
    """The packed sampler's temporaries stay far below the float kernels: unpacking is per layer and step."""
    pm = export.load_packed(runs["ebb"]["packed"])
    sched = pm.setup().sched

    def sample(params, rng):
        fn = lambda x, t: pm.model.apply({"params": params}, x, t)  # noqa: E731
        return diffusion.sample(fn, sched, (1, 8, 8, 1), rng, sampler="ddim", steps=3)

    compiled = jax.jit(sample).lower(pm.params, jax.random.key(0)).compile()
    float_kernels = sum(4 * math.prod(r["shape"]) for r in pm.manifest["layers"] if r["bases"])
    stats = compiled.memory_analysis()
    assert stats.argument_size_in_bytes < pm.manifest["payload_bytes"] + 1024  # the inputs are the packed words
    assert stats.temp_size_in_bytes < 0.3 * float_kernels, (stats.temp_size_in_bytes, float_kernels)


def test_export_load_sample_equals_training_samples(runs, tmp_path):
    r = runs["a4"]
    st = r["state"]
    want = generate(r["setup"], st["ema_params"], st["masks"], 4, 4, seed=3)
    res = export.sample_packed(r["packed"], str(tmp_path), num=4, batch_size=4, steps=5, seed=3)
    assert os.path.isfile(res["grid"])
    np.testing.assert_array_equal(np.load(res["npz"])["images"], want)
    assert want.std() > 10  # not a blank grid


def test_manifest_describes_the_arrays(runs):
    m = runs["ebb"]["manifest"]
    wpath = os.path.join(runs["ebb"]["packed"], export.WEIGHTS_FILE)
    assert m["weights_bytes"] == os.path.getsize(wpath)
    assert m["payload_bytes"] == sum(t["bytes"] for t in m["tensors"].values())
    assert m["source"]["step"] == 2 and m["word_bits"] == 32 and "LSB" in m["bit_layout"]
    layers = {r["path"]: r for r in m["layers"]}
    assert layers["conv_in"]["bases"] == 0 and layers["conv_in"]["bits_per_weight"] == 32
    multi = [r for r in m["layers"] if r["trained_bases"] == 2]
    assert multi and all(r["bases"] == 1 for r in multi)  # EBB dropped the second basis
    r = layers["middle_block/res_0/in_conv"]
    assert r["shape"] == [3, 3, 64, 64] and r["bits_bytes"] == 1 * 18 * 64 * 4
    assert r["bytes"] == r["bits_bytes"] + 4 * 64 + 4 * 64  # + scales + bias
    a4 = {r["path"]: r for r in runs["a4"]["manifest"]["layers"]}
    assert a4["input_blocks_1/res/in_conv"]["bases"] == 2 and a4["input_blocks_1/res/in_conv"]["act_bits"] == 4


def test_word_bits_8_round_trip(runs, tmp_path):
    r = runs["ebb"]
    st = r["state"]
    export.export_params(r["cfg"], st["ema_params"], st["masks"], str(tmp_path / "p8"), word_bits=8)
    pm = export.load_packed(str(tmp_path / "p8"))
    bits = export._flat(pm.params)["middle_block/res_0/in_conv/kernel_bits"]
    assert bits.dtype == jnp.uint8 and bits.shape == (1, 72, 64)
    ref = export.load_packed(r["packed"])

    def kernel(p):
        flat = export._flat(p.params)
        name = "middle_block/res_0/in_conv"
        return pack.binary_kernel(flat[f"{name}/kernel_bits"], flat[f"{name}/scales"], (3, 3, 64, 64))

    np.testing.assert_array_equal(kernel(pm), kernel(ref))


# ------------------------------------------------------------------------------------------- bad input


def _no_debris(parent, name):
    """Neither `name` nor a leftover tmp/old directory of an export to it exists in `parent`."""
    leftovers = [f for f in os.listdir(parent) if f.startswith(f".{name}.")]
    return leftovers == [] and not os.path.exists(os.path.join(parent, name))


def test_fp_and_unfinished_checkpoints_are_refused(tmp_path):
    fp = str(tmp_path / "fp")
    student_workdir(fp, tiny_config(method="fp"))
    with pytest.raises(export.ExportError, match="FP checkpoint"):
        export.export_workdir(fp, str(tmp_path / "out"))
    early = str(tmp_path / "early")
    student_workdir(early, tiny_config(), finished=False)
    with pytest.raises(export.ExportError, match="unfinished.*not binarized yet"):
        export.export_workdir(early, str(tmp_path / "out"))
    assert _no_debris(str(tmp_path), "out")


def test_params_that_do_not_fit_the_config_are_refused(runs, tmp_path):
    r = runs["ebb"]
    params = jax.tree.map(np.asarray, r["state"]["ema_params"])
    params["middle_block"]["res_0"]["in_conv"]["scales"] = np.ones((3, 64), np.float32)
    with pytest.raises(export.ExportError, match="in_conv/scales is float32\\[3, 64\\] but"):
        export.export_params(r["cfg"], params, r["state"]["masks"], str(tmp_path / "out"))
    assert _no_debris(str(tmp_path), "out")


def test_existing_output_needs_overwrite(runs):
    r = runs["ebb"]
    with pytest.raises(export.ExportError, match="already exists"):
        export.export_workdir(r["workdir"], r["packed"])
    before = os.path.getmtime(os.path.join(r["packed"], export.MANIFEST_FILE))
    export.export_workdir(r["workdir"], r["packed"], overwrite=True)
    assert os.path.getmtime(os.path.join(r["packed"], export.MANIFEST_FILE)) >= before
    name = os.path.basename(r["packed"])
    assert [f for f in os.listdir(os.path.dirname(r["packed"])) if f.startswith(f".{name}.")] == []
    assert sorted(os.listdir(r["packed"])) == [export.MANIFEST_FILE, export.WEIGHTS_FILE]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst, os.path.join(dst, export.WEIGHTS_FILE), os.path.join(dst, export.MANIFEST_FILE)


def test_truncated_or_mismatched_packed_files_are_refused(runs, tmp_path):
    d, w, m = _copy(runs["a4"]["packed"], str(tmp_path / "trunc"))
    with open(w, "r+b") as f:
        f.truncate(os.path.getsize(w) - 100)
    with pytest.raises(export.ExportError, match="truncated"):
        export.load_packed(d)
    d, w, m = _copy(runs["a4"]["packed"], str(tmp_path / "swap"))
    shutil.copy(os.path.join(runs["ebb"]["packed"], export.WEIGHTS_FILE), w)
    with pytest.raises(export.ExportError, match="truncated or from another export|sha256"):
        export.load_packed(d)
    d, w, m = _copy(runs["a4"]["packed"], str(tmp_path / "manifest"))
    man = json.load(open(m))
    man["tensors"]["middle_block/attn/qkv/kernel_bits"]["shape"] = [2, 3, 192]
    json.dump(man, open(m, "w"))
    msg = "qkv/kernel_bits is uint32\\[2, 2, 192\\] but its manifest expects uint32\\[2, 3, 192\\]"
    with pytest.raises(export.ExportError, match=msg):
        export.load_packed(d)
    d, w, m = _copy(runs["a4"]["packed"], str(tmp_path / "bases"))
    man = json.load(open(m))
    next(r for r in man["layers"] if r["path"] == "middle_block/attn/qkv")["bases"] = 3
    json.dump(man, open(m, "w"))
    with pytest.raises(export.ExportError, match="middle_block/attn/qkv has bases=3"):
        export.load_packed(d)
    open(m, "w").write("{not json")
    with pytest.raises(export.ExportError, match="not valid JSON"):
        export.load_packed(d)
    with pytest.raises(export.ExportError, match="no manifest.json"):
        export.load_packed(str(tmp_path))


def test_packed_file_of_another_model_config_is_refused(runs):
    other = tiny_config()
    other.model.model_channels = 16
    with pytest.raises(export.ExportError, match="model.model_channels=32 but the config says 16"):
        export.load_packed(runs["a4"]["packed"], config=other)
    export.load_packed(runs["a4"]["packed"], config=tiny_config(act_bits=4))  # the same model loads


def test_reader_rejects_a_header_that_points_past_the_data(tmp_path):
    path = str(tmp_path / "x.safetensors")
    export._write_tensors(path, {"a": np.arange(6, dtype=np.uint32)}, {"format": export.FORMAT})
    t, meta = export._read_tensors(path)
    np.testing.assert_array_equal(t["a"], np.arange(6))
    assert meta == {"format": export.FORMAT}
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(export.ExportError, match="truncated or corrupted: tensor a"):
        export._read_tensors(path)
    with open(path, "wb") as f:
        f.write(b"\x00\x01")
    with pytest.raises(export.ExportError, match="truncated"):
        export._read_tensors(path)
