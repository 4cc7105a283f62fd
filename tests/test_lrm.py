"""LRM projection and losses (SPEC §5) against float64 numpy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdm_jax import lrm


def features(shape, seed=0):
    """NHWC features with well-separated channel variances (so the top-r subspace is well defined)."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    q, _ = np.linalg.qr(rng.normal(size=(c, c)))
    z = rng.normal(size=(int(np.prod(shape[:-1])), c)) * (2.0 ** -np.arange(c) * 3.0)
    return (z @ q.T + rng.normal(size=c)).reshape(shape).astype(np.float32)


def np_top_subspace(f, r):
    x = np.asarray(f, np.float64).reshape(-1, f.shape[-1])
    x = x - x.mean(0)
    vals, vecs = np.linalg.eigh(x.T @ x / len(x))
    return vals[::-1], vecs[:, ::-1][:, :r]


@pytest.mark.parametrize("c,k,r", [(8, 4, 2), (9, 4, 3), (224, 4, 56), (4, 4, 2), (3, 1, 3), (16, 8, 2)])
def test_lrm_rank(c, k, r):
    assert lrm.lrm_rank(c, k) == r


@pytest.mark.parametrize("c,k", [(8, 0), (8, 9)])
def test_lrm_rank_rejects_bad_k(c, k):
    with pytest.raises(ValueError, match=rf"K={k}, C={c}"):
        lrm.lrm_rank(c, k)


@pytest.mark.parametrize("shape,k", [((4, 6, 6, 8), 4), ((3, 5, 5, 12), 4), ((50, 6), 2)])
def test_fit_projection_matches_numpy_eigh(shape, k):
    f = features(shape, seed=len(shape) + k)
    r = lrm.lrm_rank(shape[-1], k)
    e = lrm.fit_projection(jnp.asarray(f), k)
    chex.assert_shape(e, (shape[-1], r))
    chex.assert_type(e, jnp.float32)
    vals, ref = np_top_subspace(f, r)
    e = np.asarray(e, np.float64)
    np.testing.assert_allclose(e.T @ e, np.eye(r), atol=1e-5)
    # Eigenvector signs are arbitrary: compare the projectors onto the subspaces.
    np.testing.assert_allclose(e @ e.T, ref @ ref.T, atol=1e-4)
    # Largest eigenvalue first.
    x = f.reshape(-1, shape[-1]).astype(np.float64)
    x = x - x.mean(0)
    captured = np.sum((x @ e) ** 2, axis=0) / len(x)
    np.testing.assert_allclose(captured, vals[:r], rtol=1e-4)


def test_fit_projections_keys_and_bf16_input():
    feats = {"in_0": features((2, 4, 4, 8)), "mid": features((2, 2, 2, 16), seed=1)}
    proj = lrm.fit_projections({n: jnp.asarray(f).astype(jnp.bfloat16) for n, f in feats.items()}, 4)
    assert set(proj) == set(feats)
    chex.assert_shape([proj["in_0"], proj["mid"]], [(8, 2), (16, 4)])
    chex.assert_type([proj["in_0"], proj["mid"]], jnp.float32)


def block_feats(seed):
    rng = np.random.default_rng(seed)
    return {
        "in_0": rng.normal(size=(2, 4, 4, 8)).astype(np.float32),
        "mid": rng.normal(size=(2, 2, 2, 12)).astype(np.float32),
    }


def test_lrm_loss_matches_numpy_and_vanishes_when_equal():
    teacher, student = block_feats(0), block_feats(1)
    proj = {n: np.asarray(p) for n, p in lrm.fit_projections(teacher, 4).items()}
    lam = 1e-4
    to_j = lambda d: {n: jnp.asarray(v) for n, v in d.items()}  # noqa: E731

    expected = lam / 2 * sum(
        np.mean((student[n].astype(np.float64) @ proj[n] - teacher[n].astype(np.float64) @ proj[n]) ** 2)
        for n in teacher
    )
    loss = jax.jit(lrm.lrm_loss)(to_j(student), to_j(teacher), to_j(proj), lam)
    chex.assert_shape(loss, ())
    chex.assert_type(loss, jnp.float32)
    assert float(loss) > 0
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert float(lrm.lrm_loss(to_j(teacher), to_j(teacher), to_j(proj), lam)) == 0.0

    # bf16 features are projected in float32: same value as the float32 computation on the rounded inputs.
    bf = lambda d: {n: jnp.asarray(v).astype(jnp.bfloat16) for n, v in d.items()}  # noqa: E731
    up = lambda d: {n: v.astype(jnp.float32) for n, v in d.items()}  # noqa: E731
    loss_bf16 = lrm.lrm_loss(bf(student), bf(teacher), to_j(proj), lam)
    chex.assert_type(loss_bf16, jnp.float32)
    np.testing.assert_allclose(
        loss_bf16, lrm.lrm_loss(up(bf(student)), up(bf(teacher)), to_j(proj), lam), rtol=1e-6
    )


