"""Weight binarizers and activation quantizers of BinaryDM (SPEC §2, §4).

Pure functions; each states its forward value and the gradient it defines. Kernels follow the flax
layout with output channels on the last axis: conv ``(kh, kw, c_in, c_out)``, dense ``(c_in, c_out)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

LSQ_BITS = (4, 8)
"""Activation bit widths LSQ supports; 32 means "not quantized" (SPEC §4)."""


def _sign(x: Array) -> Array:
    """sign with sign(0) = +1 (SPEC §2 Decision), in the dtype of ``x``."""
    return jnp.where(x >= 0, 1, -1).astype(x.dtype)


@jax.custom_vjp
def sign_ste(x: Array) -> Array:
    """Sign with the clipped straight-through estimator (SPEC §2).

    Forward: ``+1 if x >= 0 else -1`` (sign(0) = +1), same dtype as ``x``.
    Backward: ``dL/dx = dL/dy * 1[|x| <= 1]`` (hard-tanh STE).
    """
    return _sign(x)


def _sign_ste_fwd(x: Array) -> tuple[Array, Array]:
    return _sign(x), x


def _sign_ste_bwd(x: Array, g: Array) -> tuple[Array]:
    return (g * (jnp.abs(x) <= 1).astype(g.dtype),)


sign_ste.defvjp(_sign_ste_fwd, _sign_ste_bwd)


def init_scales(w: Array, num_bases: int) -> Array:
    """Initial per-output-channel scales of a ``num_bases``-basis binarizer (SPEC §2).

    ``a_1 = mean|w|``, ``r_1 = w - a_1 sign(w)``; then ``a_j = mean|r_{j-1}|``,
    ``r_j = r_{j-1} - a_j sign(r_{j-1})``. Means are over every axis but the last (output channels).
    Returns float32 ``(num_bases, C_out)``.
    """
    if num_bases < 1:
        raise ValueError(f"num_bases must be >= 1, got {num_bases}")
    r = jnp.asarray(w, jnp.float32)
    fan_in_axes = tuple(range(r.ndim - 1))
    scales = []
    for _ in range(num_bases):
        a = jnp.mean(jnp.abs(r), axis=fan_in_axes)
        r = r - a * _sign(r)
        scales.append(a)
    return jnp.stack(scales)


def multi_basis_binarize(w: Array, scales: Array) -> Array:
    """Multi-basis binarized weight ``w_b = sum_j a_j * sign(r_{j-1})`` (SPEC §2, LMB).

    ``r_0 = w``, ``r_j = r_{j-1} - a_j * sign(r_{j-1})`` with the learned ``scales`` (shape ``(k, C_out)``);
    ``k = 1`` is the single-basis ``a_1 * sign(w)``. Every sign is :func:`sign_ste`; the scales get plain
    autodiff, so ``a_1`` also receives gradient through the residual. Output has the shape and dtype of ``w``.
    """
    if scales.ndim != 2 or scales.shape[-1] != w.shape[-1]:
        raise ValueError(
            f"scales must have shape (num_bases, C_out={w.shape[-1]}), got {scales.shape}"
        )
    # Residuals are small differences of similar numbers: form them in at least the scales' precision.
    dtype = jnp.result_type(w.dtype, scales.dtype)
    r = w.astype(dtype)
    w_b = jnp.zeros_like(r)
    for j in range(scales.shape[0]):
        term = scales[j].astype(dtype) * sign_ste(r)
        w_b = w_b + term
        r = r - term
    return w_b.astype(w.dtype)


def _lsq_range(bits: int) -> tuple[int, int]:
    """Signed integer range ``(Qn, Qp) = (-2^(b-1), 2^(b-1) - 1)`` (SPEC §4)."""
    if bits not in LSQ_BITS:
        raise ValueError(f"LSQ bits must be one of {LSQ_BITS} (or 32 = off), got {bits!r}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _round_ste(x: Array) -> Array:
    """round forward, identity backward."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _scale_grad(x: Array, g: float) -> Array:
    """Value ``x`` exactly, gradient multiplied by ``g`` (the LSQ grad_scale trick)."""
    return jax.lax.stop_gradient(x) + (x * g - jax.lax.stop_gradient(x * g))


