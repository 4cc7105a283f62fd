"""The fused quantized-attention kernel (bdm_jax.flash_lsq) computes the explicit core's function (issue 9).

Off GPU the kernel runs interpreted (the same kernel code as XLA ops); the GPU run of these tests lowers it
through Triton (docs/PERF_NOTES.md, change 2).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bdm_jax import flash_lsq, rules
from bdm_jax.config import validate
from bdm_jax.quant import lsq_quantize
from bdm_jax.unet import UNet
from configs import tiny

SMALL = flash_lsq.KernelConfig(bits=None, block_q=16, block_k=32, block_b=16)  # several tiles per row / column


def _explicit(q, k, v, step, on, bits):
    """The explicit core of bdm_jax.attention with its attn_quant quantizer (q, k, v already quantized)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    w = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    if bits is not None:
        wq = lsq_quantize(w.astype(jnp.float32), step, bits).astype(q.dtype)
        w = jnp.where(on > 0, wq, w)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


def _inputs(dtype, shape=(2, 64, 3, 16), seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (2.0 * jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in ks[:3])
    return q, k, v, jax.random.normal(ks[3], shape, jnp.float32).astype(dtype)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# the backward's row sums from the forward's sums (default) or a key sweep; dQ from a second sweep or atomically
VARIANTS = {"default": {}, "rows_sweep": dict(d_from_forward=False), "dq_atomic": dict(dq_atomic=True)}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("bits,on,step", [(None, 1.0, 1.0), (8, 1.0, 0.01), (4, 1.0, 0.05), (8, 0.0, 0.01)])
def test_kernel_matches_explicit_core_float32(bits, on, step, variant):
    q, k, v, do = _inputs(jnp.float32)
    step = jnp.float32(step)
    cfg = dataclasses.replace(SMALL, **VARIANTS[variant])

    def fused(q, k, v, s):
        return flash_lsq.lsq_flash_attention(q, k, v, s, on, bits=bits, cfg=cfg)

    def ref(q, k, v, s):
        return _explicit(q, k, v, s, jnp.float32(on), bits)

    out, want = fused(q, k, v, step), ref(q, k, v, step)
    assert _rel(out, want) < 1e-5
    got = jax.grad(lambda *a: jnp.sum(fused(*a) * do), argnums=(0, 1, 2, 3))(q, k, v, step)
    exp = jax.grad(lambda *a: jnp.sum(ref(*a) * do), argnums=(0, 1, 2, 3))(q, k, v, step)
    for name, g, e in zip("qkv", got[:3], exp[:3]):
        assert _rel(g, e) < 1e-5, name
    if bits is not None and on:
        assert abs(float(exp[3])) > 1e-3 and abs(float(got[3]) - float(exp[3])) < 1e-3 * abs(float(exp[3]))
    else:  # no quantizer in effect: no gradient to the step
        assert float(got[3]) == 0.0 and float(exp[3]) == 0.0
    if bits == 4:  # the quantizer changes the output: the comparison above can fail
        assert _rel(ref(q, k, v, step), _explicit(q, k, v, step, 1.0, None)) > 1e-2


def test_kernel_in_bfloat16_is_as_close_to_float32_as_the_explicit_core():
    """bf16 operands: both paths round; the kernel (f32 logits and softmax backward on chip) must be within
    bf16 error of the float32 function and no further from it than the explicit bf16 core is."""
    q, k, v, do = _inputs(jnp.bfloat16, shape=(2, 128, 2, 32), seed=1)
    step = jnp.float32(0.004)
    fused = lambda q, k, v: flash_lsq.lsq_flash_attention(q, k, v, step, 1.0, bits=8)  # noqa: E731
    ref = lambda q, k, v: _explicit(q, k, v, step, 1.0, 8)  # noqa: E731
    f32 = lambda q, k, v: _explicit(*(a.astype(jnp.float32) for a in (q, k, v)), step, 1.0, 8)  # noqa: E731
    assert _rel(fused(q, k, v), f32(q, k, v)) < min(1e-2, _rel(ref(q, k, v), f32(q, k, v)))
    loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * do.astype(jnp.float32))  # noqa: E731
    got = jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)
    exp = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    hi = jax.grad(loss(f32), argnums=(0, 1, 2))(q, k, v)
    for g, e, h in zip(got, exp, hi):
        assert g.dtype == jnp.bfloat16 and _rel(g, h) < min(1e-2, _rel(e, h))