def test_lrm_loss_gradient_only_reaches_student():
    teacher, student = block_feats(2), block_feats(3)
    proj = lrm.fit_projections(teacher, 4)
    g_s, g_t = jax.grad(lambda s, t: lrm.lrm_loss(s, t, proj), argnums=(0, 1))(student, teacher)
    for n in teacher:
        assert np.abs(np.asarray(g_s[n])).max() > 0
        np.testing.assert_array_equal(g_t[n], np.zeros_like(teacher[n]))
        # d/dF_s mean((D E)^2) = 2 / numel(D E) * D E E^T, scaled by lam / M.
        d = (student[n] - teacher[n]).astype(np.float64)
        e = np.asarray(proj[n], np.float64)
        numel = d[..., :1].size * e.shape[1]
        np.testing.assert_allclose(g_s[n], 1e-4 / 2 * 2 / numel * d @ e @ e.T, rtol=1e-4, atol=1e-12)


def test_lrm_precision_features_projects_in_the_feature_dtype():
    """quant.lrm_precision=features (issue 9, change 4): bf16 operands, float32 accumulation; value and student
    gradient within bf16 rounding of the float32 computation, and float32 features keep the float32 result."""
    rng = np.random.default_rng(7)
    # Wide blocks, a student close to its teacher: the case where rounding the operands could matter most.
    teacher = {"a": rng.normal(size=(4, 8, 8, 64)).astype(np.float32),
               "b": rng.normal(size=(4, 4, 4, 128)).astype(np.float32)}
    student = {n: v + 0.05 * rng.normal(size=v.shape).astype(np.float32) for n, v in teacher.items()}
    proj = lrm.fit_projections(teacher, 4)
    bf = lambda d: {n: jnp.asarray(v).astype(jnp.bfloat16) for n, v in d.items()}  # noqa: E731
    up = lambda d: {n: v.astype(jnp.float32) for n, v in d.items()}  # noqa: E731

    def loss(prec, s):
        return lrm.lrm_loss(s, bf(teacher), proj, 1e-4, prec)

    ref, g_ref = jax.value_and_grad(lambda s: loss("float32", up(s)))(bf(student))
    fast, g_fast = jax.jit(jax.value_and_grad(lambda s: loss("features", s)))(bf(student))
    chex.assert_type(fast, jnp.float32)
    assert float(fast) != float(ref)  # the operands really were rounded to bf16
    np.testing.assert_allclose(fast, ref, rtol=2e-3)
    for n in teacher:
        chex.assert_type(g_fast[n], jnp.bfloat16)
        g, r = np.asarray(g_fast[n], np.float32), np.asarray(g_ref[n], np.float32)
        assert np.linalg.norm(g - r) <= 1e-2 * np.linalg.norm(r)
    # float32 features: "features" is the float32 computation.
    np.testing.assert_allclose(lrm.lrm_loss(student, teacher, proj, 1e-4, "features"),
                               lrm.lrm_loss(student, teacher, proj, 1e-4, "float32"), rtol=1e-6)
    with pytest.raises(ValueError, match=r"lrm precision='bf16' is not allowed: one of features, float32"):
        lrm.lrm_loss(student, teacher, proj, 1e-4, "bf16")


def test_feature_mse_loss_matches_numpy():
    teacher, student = block_feats(4), block_feats(5)
    expected = 0.5 / 2 * sum(np.mean((student[n] - teacher[n]).astype(np.float64) ** 2) for n in teacher)
    np.testing.assert_allclose(lrm.feature_mse_loss(student, teacher, 0.5), expected, rtol=1e-6)
    assert float(lrm.feature_mse_loss(teacher, teacher, 0.5)) == 0.0
    g_t = jax.grad(lambda t: lrm.feature_mse_loss(student, t, 0.5))(teacher)
    assert all(not np.asarray(v).any() for v in g_t.values())


def test_mismatched_keys_raise_naming_them():
    teacher, student = block_feats(0), block_feats(1)
    proj = lrm.fit_projections(teacher, 4)
    del student["mid"]
    with pytest.raises(ValueError, match=r"student_feats is missing \['mid'\]"):
        lrm.lrm_loss(student, teacher, proj)
    with pytest.raises(ValueError, match=r"student_feats is missing \['mid'\]"):
        lrm.feature_mse_loss(student, teacher, 1.0)
    with pytest.raises(ValueError, match=r"projections is missing \['extra'\]"):
        lrm.lrm_loss({**teacher, "extra": teacher["mid"]}, {**teacher, "extra": teacher["mid"]}, proj)
