"""Tests for bdm_jax.diffusion against float64 numpy references written out here (SPEC §7, §8, §11)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdm_jax import diffusion

T = 1000


# ---------------------------------------------------------------------------------------------------
# Independent float64 references
# ---------------------------------------------------------------------------------------------------


def ref_betas(name, timesteps, b0=1e-4, b1=0.02):
    i = np.arange(timesteps, dtype=np.float64)
    frac = i / max(timesteps - 1, 1)
    if name == "linear":
        return b0 + (b1 - b0) * frac
    if name == "sqrt_linear":
        return (math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * frac) ** 2
    # Nichol & Dhariwal, written as in their paper: beta_t = 1 - abar(t) / abar(t - 1).
    abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((k + 1) / timesteps) / abar(k / timesteps), 0.999)
                     for k in range(timesteps)])


def ref_abar(betas):
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return np.array(out)


def ref_posterior(betas):
    """Posterior q(x_{t-1} | x_t, x0) by Bayes' rule on the two Gaussians (not Ho et al.'s closed form)."""
    abar = ref_abar(betas)
    abar_prev = np.append(1.0, abar[:-1])
    var = np.zeros_like(betas)
    c1 = np.ones_like(betas)
    c2 = np.zeros_like(betas)
    # t >= 1: prior x_{t-1} | x0 ~ N(sqrt(abar_prev) x0, 1 - abar_prev),
    # likelihood x_t | x_{t-1} ~ N(sqrt(1 - beta) x_{t-1}, beta).
    prec = 1.0 / (1.0 - abar_prev[1:]) + (1.0 - betas[1:]) / betas[1:]
    var[1:] = 1.0 / prec
    c1[1:] = var[1:] * np.sqrt(abar_prev[1:]) / (1.0 - abar_prev[1:])
    c2[1:] = var[1:] * np.sqrt(1.0 - betas[1:]) / betas[1:]
    return var, c1, c2


@pytest.fixture(scope="module")
def sched():
    return diffusion.make_schedule("linear", T, 1e-4, 0.02)


@pytest.fixture(scope="module")
def step_inputs():
    rng = np.random.default_rng(0)
    shape = (4, 3, 2, 2)
    x_t = rng.normal(size=shape).astype(np.float32)
    eps = rng.normal(size=shape).astype(np.float32)
    noise = rng.normal(size=shape).astype(np.float32)
    t = np.array([0, 1, 500, 999], np.int32)
    return x_t, eps, noise, t


# ---------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,b0,b1",
    [("linear", 1e-4, 0.02), ("sqrt_linear", 0.0015, 0.0195), ("cosine", 1e-4, 0.02)],
)
def test_beta_schedules_match_closed_forms(name, b0, b1):
    betas = diffusion.get_beta_schedule(name, T, b0, b1)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    ref = ref_betas(name, T, b0, b1)
    np.testing.assert_allclose(betas, ref, rtol=1e-12, atol=1e-15)
    if name != "cosine":
        assert betas[0] == pytest.approx(b0, rel=1e-12)
        assert betas[-1] == pytest.approx(b1, rel=1e-12)
    else:
        assert betas.max() == pytest.approx(0.999)  # the clip is hit at the end of the cosine schedule
    # Sanity on one interior index against the closed form written out inline.
    if name == "sqrt_linear":
        assert betas[500] == pytest.approx(
            (math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * 500 / 999) ** 2, rel=1e-12)


@pytest.mark.parametrize("name", diffusion.BETA_SCHEDULES)
def test_make_schedule_fields(name):
    s = diffusion.make_schedule(name, T, 1e-4, 0.02)
    assert s.num_timesteps == T
    for leaf in jax.tree_util.tree_leaves(s):
        chex.assert_shape(leaf, (T,))
        chex.assert_type(leaf, jnp.float32)
    betas = ref_betas(name, T)
    abar = ref_abar(betas)
    var, c1, c2 = ref_posterior(betas)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=2e-5, atol=1e-12)
    np.testing.assert_allclose(s.sqrt_alphas_cumprod, np.sqrt(abar), rtol=2e-5, atol=1e-12)
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - abar), rtol=1e-5)
    np.testing.assert_allclose(s.posterior_variance, var, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(s.posterior_mean_coef1, c1, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(s.posterior_mean_coef2, c2, rtol=1e-5, atol=1e-12)
    logvar = np.log(np.append(var[1], var[1:]))
    np.testing.assert_allclose(s.posterior_log_variance_clipped, logvar, rtol=1e-5)
    # Endpoints of abar: first is 1 - beta_0, last is the product of all alphas.
    assert float(s.alphas_cumprod[0]) == pytest.approx(1 - betas[0], rel=1e-6)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(np.prod(1 - betas), rel=2e-5, abs=1e-12)


def test_ddpm_linear_abar_endpoint_value():
    # Well-known value for DDPM CIFAR-10 (SPEC §11): abar_T ~ 4.04e-5.
    s = diffusion.make_schedule("linear", T)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(4.0358e-5, rel=1e-3)


# ---------------------------------------------------------------------------------------------------
# Forward process and loss
# ---------------------------------------------------------------------------------------------------


def test_q_sample_matches_formula(sched):
    rng = np.random.default_rng(1)
    x0 = rng.uniform(-1, 1, size=(5, 4, 4, 3)).astype(np.float32)
    noise = rng.normal(size=x0.shape).astype(np.float32)
    t = np.array([0, 7, 250, 640, 999], np.int32)
    out = diffusion.q_sample(sched, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    chex.assert_shape(out, x0.shape)
    chex.assert_type(out, jnp.float32)
    abar = ref_abar(ref_betas("linear", T))[t][:, None, None, None]
    ref = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    # predict_x0 inverts it.
    np.testing.assert_allclose(diffusion.predict_x0(sched, out, t, noise), x0, atol=2e-3)


def test_eps_loss_is_float32_mean():
    rng = np.random.default_rng(2)
    eps = rng.normal(size=(8, 16, 16, 4)).astype(np.float32)
    pred = jnp.asarray(eps + 0.1 * rng.normal(size=eps.shape), jnp.bfloat16)
    loss = diffusion.eps_loss(pred, jnp.asarray(eps))
    chex.assert_shape(loss, ())
    chex.assert_type(loss, jnp.float32)
    ref = np.mean((np.asarray(pred, np.float64) - eps.astype(np.float64)) ** 2)
    # A bf16 reduction would be off by ~1e-2 relative.
    assert float(loss) == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Single steps
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_matches_eq12(sched, step_inputs, eta, clip):
    x_t, eps, noise, t = step_inputs
    t_prev = np.array([-1, 0, 480, 979], np.int32)
    out = diffusion.ddim_step(sched, x_t, t, t_prev, eps, noise, eta=eta, clip_denoised=clip)
    chex.assert_shape(out, x_t.shape)
    chex.assert_type(out, jnp.float32)

    abar = ref_abar(ref_betas("linear", T))
    x, e, z = (v.astype(np.float64) for v in (x_t, eps, noise))
    a_t = abar[t][:, None, None, None]
    a_p = np.where(t_prev >= 0, abar[np.maximum(t_prev, 0)], 1.0)[:, None, None, None]
    x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
    if clip:
        x0 = np.clip(x0, -1, 1)
        e = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
    sigma = eta * np.sqrt((1 - a_p) / (1 - a_t)) * np.sqrt(1 - a_t / a_p)
    ref = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - sigma**2) * e + sigma * z
    scale = np.abs(ref).max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=(2e-6 * scale).min())
    # t_prev = -1 returns the predicted x0 exactly (no noise, alpha_prev = 1).
    np.testing.assert_allclose(out[0], x0[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_matches_ancestral_formula(sched, step_inputs, variance, clip):
    x_t, eps, noise, t = step_inputs
    out = diffusion.ddpm_step(sched, x_t, t, eps, noise, clip_denoised=clip, variance=variance)
    chex.assert_shape(out, x_t.shape)
    chex.assert_type(out, jnp.float32)

    betas = ref_betas("linear", T)
    abar = ref_abar(betas)
    var, c1, c2 = ref_posterior(betas)
    b = lambda a: a[t][:, None, None, None]
    x, e, z = (v.astype(np.float64) for v in (x_t, eps, noise))
    x0 = (x - np.sqrt(1 - b(abar)) * e) / np.sqrt(b(abar))
    if clip:
        x0 = np.clip(x0, -1, 1)
    mean = b(c1) * x0 + b(c2) * x
    sigma2 = b(var) if variance == "fixed_small" else b(betas)
    ref = mean + (t > 0)[:, None, None, None] * np.sqrt(sigma2) * z
    scale = np.abs(ref).max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=(2e-6 * scale).min())
    # At t == 0 the step returns the predicted x0 (coef1 = 1, coef2 = 0, no noise).
    np.testing.assert_allclose(out[0], x0[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# DDIM timestep sequences
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [100, 50])
def test_ddim_timesteps_uniform(steps):
    seq = diffusion.ddim_timesteps(T, steps, "uniform")
    np.testing.assert_array_equal(seq, list(range(0, T, T // steps)))
    assert seq.shape == (steps,) and np.issubdtype(seq.dtype, np.integer)


def test_ddim_timesteps_uniform_non_divisor_keeps_length():
    seq = diffusion.ddim_timesteps(T, 300, "uniform")
    np.testing.assert_array_equal(seq, np.arange(300) * 3)


@pytest.mark.parametrize("steps", [100, 50])
def test_ddim_timesteps_quadratic(steps):
    seq = diffusion.ddim_timesteps(T, steps, "quadratic")
    ref = [int(v) for v in np.linspace(0, np.sqrt(T * 0.8), steps) ** 2]
    np.testing.assert_array_equal(seq, ref)
    assert seq.shape == (steps,)
    assert np.all(np.diff(seq) >= 0) and seq[0] == 0 and seq[-1] in (799, 800)


# ---------------------------------------------------------------------------------------------------
# Full sampler
# ---------------------------------------------------------------------------------------------------

SAMPLER_CASES = [
    dict(sampler="ddim", steps=100),
    dict(sampler="ddim", steps=50, spacing="quadratic", eta=1.0),
    dict(sampler="ddpm"),
    dict(sampler="ddpm", ddpm_variance="fixed_large"),
]


@pytest.mark.parametrize("kwargs", SAMPLER_CASES, ids=lambda k: "-".join(map(str, k.values())))
def test_sample_recovers_point_mass(sched, kwargs):
    c = jnp.array([-0.7, 0.2, 0.9], jnp.float32)

    def exact_eps(x_t, t):  # data distribution = point mass at c
        abar = sched.alphas_cumprod[t][:, None, None, None]
        return (x_t - jnp.sqrt(abar) * c) / jnp.sqrt(1 - abar)

    x = jax.jit(lambda rng: diffusion.sample(exact_eps, sched, (2, 4, 4, 3), rng, **kwargs))(
        jax.random.key(0))
    chex.assert_shape(x, (2, 4, 4, 3))
    chex.assert_type(x, jnp.float32)
    np.testing.assert_allclose(x, np.broadcast_to(c, x.shape), atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(sampler="ddim", steps=100), dict(sampler="ddpm")],
                         ids=["ddim", "ddpm"])
def test_sample_gaussian_data_statistics(sched, kwargs):
    mu, s = 0.3, 0.5

    def exact_eps(x_t, t):  # data N(mu, s^2): x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar)
        abar = sched.alphas_cumprod[t][:, None, None, None]
        return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / (abar * s**2 + 1 - abar)

    x = jax.jit(lambda rng: diffusion.sample(
        exact_eps, sched, (256, 4, 4, 1), rng, clip_denoised=False, **kwargs))(jax.random.key(3))
    x = np.asarray(x)
    # 4096 samples: standard errors ~0.008 (mean) and ~0.006 (std).
    assert abs(x.mean() - mu) < 0.03
    assert abs(x.std() - s) < 0.025


def test_sample_jit_traces_model_once_and_returns_float32(sched):
    traces = []

    def model_fn(x_t, t):
        traces.append(1)
        chex.assert_type(t, jnp.int32)
        chex.assert_shape(t, (x_t.shape[0],))
        return (0.1 * x_t).astype(jnp.bfloat16)

    fn = jax.jit(diffusion.sample, static_argnums=(0, 2),
                 static_argnames=("sampler", "steps", "eta", "spacing", "clip_denoised"))
    x = fn(model_fn, sched, (3, 8, 8, 2), jax.random.key(1), sampler="ddim", steps=20)
    chex.assert_shape(x, (3, 8, 8, 2))
    chex.assert_type(x, jnp.float32)
    assert len(traces) == 1
    assert np.all(np.isfinite(np.asarray(x))) and float(jnp.abs(x).max()) <= 1.0
    # Same key, same samples; different key, different samples.
    np.testing.assert_array_equal(x, fn(model_fn, sched, (3, 8, 8, 2), jax.random.key(1),
                                        sampler="ddim", steps=20))
    assert not np.allclose(x, fn(model_fn, sched, (3, 8, 8, 2), jax.random.key(2),
                                 sampler="ddim", steps=20))


# ---------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------


def _noop_model(x_t, t):
    return x_t


BAD_INPUTS = [
    (lambda: diffusion.get_beta_schedule("foo", T), "diffusion.beta_schedule"),
    (lambda: diffusion.make_schedule("cosin", T), "diffusion.beta_schedule"),
    (lambda: diffusion.get_beta_schedule("linear", 0), "diffusion.timesteps"),
    (lambda: diffusion.get_beta_schedule("linear", 10.5), "diffusion.timesteps"),
    (lambda: diffusion.get_beta_schedule("linear", T, 0.0, 0.02), "diffusion.beta_start"),
    (lambda: diffusion.get_beta_schedule("sqrt_linear", T, 1e-4, 1.0), "diffusion.beta_end"),
    (lambda: diffusion.get_beta_schedule("linear", T, 0.03, 0.02), "diffusion.beta_start"),
    (lambda: diffusion.ddim_timesteps(T, 1001), "sample.steps"),
    (lambda: diffusion.ddim_timesteps(T, 0), "sample.steps"),
    (lambda: diffusion.ddim_timesteps(T, 50, "cubic"), "sample.spacing"),
]


@pytest.mark.parametrize("call,field", BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_bad_inputs_raise_value_error_naming_field(call, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as err:
        call()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs,field", [
    (dict(sampler="euler"), "sample.sampler"),
    (dict(sampler="ddpm", ddpm_variance="learned"), "sample.ddpm_variance"),
    (dict(eta=-0.5), "sample.eta"),
    (dict(steps=2000), "sample.steps"),
    (dict(spacing="log"), "sample.spacing"),
])
def test_sample_bad_options(sched, kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        diffusion.sample(_noop_model, sched, (1, 2, 2, 1), jax.random.key(0), **kwargs)


def test_ddpm_step_bad_variance(sched, step_inputs):
    x_t, eps, noise, t = step_inputs
    with pytest.raises(ValueError, match=r"sample\.ddpm_variance='big'"):
        diffusion.ddpm_step(sched, x_t, t, eps, noise, clip_denoised=True, variance="big")
