"""Numerics of the binarizers and LSQ (SPEC §2, §4) against float64 numpy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdm_jax import quant

CONV = (3, 3, 4, 5)
DENSE = (6, 7)


def np_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def np_init_scales(w, k):
    r = np.asarray(w, np.float64)
    axes = tuple(range(r.ndim - 1))
    out = []
    for _ in range(k):
        a = np.abs(r).mean(axis=axes)
        r = r - a * np_sign(r)
        out.append(a)
    return np.stack(out)


def np_binarize(w, scales):
    r = np.asarray(w, np.float64)
    w_b = np.zeros_like(r)
    for a in np.asarray(scales, np.float64):
        term = a * np_sign(r)
        w_b += term
        r = r - term
    return w_b


def kernel(shape, seed=0, std=1.0):
    return np.random.default_rng(seed).normal(0.0, std, shape).astype(np.float32)


# ---------------------------------------------------------------- sign_ste


def test_sign_ste_forward_and_zero():
    x = jnp.array([-2.0, -1.0, -1e-8, 0.0, -0.0, 1e-8, 0.5, 3.0])
    np.testing.assert_array_equal(quant.sign_ste(x), [-1, -1, -1, 1, 1, 1, 1, 1])
    for dtype in (jnp.float32, jnp.bfloat16):
        chex.assert_type(quant.sign_ste(x.astype(dtype)), dtype)


def test_sign_ste_backward_is_clipped_identity():
    x = np.array([-2.0, -1.0, -0.3, 0.0, 0.7, 1.0, 1.5], np.float32)
    g = np.arange(1, 8, dtype=np.float32)
    grad = jax.grad(lambda v: jnp.sum(jnp.asarray(g) * quant.sign_ste(v)))(jnp.asarray(x))
    np.testing.assert_array_equal(grad, g * (np.abs(x) <= 1))


# ---------------------------------------------------------------- scales and binarizer


@pytest.mark.parametrize("shape", [CONV, DENSE])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_init_scales_and_binarize_match_numpy(shape, k):
    w = kernel(shape, seed=k)
    scales = quant.init_scales(jnp.asarray(w), k)
    chex.assert_shape(scales, (k, shape[-1]))
    chex.assert_type(scales, jnp.float32)
    np.testing.assert_allclose(scales, np_init_scales(w, k), rtol=1e-5)

    w_b = jax.jit(quant.multi_basis_binarize)(jnp.asarray(w), scales)
    chex.assert_shape(w_b, shape)
    chex.assert_type(w_b, jnp.float32)
    np.testing.assert_allclose(w_b, np_binarize(w, np.asarray(scales)), rtol=1e-5, atol=1e-6)
    if k == 1:  # the single-basis binarizer a1 * sign(w)
        np.testing.assert_allclose(w_b, np.asarray(scales[0]) * np_sign(w), rtol=1e-6)


def test_reconstruction_error_decreases_with_bases():
    w = jnp.asarray(kernel(CONV, seed=3))
    errs = [
        float(jnp.mean((quant.multi_basis_binarize(w, quant.init_scales(w, k)) - w) ** 2))
        for k in (1, 2, 3, 4)
    ]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_binarize_keeps_bf16_dtype():
    w = jnp.asarray(kernel(DENSE)).astype(jnp.bfloat16)
    chex.assert_type(quant.multi_basis_binarize(w, quant.init_scales(w, 2)), jnp.bfloat16)


def test_binarize_rejects_wrong_scale_shape():
    w = jnp.asarray(kernel(DENSE))
    with pytest.raises(ValueError, match="C_out=7"):
        quant.multi_basis_binarize(w, jnp.ones((2, 6)))


@pytest.mark.parametrize("shape", [CONV, DENSE])
def test_two_basis_gradients_match_hand_derivation(shape):
    # Learned (not initial) scales, std chosen so both |w| <= 1 and |r1| <= 1 masks are mixed.
    w = kernel(shape, seed=10, std=1.2).astype(np.float64)
    rng = np.random.default_rng(11)
    a1 = rng.uniform(0.4, 0.9, shape[-1])
    a2 = rng.uniform(0.1, 0.5, shape[-1])
    G = rng.normal(size=shape)

    def loss(w_, a1_, a2_):
        return jnp.sum(jnp.asarray(G, jnp.float32) * quant.multi_basis_binarize(w_, jnp.stack([a1_, a2_])))

    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    dw, da1, da2 = jax.grad(loss, argnums=(0, 1, 2))(f32(w), f32(a1), f32(a2))

    # Chain rule with d sign(x)/dx := 1[|x| <= 1]:
    #   w_b = a1 s1 + a2 s2,  s1 = sign(w),  r1 = w - a1 s1,  s2 = sign(r1)
    #   dL/dr1 = G a2 m2                              (m2 = 1[|r1| <= 1])
    #   dL/ds1 = G a1 + dL/dr1 * (-a1)                (direct term and through r1)
    #   dL/dw  = dL/dr1 * 1 + dL/ds1 * m1             (m1 = 1[|w| <= 1])
    #          = G a1 m1 + G a2 m2 (1 - a1 m1)
    #   dL/da1 = sum G s1 + sum dL/dr1 * (-s1),   dL/da2 = sum G s2
    axes = tuple(range(len(shape) - 1))
    s1 = np_sign(w)
    m1 = (np.abs(w) <= 1).astype(np.float64)
    r1 = w - a1 * s1
    s2 = np_sign(r1)
    m2 = (np.abs(r1) <= 1).astype(np.float64)
    assert 0 < m1.mean() < 1 and 0 < m2.mean() < 1  # both STE clips are exercised
    ref_dw = G * a1 * m1 + G * a2 * m2 * (1 - a1 * m1)
    through_residual = (G * a2 * m2 * -s1).sum(axes)
    ref_da1 = (G * s1).sum(axes) + through_residual
    ref_da2 = (G * s2).sum(axes)
    assert np.abs(through_residual).min() > 1e-2  # a1's residual path matters in this test

    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(da1, ref_da1, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(da2, ref_da2, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- LSQ


def lsq_range(bits):
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [4, 8])
def test_lsq_forward_and_gradients_match_formulas(bits):
    qn, qp = lsq_range(bits)
    rng = np.random.default_rng(bits)
    s = 0.3 if bits == 4 else 0.02
    x = rng.normal(0.0, 2.0 * s * qp / 2.5, (2, 3, 4, 5)).astype(np.float32)
    v = x.astype(np.float64) / s
    inside = (v >= qn) & (v <= qp)
    assert inside.any() and (v < qn).any() and (v > qp).any()  # all three regions exercised

    xq = quant.lsq_quantize(jnp.asarray(x), jnp.float32(s), bits)
    chex.assert_type(xq, jnp.float32)
    np.testing.assert_allclose(xq, np.round(np.clip(v, qn, qp)) * s, rtol=1e-6, atol=1e-7)
    levels = np.asarray(xq, np.float64) / s
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert levels.min() >= qn - 1e-4 and levels.max() <= qp + 1e-4

    dx, ds = jax.grad(lambda a, b: jnp.sum(quant.lsq_quantize(a, b, bits)), argnums=(0, 1))(
        jnp.asarray(x), jnp.float32(s)
    )
    g = 1.0 / np.sqrt(x.size * qp)
    ref_ds = g * np.where(inside, np.round(v) - v, np.where(v < qn, qn, qp)).sum()
    np.testing.assert_array_equal(dx, inside.astype(np.float32))
    np.testing.assert_allclose(ds, ref_ds, rtol=1e-4)


def test_lsq_bf16_keeps_dtype():
    x = jnp.linspace(-1.0, 1.0, 16, dtype=jnp.bfloat16)
    chex.assert_type(quant.lsq_quantize(x, jnp.float32(0.1), 8), jnp.bfloat16)


def test_lsq_off_at_32_bits():
    x = jnp.asarray(kernel(DENSE))
    assert quant.lsq_quantize(x, jnp.float32(0.1), 32) is x


@pytest.mark.parametrize("bits", [1, 2, 16, 0])
def test_lsq_rejects_other_bit_widths(bits):
    with pytest.raises(ValueError, match=rf"got {bits}\b"):
        quant.lsq_quantize(jnp.ones(4), jnp.float32(0.1), bits)
    with pytest.raises(ValueError, match=rf"got {bits}\b"):
        quant.lsq_init_step(1.0, bits)


@pytest.mark.parametrize("bits,qp", [(4, 7), (8, 127)])
def test_lsq_init_step(bits, qp):
    x = kernel(CONV)
    step = quant.lsq_init_step(np.abs(x).mean(), bits)
    np.testing.assert_allclose(step, 2 * np.abs(x).mean() / np.sqrt(qp), rtol=1e-6)


# ---------------------------------------------------------------- EBB


def test_ebb_regularizer():
    a2s = [np.array([0.1, 0.3]), np.array([0.2, 0.4, 0.6, 0.8])]
    expected = 0.09 * np.mean([0.2, 0.5])
    value = quant.ebb_regularizer([jnp.asarray(a) for a in a2s], 0.09)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    np.testing.assert_allclose(
        quant.ebb_regularizer({"a": jnp.asarray(a2s[0]), "b": {"c": jnp.asarray(a2s[1])}}, 0.09),
        expected,
        rtol=1e-6,
    )
    assert float(quant.ebb_regularizer([], 0.09)) == 0.0
    grad = jax.grad(lambda a: quant.ebb_regularizer([a, a2s[1]], 0.5))(jnp.asarray(a2s[0]))
    np.testing.assert_allclose(grad, [0.5 / 2 / 2] * 2, rtol=1e-6)  # tau / num_layers / len(a2)


@pytest.mark.parametrize("bits", [8, 4])
def test_dynamic_act_scale_recomputes_the_step_from_each_input(bits):
    """quant.act_scale='dynamic' (SPEC §4, the official code's behaviour): step = 2 mean|x| / sqrt(Qp) of the
    input at hand, no gradient to the (unused) act_step param; 'learned' uses the param."""
    import flax.linen as nn

    from bdm_jax.layers import LayerSpec, QDense, QuantPlan

    class Net(nn.Module):  # a parent, so the layer has the path "d" the plan names
        plan: QuantPlan

        @nn.compact
        def __call__(self, x):
            return QDense(8, plan=self.plan, name="d")(x)

    spec = {"d": LayerSpec(bases=1, act_bits=bits)}
    x = jax.random.normal(jax.random.key(0), (4, 16)) * 3.0
    outs = {}
    for mode in ("learned", "dynamic"):
        net = Net(QuantPlan(tuple(spec.items()), act_scale=mode))
        variables = net.init(jax.random.key(1), x)
        params = dict(variables["params"]["d"], act_step=jnp.asarray(0.37))
        apply = lambda p, x: net.apply({"params": {"d": p}, "masks": variables["masks"]}, x)  # noqa: E731
        outs[mode] = apply(params, x)
        w_b = quant.multi_basis_binarize(params["kernel"], params["scales"])
        if mode == "dynamic":
            qp = 2 ** (bits - 1) - 1
            step = 2 * jnp.mean(jnp.abs(x)) / np.sqrt(qp)
            want = quant.lsq_quantize(x, step, bits) @ w_b + params["bias"]
            np.testing.assert_allclose(outs[mode], want, rtol=1e-5, atol=1e-5)
            other = dict(params, act_step=jnp.asarray(5.0))
            np.testing.assert_array_equal(apply(other, x), outs[mode])  # the param is not used
            g = jax.grad(lambda p: jnp.sum(apply(p, x) ** 2))(params)
            assert float(g["act_step"]) == 0.0
            # Another batch gets its own step (not the first batch's).
            x2 = 10.0 * x
            want2 = quant.lsq_quantize(x2, 10.0 * step, bits) @ w_b + params["bias"]
            np.testing.assert_allclose(apply(params, x2), want2, rtol=1e-4, atol=1e-3)
        else:
            want = quant.lsq_quantize(x, 0.37, bits) @ w_b + params["bias"]
            np.testing.assert_allclose(outs[mode], want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(outs["learned"], outs["dynamic"])


def test_act_scale_config_field():
    from bdm_jax.config import ConfigError, validate
    from bdm_jax.rules import build_plan
    from configs import tiny

    cfg = tiny.get_config()
    del cfg.quant["act_scale"]  # a config saved before the field existed
    assert validate(cfg).quant.act_scale == "learned"
    cfg = tiny.get_config()
    cfg.method, cfg.quant.act_bits, cfg.quant.act_scale = "binarydm", 8, "dynamic"
    cfg = validate(cfg)
    assert build_plan(cfg.model, cfg.quant).act_scale == "dynamic"
    cfg.quant.act_scale = "per_batch"
    with pytest.raises(ConfigError, match="quant.act_scale"):
        validate(cfg)


@pytest.mark.parametrize("bits,on,dtype", [(8, 1.0, jnp.float32), (4, 1.0, jnp.float32), (8, 0.0, jnp.float32),
                                           (4, 1.0, jnp.bfloat16)])
def test_lsq_select_is_the_masked_composition_with_its_gradients(bits, on, dtype):
    """The fused op of the train step (issue 9) computes where(on, lsq_quantize(x), x) and its autodiff grads."""
    qn, qp = lsq_range(bits)
    s = jnp.float32(0.25 if bits == 4 else 2.0**-6)  # powers of two: x / s is exact, so ties are real ties
    x = jax.random.normal(jax.random.key(bits), (4, 6, 5, 7), jnp.float32) * (1.2 * float(s) * qp / 2.5)
    x = x.astype(dtype)
    dy = jax.random.normal(jax.random.key(9), x.shape, jnp.float32).astype(dtype)
    on = jnp.float32(on)

    def composed(a, b):
        return jnp.where(on > 0, quant.lsq_quantize(a.astype(jnp.float32), b, bits).astype(a.dtype), a)

    def fused(a, b):
        return quant.lsq_select(a, b, on, bits)

    # 1 ulp apart at most: lsq_quantize's round_ste forms v + (round(v) - v), the fused op round(v).
    np.testing.assert_allclose(np.asarray(fused(x, s), np.float32), np.asarray(composed(x, s), np.float32),
                               rtol=2e-7 if dtype == jnp.float32 else 0, atol=0)
    loss = lambda f: lambda a, b: jnp.sum(f(a, b).astype(jnp.float32) * dy.astype(jnp.float32))  # noqa: E731
    gx, gs = jax.grad(loss(fused), argnums=(0, 1))(x, s)
    ex, es = jax.grad(loss(composed), argnums=(0, 1))(x, s)
    assert gx.dtype == dtype
    # Inside the range autodiff's dx is dy * s * (1/s) (1 ulp off dy); the fused op passes dy itself.
    np.testing.assert_allclose(np.asarray(gx, np.float32), np.asarray(ex, np.float32),
                               rtol=2e-7 if dtype == jnp.float32 else 8e-3, atol=0)
    assert int(jnp.sum(gx == 0)) == int(jnp.sum(ex == 0))  # the same clipped elements get no gradient
    if on:
        v = np.asarray(x, np.float64) / float(s)
        assert ((v < qn) | (v > qp)).any() and float(jnp.abs(es)) > 0  # clipping and a step gradient exercised
        inside = (v >= qn) & (v <= qp)
        term = np.where(inside, np.round(v) - v, np.clip(np.round(v), qn, qp))
        want = np.sum(np.asarray(dy, np.float64) * term) / np.sqrt(x.size * qp)  # SPEC §4 in float64
        np.testing.assert_allclose(float(gs), want, rtol=1e-4)
        np.testing.assert_allclose(float(gs), float(es), rtol=1e-4)
    else:
        assert float(gs) == 0.0 and float(es) == 0.0