def test_shapes_the_kernel_cannot_tile_are_refused_with_the_reason():
    q = jnp.zeros((1, 20, 2, 16))
    with pytest.raises(ValueError, match="query tokens 20"):
        flash_lsq.lsq_flash_attention(q, q, q, bits=8)
    for d in (24, 256):  # 256: DDPM-CIFAR's single 256-channel head; its tiles do not fit in shared memory
        q = jnp.zeros((1, 32, 2, d))
        with pytest.raises(ValueError, match=f"head size {d} "):
            flash_lsq.lsq_flash_attention(q, q, q, bits=8)
    q = jnp.zeros((1, 32, 2, 16))
    with pytest.raises(ValueError, match="LSQ bits must be one of"):
        flash_lsq.lsq_flash_attention(q, q, q, bits=2)


def _w1a8_unet(impl):
    cfg = tiny.get_config()
    cfg.method, cfg.quant.act_bits = "binarydm", 8
    cfg.model.num_head_channels = 16
    cfg.model.attention_impl = impl
    cfg = validate(cfg)
    return UNet.from_config(cfg.model, rules.build_plan(cfg.model, cfg.quant)), cfg


def test_unet_kernel_path_equals_explicit_path_with_same_variables():
    net_k, cfg = _w1a8_unet("pallas")
    net_e, _ = _w1a8_unet("explicit")
    s, c = cfg.model.image_size, cfg.model.in_channels
    x = jax.random.normal(jax.random.key(1), (2, s, s, c))
    t = jnp.array([3, 700])
    variables = net_e.init(jax.random.key(0), x, t, mutable=["params", "masks"])
    # The kernel path (taken when `calib` is not collected) owns the explicit quantizers' variables.
    shapes = lambda v: jax.tree.map(jnp.shape, dict(v))  # noqa: E731
    assert shapes(net_k.init(jax.random.key(0), x, t, mutable=["params", "masks"])) == shapes(variables)
    variables = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape, a.dtype)
                             if a.dtype == jnp.float32 else a, variables)
    params = variables["params"]
    steps = {k: v for k, v in traverse_util.flatten_dict(dict(params)).items() if k[-2:] == ("attn_quant", "act_step")}
    assert steps  # the tiny UNet has a quantized attention
    params = traverse_util.unflatten_dict({**traverse_util.flatten_dict(dict(params)),
                                           **{k: jnp.float32(0.02) for k in steps}})
    rest = {k: v for k, v in variables.items() if k != "params"}
    assert "pallas_call" in str(jax.make_jaxpr(lambda p: net_k.apply({"params": p, **rest}, x, t))(params))

    def loss(net, p):
        return jnp.mean(net.apply({"params": p, **rest}, x, t) ** 2)

    (l_k, g_k), (l_e, g_e) = (jax.jit(jax.value_and_grad(lambda p, n=n: loss(n, p)))(params) for n in (net_k, net_e))
    assert abs(float(l_k) - float(l_e)) < 1e-5 * float(l_e) and float(l_e) > 1e-4
    g_k, g_e = (traverse_util.flatten_dict(dict(g)) for g in (g_k, g_e))
    for key in g_e:
        if float(jnp.linalg.norm(g_e[key])) > 0:
            assert _rel(g_k[key], g_e[key]) < (1e-3 if key[-1] == "act_step" else 1e-4), key  # steps: sums of many terms
    assert any(float(jnp.abs(g_e[k])) > 0 for k in steps)  # the attention step is learned through the kernel
