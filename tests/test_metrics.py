import numpy as np
import pytest
import scipy.linalg

from bdm_jax import metrics as M


def _random_spd(rng, d, n=None):
    n = n or 4 * d
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    return np.cov(x, rowvar=False)


# ---------------------------------------------------------------------------------------------- FID
def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    for method in ("eigh", "sqrtm"):
        got = M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
        assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_frechet_identical_is_zero_and_symmetric():
    rng = np.random.default_rng(1)
    mu, s = rng.normal(size=5), _random_spd(rng, 5)
    assert M.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    mu2, s2 = rng.normal(size=5), _random_spd(rng, 5)
    assert M.frechet_distance(mu, s, mu2, s2) == pytest.approx(M.frechet_distance(mu2, s2, mu, s), rel=1e-9)


def test_frechet_eigh_matches_scipy_sqrtm_on_random_features():
    rng = np.random.default_rng(2)
    d = 16
    f1 = rng.normal(size=(200, d)) @ rng.normal(size=(d, d))
    f2 = rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) + 0.5
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    # independent reference: the textbook formula with scipy's sqrtm
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert ref > 1.0
    assert M.frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(ref, rel=1e-8)
    assert M.frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(ref, rel=1e-8)
    assert M.fid_from_features(f1, f2) == pytest.approx(ref, rel=1e-8)


def test_frechet_singular_covariances_are_finite():
    rng = np.random.default_rng(3)
    d = 8
    f1 = rng.normal(size=(100, 3)) @ rng.normal(size=(3, d))  # rank-3 covariance
    f2 = rng.normal(size=(100, 3)) @ rng.normal(size=(3, d))
    mu1, s1, mu2, s2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    a = M.frechet_distance(mu1, s1, mu2, s2, method="eigh")
    b = M.frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    assert np.isfinite(a) and a > 0
    assert a == pytest.approx(b, rel=1e-3)


@pytest.mark.parametrize("bad, match", [
    (dict(mu1=np.zeros((2, 3))), "mu1 must be 1-D"),
    (dict(sigma2=np.eye(4)), "sigma2 has shape"),
    (dict(sigma1=np.zeros(3)), "sigma1 must be a square 2-D"),
    (dict(mu2=np.array([0.0, np.nan, 0.0])), "mu2 contains NaN"),
    (dict(sigma1=np.full((3, 3), np.nan)), "sigma1 contains NaN"),
    (dict(mu2=np.zeros(4), sigma2=np.eye(4)), "mu1 and mu2 must have the same shape"),
])
def test_frechet_bad_input(bad, match):
    args = dict(mu1=np.zeros(3), sigma1=np.eye(3), mu2=np.ones(3), sigma2=np.eye(3))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        M.frechet_distance(**args)


# ------------------------------------------------------------------------------------- FeatureStats
def test_feature_stats_streaming_matches_numpy(tmp_path):
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=(n, 7)) * 3 + 1000.0 for n in (5, 33, 1, 61)]  # large mean on purpose
    full = np.concatenate(batches)
    st = M.FeatureStats()
    for b in batches:
        st.update(b)
    assert st.count == 100
    np.testing.assert_allclose(st.mean, full.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.cov, np.cov(full, rowvar=False), rtol=1e-9, atol=1e-9)
    # save / load round trip
    st.save(tmp_path / "stats.npz")
    st2 = M.FeatureStats.load(tmp_path / "stats.npz")
    assert st2.count == 100 and st2.dim == 7
    np.testing.assert_array_equal(st2.mean, st.mean)
    np.testing.assert_array_equal(st2.cov, st.cov)
    # merging two partial accumulators == one accumulator over everything
    a = M.FeatureStats().update(full[:40])
    b = M.FeatureStats().update(full[40:])
    a.merge(b)
    np.testing.assert_allclose(a.mean, full.mean(0), rtol=1e-12)
    np.testing.assert_allclose(a.cov, np.cov(full, rowvar=False), rtol=1e-9, atol=1e-9)


