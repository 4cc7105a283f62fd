"""Low-rank Representation Mimicking (LRM) distillation loss (SPEC §5).

Features are NHWC block outputs, so the channel axis is the last one and a projection is a matmul on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

# Default TPU matmul precision for float32 is bf16 passes; the PCA and the projection are meant in float32.
_PRECISION = jax.lax.Precision.HIGHEST
LRM_PRECISIONS = ("features", "float32")  # quant.lrm_precision


def lrm_rank(channels: int, k: int) -> int:
    """Projection rank ``r = max(ceil(C / K), 2)`` (SPEC §5), never more than ``C``."""
    if k < 1 or k > channels:
        raise ValueError(f"lrm K must satisfy 1 <= K <= C, got K={k}, C={channels}")
    return min(max(math.ceil(channels / k), 2), channels)


def fit_projection(features: Array, k: int) -> Array:
    """PCA projection ``E`` (C x r) of one block's teacher features (SPEC §5).

    Rows = all leading (batch, spatial) positions; rows are centred, the C x C covariance is formed in float32
    (float64 is unavailable on TPU) and ``E`` holds its top-``r`` eigenvectors, largest eigenvalue first.
    """
    c = features.shape[-1]
    r = lrm_rank(c, k)
    x = jnp.asarray(features, jnp.float32).reshape(-1, c)
    x = x - jnp.mean(x, axis=0)
    cov = jnp.matmul(x.T, x, precision=_PRECISION) / x.shape[0]
    _, vecs = jnp.linalg.eigh(cov)  # ascending eigenvalues
    return vecs[:, ::-1][:, :r]


def fit_projections(teacher_feats: Mapping[str, Array], k: int) -> dict[str, Array]:
    """:func:`fit_projection` for every block's teacher features, keyed like ``teacher_feats``."""
    return {name: fit_projection(f, k) for name, f in teacher_feats.items()}


def _check_keys(**dicts: Mapping[str, Array]) -> list[str]:
    """Block names shared by all ``dicts``; ValueError naming what each one lacks otherwise."""
    union = set().union(*(d.keys() for d in dicts.values()))
    missing = {name: sorted(union - set(d.keys())) for name, d in dicts.items()}
    missing = {name: keys for name, keys in missing.items() if keys}
    if missing:
        detail = "; ".join(f"{name} is missing {keys}" for name, keys in missing.items())
        raise ValueError(f"feature/projection dicts must have the same block keys: {detail}")
    if not union:
        raise ValueError("no blocks given: the feature dicts are empty")
    return sorted(union)


def lrm_loss(
    student_feats: Mapping[str, Array],
    teacher_feats: Mapping[str, Array],
    projections: Mapping[str, Array],
    lam: float = 1e-4,
    precision: str = "float32",
) -> Array:
    """``L_LRM = lam / M * sum_i mean((F_s,i @ E_i - F_t,i @ E_i)^2)`` over M blocks (SPEC §5).

    Teacher features and the (fixed) projections get no gradient. ``precision`` (config ``quant.lrm_precision``):
    ``float32`` projects float32 operands at HIGHEST precision whatever the feature dtype; ``features`` projects
    in the student features' dtype (bf16 under bf16 compute: the operands are rounded to it, products accumulate
    in float32), which under bf16 is one tensor-core pass instead of float32 FMA (issue 9). Returns a float32 scalar.
    """
    if precision not in LRM_PRECISIONS:
        raise ValueError(f"lrm precision={precision!r} is not allowed: one of {', '.join(LRM_PRECISIONS)}")
    names = _check_keys(
        student_feats=student_feats, teacher_feats=teacher_feats, projections=projections
    )
    total = jnp.zeros((), jnp.float32)
    for name in names:
        f_s = jnp.asarray(student_feats[name])
        dtype = f_s.dtype if precision == "features" else jnp.float32
        f_t = jax.lax.stop_gradient(jnp.asarray(teacher_feats[name], jnp.float32))
        e = jax.lax.stop_gradient(jnp.asarray(projections[name], jnp.float32))
        # Projection is linear: (F_s - F_t) @ E is one matmul instead of two. The difference is formed in float32
        # (exact for bf16 inputs of similar size), then rounded to the operand dtype.
        diff = (f_s.astype(jnp.float32) - f_t).astype(dtype)
        proj = jnp.matmul(diff, e.astype(dtype), precision=_PRECISION if dtype == jnp.float32 else None,
                          preferred_element_type=jnp.float32)
        total = total + jnp.mean(jnp.square(proj))
    return lam / len(names) * total


def feature_mse_loss(
    student_feats: Mapping[str, Array], teacher_feats: Mapping[str, Array], lam: float = 1e-4
) -> Array:
    """Ablation "plain MSE on full features": ``lam / M * sum_i mean((F_s,i - F_t,i)^2)`` (SPEC §5)."""
    names = _check_keys(student_feats=student_feats, teacher_feats=teacher_feats)
    total = jnp.zeros((), jnp.float32)
    for name in names:
        f_s = jnp.asarray(student_feats[name], jnp.float32)
        f_t = jax.lax.stop_gradient(jnp.asarray(teacher_feats[name], jnp.float32))
        total = total + jnp.mean(jnp.square(f_s - f_t))
    return lam / len(names) * total
