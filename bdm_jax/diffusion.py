"""Gaussian diffusion: beta schedules, forward noising, eps loss and DDPM/DDIM samplers.

Pure functions on arrays (SPEC §7 training loss, SPEC §8 DDIM evaluation, SPEC §11 schedules).
Schedule constants are computed in float64 numpy and stored as float32 device arrays; every sampler
step runs in float32. Images/latents are NHWC (any rank works: per-example coefficients are
broadcast over all non-batch axes), timesteps are int32 ``[B]``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "sqrt_linear", "cosine")
SAMPLERS = ("ddim", "ddpm")
DDIM_SPACINGS = ("uniform", "quadratic")
DDPM_VARIANCES = ("fixed_small", "fixed_large")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_choice(field: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {', '.join(choices)}")


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


def get_beta_schedule(
    name: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """Float64 betas of length ``timesteps`` (SPEC §11).

    - ``linear``: DDPM (Ho et al.), ``linspace(beta_start, beta_end, T)``.
    - ``sqrt_linear``: linear in sqrt space, ``linspace(sqrt(beta_start), sqrt(beta_end), T)**2``;
      this is what the LDM code base calls "linear" (LDM-4 Bedrooms: 0.0015 -> 0.0195).
    - ``cosine``: Nichol & Dhariwal, ``abar(t) = cos((t/T + s)/(1 + s) * pi/2)**2`` with s = 0.008,
      betas clipped at 0.999; ``beta_start``/``beta_end`` are not used (but still validated).
    """
    _check_choice("diffusion.beta_schedule", name, BETA_SCHEDULES)
    if isinstance(timesteps, bool) or not isinstance(timesteps, (int, np.integer)) or timesteps < 1:
        raise ValueError(f"diffusion.timesteps={timesteps!r} must be an integer >= 1")
    for field, value in (("diffusion.beta_start", beta_start), ("diffusion.beta_end", beta_end)):
        if not 0.0 < float(value) < 1.0:
            raise ValueError(f"{field}={value!r} must be in the open interval (0, 1)")
    if beta_start > beta_end:
        raise ValueError(
            f"diffusion.beta_start={beta_start!r} must be <= diffusion.beta_end={beta_end!r}"
        )

    if name == "linear":
        return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
    if name == "sqrt_linear":
        root = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), timesteps, dtype=np.float64)
        return root**2
    s = 0.008  # Nichol & Dhariwal's offset: keeps beta_0 from being vanishingly small
    u = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    abar = np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)


@flax.struct.dataclass
class Schedule:
    """Per-timestep constants (float32, length T); a pytree, so it can be a jit argument."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def make_schedule(
    name: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Schedule:
    """Builds a :class:`Schedule` from :func:`get_beta_schedule` (float64 math, float32 storage)."""
    betas = get_beta_schedule(name, timesteps, beta_start, beta_end)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    # Posterior q(x_{t-1} | x_t, x_0) of Ho et al. eq. 6-7.
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # post_var[0] == 0; as in Ho et al. the log uses post_var[1] there (the value is never sampled).
    first = post_var[1] if timesteps > 1 else betas[0]
    post_logvar = np.log(np.append(first, post_var[1:]))
    coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)

    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return Schedule(
        betas=f32(betas),
        alphas_cumprod=f32(abar),
        sqrt_alphas_cumprod=f32(np.sqrt(abar)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_logvar),
        posterior_mean_coef1=f32(coef1),
        posterior_mean_coef2=f32(coef2),
    )