def lsq_quantize(x: Array, step: Array, bits: int) -> Array:
    """LSQ fake quantization, signed (Esser et al. 2020; SPEC §4).

    ``x_q = round_ste(clip(x / s, Qn, Qp)) * s`` with ``Qn = -2^(b-1)``, ``Qp = 2^(b-1) - 1``.
    Gradients: ``dx = 1[Qn <= x/s <= Qp]``; ``ds = g * (round(x/s) - x/s)`` inside the range and ``g * Qn`` /
    ``g * Qp`` below / above it, with ``g = 1 / sqrt(numel(x) * Qp)``. ``bits = 32`` returns ``x`` (off);
    bits outside {4, 8, 32} raise ValueError. Computed in float32, returned in ``x``'s dtype.
    """
    if bits == 32:
        return x
    qn, qp = _lsq_range(bits)
    g = 1.0 / math.sqrt(x.size * qp)
    s = _scale_grad(jnp.asarray(step, jnp.float32), g)
    v = jnp.clip(x.astype(jnp.float32) / s, qn, qp)
    return (_round_ste(v) * s).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lsq_select(x: Array, step: Array, on: Array, bits: int) -> Array:
    """``where(on > 0, lsq_quantize(x, step, bits), x)`` as one op with a hand-written VJP (issue 9).

    The same function and gradients as the composition (tests/test_quant.py checks both), but the backward
    is one pass over ``x`` and ``dy``: ``dx = dy * 1[inside or not on]`` and one reduction for ``d step``;
    autodiff of the composition kept f32 ``x / s`` residuals and split the step gradient over several
    reductions. ``on`` (the layer's progressive mask) gets no gradient. Quantizes in float32, returns
    ``x``'s dtype; ``bits`` must be 4 or 8.
    """
    return _lsq_select_fwd(x, step, on, bits)[0]


def _lsq_select_fwd(x, step, on, bits):
    s = jnp.asarray(step, jnp.float32)
    return jnp.where(on > 0, lsq_quantize(x, s, bits), x), (x, s, on)


def _lsq_select_bwd(bits, res, dy):
    x, s, on = res
    qn, qp = _lsq_range(bits)
    v = x.astype(jnp.float32) / s
    inside = (v >= qn) & (v <= qp)
    vc = jnp.clip(v, qn, qp)
    on_ = on > 0
    dx = jnp.where(on_ & ~inside, jnp.zeros_like(dy), dy)
    g = 1.0 / math.sqrt(x.size * qp)
    ds = jnp.where(on_, g * jnp.sum(dy.astype(jnp.float32) * (jnp.round(vc) - jnp.where(inside, vc, 0.0))), 0.0)
    return dx, ds.astype(s.dtype), jnp.zeros_like(on)


lsq_select.defvjp(_lsq_select_fwd, _lsq_select_bwd)


def lsq_init_step(x_absmean: Any, bits: int) -> Array:
    """Initial LSQ step ``s = 2 * mean|x| / sqrt(Qp)`` (SPEC §4); ``x_absmean`` is ``mean|x|``.

    Only defined for quantized widths {4, 8}; anything else raises ValueError.
    """
    _, qp = _lsq_range(bits)
    return 2.0 * jnp.asarray(x_absmean, jnp.float32) / math.sqrt(qp)


def ebb_regularizer(second_scales: Any, tau: float) -> Array:
    """EBB regulariser ``tau * mean over layers of mean(a2)`` (SPEC §2).

    ``second_scales`` is a pytree (list, dict, ...) whose leaves are each one layer's ``a2`` vector.
    With no multi-basis layers there is nothing to push to zero, so the result is 0.
    """
    leaves = jax.tree_util.tree_leaves(second_scales)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    per_layer = jnp.stack([jnp.mean(jnp.asarray(a, jnp.float32)) for a in leaves])
    return tau * jnp.mean(per_layer)