def test_feature_stats_bad_input():
    st = M.FeatureStats()
    with pytest.raises(ValueError, match="batch_feats must be 2-D"):
        st.update(np.zeros(5))
    with pytest.raises(ValueError, match="batch_feats contains NaN"):
        st.update(np.array([[1.0, np.nan]]))
    st.update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="must have 4 features"):
        st.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="needs at least 4 samples"):
        st.cov  # 3 samples < 4 dims
    assert st.covariance(allow_singular=True).shape == (4, 4)
    with pytest.raises(ValueError, match="no samples"):
        M.FeatureStats().mean
    with pytest.raises(ValueError, match="needs at least 10 samples"):
        M.compute_stats(np.random.default_rng(0).normal(size=(5, 10)))


# ------------------------------------------------------------------------------------------------ IS
def test_inception_score_uniform_is_one():
    probs = np.full((100, 10), 0.1)
    mean, std = M.inception_score(probs, splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("c", [2, 7, 10])
def test_inception_score_one_hot_equals_num_classes(c):
    splits = 5
    labels = np.tile(np.arange(c), splits * 4)  # every split holds each class equally often
    probs = np.eye(c)[labels]
    mean, std = M.inception_score(probs, splits=splits)
    assert mean == pytest.approx(c, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_bad_input():
    with pytest.raises(ValueError, match="probs must be 2-D"):
        M.inception_score(np.full(10, 0.1))
    with pytest.raises(ValueError, match="sum to 1"):
        M.inception_score(np.ones((20, 10)), splits=2)
    with pytest.raises(ValueError, match="at least splits=10 rows"):
        M.inception_score(np.full((5, 2), 0.5))
    with pytest.raises(ValueError, match="probs contains NaN"):
        M.inception_score(np.full((20, 2), np.nan), splits=2)


# ---------------------------------------------------------------------------------------------- sFID
def test_sfid_features_convention():
    fm = np.arange(2 * 3 * 4 * 9, dtype=np.float32).reshape(2, 3, 4, 9)
    f = M.sfid_features(fm)
    assert f.shape == (2, 3 * 4 * 7)
    np.testing.assert_array_equal(f[1], fm[1, :, :, :7].ravel())
    st = M.compute_sfid_stats(fm)
    st = M.compute_sfid_stats(fm + 1, stats=st)
    assert st.count == 4 and st.dim == 84
    with pytest.raises(ValueError, match="at least num_channels=7 channels"):
        M.sfid_features(np.zeros((2, 3, 3, 4)))
    with pytest.raises(ValueError, match="must be 4-D NHWC"):
        M.sfid_features(np.zeros((2, 9)))


# ----------------------------------------------------------------------------------------------- P/R
def test_precision_recall_identical_sets():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(257, 12)) + 50.0  # large offset exercises the float32 path
    p, r = M.precision_recall(x, x.copy(), k=3, batch_size=64)  # several blocks, ragged last block
    assert p == 1.0 and r == 1.0


def test_precision_recall_far_disjoint_sets():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(200, 8))
    fake = rng.normal(size=(150, 8)) + 100.0
    p, r = M.precision_recall(real, fake, k=3, batch_size=50)
    assert p == pytest.approx(0.0, abs=1e-12) and r == pytest.approx(0.0, abs=1e-12)


def test_precision_recall_mode_dropping_and_chunking_invariance():
    rng = np.random.default_rng(7)
    real = np.concatenate([rng.normal(size=(150, 4)), rng.normal(size=(150, 4)) + 30.0])
    fake = rng.normal(size=(200, 4))  # covers only one of the two real modes
    p, r = M.precision_recall(real, fake, k=3, batch_size=10_000)
    assert p > 0.8 and 0.35 < r < 0.55
    assert (p, r) == M.precision_recall(real, fake, k=3, batch_size=37)


def test_knn_radii_match_brute_force():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(90, 5)).astype(np.float32)
    d = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    expected = np.sort(d, axis=1)[:, 3]  # index 0 is the point itself
    np.testing.assert_allclose(M._knn_radii(x, 3, 16), expected, rtol=1e-4, atol=1e-5)


def test_precision_recall_bad_input():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="real_feats must be 2-D"):
        M.precision_recall(np.zeros(10), x)
    with pytest.raises(ValueError, match="same feature dim"):
        M.precision_recall(x, np.zeros((10, 4)))
    with pytest.raises(ValueError, match="fake_feats needs more than k=3"):
        M.precision_recall(x, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="fake_feats contains NaN"):
        M.precision_recall(x, np.full((10, 3), np.nan))