def _bcast(a: jax.Array, ndim: int) -> jax.Array:
    """Appends unit axes to ``a`` (``[B]`` or scalar) so it broadcasts against rank ``ndim``."""
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def _at(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """``values[t]`` broadcastable against an array of rank ``ndim`` whose leading axes are t's."""
    return _bcast(values[jnp.asarray(t, dtype=jnp.int32)], ndim)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def q_sample(sched: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (SPEC §7)."""
    x0 = jnp.asarray(x0, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    return (_at(sched.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + _at(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def eps_loss(eps_pred: jax.Array, eps: jax.Array) -> jax.Array:
    """Mean squared error over all elements, in float32 whatever the inputs' dtype (SPEC §7)."""
    diff = jnp.asarray(eps_pred, jnp.float32) - jnp.asarray(eps, jnp.float32)
    return jnp.mean(jnp.square(diff))


# --------------------------------------------------------------------------------------------------
# Sampling steps
# --------------------------------------------------------------------------------------------------


def predict_x0(sched: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """Inverts the forward process: ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
    x_t = jnp.asarray(x_t, jnp.float32)
    eps = jnp.asarray(eps, jnp.float32)
    return ((x_t - _at(sched.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * eps)
            / _at(sched.sqrt_alphas_cumprod, t, x_t.ndim))


def ddpm_step(
    sched: Schedule,
    x_t: jax.Array,
    t: jax.Array,
    eps: jax.Array,
    noise: jax.Array,
    *,
    clip_denoised: bool,
    variance: str = "fixed_small",
) -> jax.Array:
    """One ancestral step x_t -> x_{t-1} (Ho et al. Alg. 2 via the x0 parameterisation).

    Mean: posterior mean ``coef1 * x0_hat + coef2 * x_t`` with ``x0_hat`` optionally clipped to
    [-1, 1]. Variance: ``fixed_small`` = posterior variance, ``fixed_large`` = beta_t (posterior
    variance at t = 0, as in Ho et al.). No noise is added where t == 0.
    """
    _check_choice("sample.ddpm_variance", variance, DDPM_VARIANCES)
    x_t = jnp.asarray(x_t, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    nd = x_t.ndim
    t_b = _bcast(jnp.asarray(t, jnp.int32), nd)
    x0 = predict_x0(sched, x_t, t, eps)
    if clip_denoised:
        x0 = jnp.clip(x0, -1.0, 1.0)
    mean = (_at(sched.posterior_mean_coef1, t, nd) * x0
            + _at(sched.posterior_mean_coef2, t, nd) * x_t)
    if variance == "fixed_small":
        logvar = _at(sched.posterior_log_variance_clipped, t, nd)
    else:
        # posterior_log_variance_clipped[0] is log(posterior_variance[1]).
        logvar = jnp.where(t_b == 0, sched.posterior_log_variance_clipped[0],
                           jnp.log(_at(sched.betas, t, nd)))
    nonzero = (t_b != 0).astype(jnp.float32)
    return mean + nonzero * jnp.exp(0.5 * logvar) * noise


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform") -> np.ndarray:
    """The DDIM sub-sequence of timesteps, ascending, length ``num_steps`` (SPEC §8).

    ``uniform``: ``range(0, T, T // S)`` of the DDIM code, truncated to S entries when S does not
    divide T (diffusers' "leading" spacing). ``quadratic``: ``int(linspace(0, sqrt(0.8 T), S)**2)``
    of the DDIM code; for large S its first entries repeat (0, 0, ...), which makes those steps
    no-ops, exactly as in the reference code.
    """
    _check_choice("sample.spacing", spacing, DDIM_SPACINGS)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"sample.steps={num_steps!r} must be an integer >= 1")
    if num_steps > num_timesteps:
        raise ValueError(f"sample.steps={num_steps} must be <= diffusion.timesteps={num_timesteps}")
    if spacing == "uniform":
        return (np.arange(num_steps) * (num_timesteps // num_steps)).astype(np.int32)
    return (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int32)


def ddim_step(
    sched: Schedule,
    x_t: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    eps: jax.Array,
    noise: jax.Array,
    *,
    eta: float,
    clip_denoised: bool,
) -> jax.Array:
    """One DDIM step x_t -> x_{t_prev} (Song et al. eq. 12).

    ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise`` with
    ``sigma = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev)``; ``a`` is abar and
    ``t_prev < 0`` means ``a_prev = 1``. With ``clip_denoised`` the clipped x0 is used and eps is
    re-derived from it (as in ADM), so both terms stay consistent with x_t.
    """
    x_t = jnp.asarray(x_t, jnp.float32)
    eps = jnp.asarray(eps, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    nd = x_t.ndim
    t_prev = jnp.asarray(t_prev, jnp.int32)
    has_prev = _bcast(t_prev, nd) >= 0
    t_p = jnp.maximum(t_prev, 0)
    a_t = _at(sched.alphas_cumprod, t, nd)
    a_p = jnp.where(has_prev, _at(sched.alphas_cumprod, t_p, nd), 1.0)
    sqrt_a_p = jnp.where(has_prev, _at(sched.sqrt_alphas_cumprod, t_p, nd), 1.0)
    # 1 - abar from the float64-derived table: 1 - a in float32 loses ~all digits when a ~ 1.
    om_t = jnp.square(_at(sched.sqrt_one_minus_alphas_cumprod, t, nd))
    om_p = jnp.where(has_prev, jnp.square(_at(sched.sqrt_one_minus_alphas_cumprod, t_p, nd)), 0.0)
    x0 = predict_x0(sched, x_t, t, eps)
    if clip_denoised:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x_t - _at(sched.sqrt_alphas_cumprod, t, nd) * x0) / jnp.sqrt(om_t)
    # a_p - a_t, from whichever table has less cancellation.
    gap = jnp.where(a_t > 0.5, om_t - om_p, a_p - a_t)
    # sigma^2 = eta^2 (1 - a_p) * ratio, and the eps coefficient is sqrt(1 - a_p - sigma^2).
    ratio = gap / (a_p * om_t)
    sigma = eta * jnp.sqrt(jnp.maximum(om_p * ratio, 0.0))
    dir_coef = jnp.sqrt(jnp.maximum(om_p * (1.0 - eta**2 * ratio), 0.0))
    return sqrt_a_p * x0 + dir_coef * eps + sigma * noise


# --------------------------------------------------------------------------------------------------
# Full sampler
# --------------------------------------------------------------------------------------------------


def sample(
    model_fn: ModelFn,
    sched: Schedule,
    shape: Sequence[int],
    rng: jax.Array,
    *,
    sampler: str = "ddim",
    steps: int = 100,
    eta: float = 0.0,
    spacing: str = "uniform",
    clip_denoised: bool = True,
    ddpm_variance: str = "fixed_small",
) -> jax.Array:
    """Draws float32 samples of ``shape`` (batch first) starting from N(0, I) (SPEC §8).

    ``model_fn(x_t, t)`` maps x_t and int32 timesteps ``[B]`` to predicted eps.
    ``sampler="ddpm"`` runs ancestral sampling over all T steps (``steps``/``eta``/``spacing``
    unused); ``"ddim"`` runs :func:`ddim_step` over :func:`ddim_timesteps`. The loop is a
    ``lax.scan``, so the model is traced once. Jittable when ``model_fn``, ``shape`` and the
    keyword options are static (closed over or ``static_argnames``); ``sched`` and ``rng`` may be
    traced.
    """
    _check_choice("sample.sampler", sampler, SAMPLERS)
    _check_choice("sample.ddpm_variance", ddpm_variance, DDPM_VARIANCES)
    if isinstance(eta, (int, float)) and eta < 0:
        raise ValueError(f"sample.eta={eta!r} must be >= 0")
    shape = tuple(int(d) for d in shape)
    batch = shape[0]
    init_rng, loop_rng = jax.random.split(rng)
    x_init = jax.random.normal(init_rng, shape, jnp.float32)

    if sampler == "ddpm":
        ts = np.arange(sched.num_timesteps - 1, -1, -1, dtype=np.int32)
        keys = jax.random.split(loop_rng, ts.shape[0])

        def body(x, inp):
            t, key = inp
            tb = jnp.full((batch,), t, jnp.int32)
            eps = model_fn(x, tb)
            noise = jax.random.normal(key, shape, jnp.float32)
            x = ddpm_step(
                sched, x, tb, eps, noise, clip_denoised=clip_denoised, variance=ddpm_variance
            )
            return x, None

        x, _ = jax.lax.scan(body, x_init, (jnp.asarray(ts), keys))
        return x

    seq = ddim_timesteps(sched.num_timesteps, steps, spacing)
    ts = seq[::-1]
    ts_prev = np.append(-1, seq[:-1])[::-1].astype(np.int32)
    keys = jax.random.split(loop_rng, ts.shape[0])

    def body(x, inp):
        t, t_prev, key = inp
        tb = jnp.full((batch,), t, jnp.int32)
        tpb = jnp.full((batch,), t_prev, jnp.int32)
        eps = model_fn(x, tb)
        noise = jax.random.normal(key, shape, jnp.float32)
        x = ddim_step(sched, x, tb, tpb, eps, noise, eta=eta, clip_denoised=clip_denoised)
        return x, None

    x, _ = jax.lax.scan(body, x_init, (jnp.asarray(ts), jnp.asarray(ts_prev), keys))
    return x
