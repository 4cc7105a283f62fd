import json
import os
import time

import numpy as np
import pytest
from sklearn.datasets import load_digits

from bdm_jax import digits_classifier as dc
from bdm_jax import metrics as M

SIZE = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("clf_cache")
    t0 = time.perf_counter()
    clf = dc.get_classifier(cache_dir, SIZE, 1, seed=0)
    return clf, str(cache_dir), time.perf_counter() - t0


def test_load_digits_images():
    x, y = dc.load_digits_images(SIZE)
    assert x.shape == (1797, SIZE, SIZE, 1) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int32 and set(np.unique(y)) == set(range(10))
    assert x.min() == -1.0 and x.max() <= 1.0 and x.max() > 0.9
    x3, _ = dc.load_digits_images(SIZE, channels=3)
    np.testing.assert_array_equal(x3, np.repeat(x, 3, axis=-1))
    x8, y8 = dc.load_digits_images(8)  # native size: exact value mapping 0..16 -> [-1, 1]
    d = load_digits()
    np.testing.assert_allclose(x8[..., 0], d.images / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(y8, d.target)
    with pytest.raises(ValueError, match="image_size must be an integer >= 8 divisible by 4"):
        dc.load_digits_images(10)


def test_split_is_fixed_by_seed():
    a_tr, a_te = dc.split_indices(1797, 0)
    b_tr, b_te = dc.split_indices(1797, 0)
    c_tr, c_te = dc.split_indices(1797, 1)
    np.testing.assert_array_equal(a_te, b_te)
    assert len(a_te) == 359 and len(np.intersect1d(a_tr, a_te)) == 0 and len(a_tr) + len(a_te) == 1797
    assert not np.array_equal(a_te, c_te)


def test_accuracy_and_train_time(trained):
    clf, _, seconds = trained
    print(f"\n16x16 classifier: test accuracy {clf.test_accuracy:.4f}, trained+cached in {seconds:.1f}s")
    assert clf.test_accuracy >= 0.95
    assert seconds < 60
    # independent check of the reported accuracy on the held-out split
    x, y = dc.load_digits_images(SIZE)
    _, te = dc.split_indices(len(x), 0)
    assert float((clf.predict(x[te]) == y[te]).mean()) == pytest.approx(clf.test_accuracy)


def test_outputs_shapes_and_batching(trained):
    clf, _, _ = trained
    x, _ = dc.load_digits_images(SIZE)
    x = x[:300]
    out = clf.outputs(x)
    assert out["features"].shape == (300, 64) and out["probs"].shape == (300, 10)
    assert out["spatial"].shape == (300, SIZE // 4, SIZE // 4, 64)
    np.testing.assert_allclose(out["probs"].sum(-1), 1.0, rtol=1e-5)
    small = dc.Classifier(clf.params, SIZE, 1, batch_size=7)  # ragged last batch is padded
    np.testing.assert_allclose(small.features(x), out["features"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(small.probs(x), out["probs"], rtol=1e-5, atol=1e-6)
    assert np.all(out["features"].std(0) > 1e-3)  # no dead feature dims (FID covariance full rank)


def test_cache_roundtrip_identical_features(trained, monkeypatch):
    clf, cache_dir, _ = trained
    with open(os.path.join(cache_dir, f"digits_classifier_{SIZE}px_1ch_seed0.json")) as f:
        meta = json.load(f)
    assert meta["image_size"] == SIZE and meta["channels"] == 1 and meta["seed"] == 0
    assert meta["test_accuracy"] == clf.test_accuracy

    def no_training(*a, **k):
        raise AssertionError("cache miss: retrained")

    monkeypatch.setattr(dc, "train_classifier", no_training)
    loaded = dc.get_classifier(cache_dir, SIZE, 1, seed=0)
    assert loaded.test_accuracy == clf.test_accuracy
    x, _ = dc.load_digits_images(SIZE)
    np.testing.assert_array_equal(loaded.features(x[:100]), clf.features(x[:100]))
    np.testing.assert_array_equal(loaded.probs(x[:100]), clf.probs(x[:100]))


def test_cache_mismatch_retrains(trained, monkeypatch, tmp_path):
    clf, cache_dir, _ = trained
    for name in os.listdir(cache_dir):
        with open(os.path.join(cache_dir, name), "rb") as src, open(tmp_path / name, "wb") as dst:
            dst.write(src.read())
    calls = []

    def fake_train(image_size, channels, seed, steps, verbose=False):
        calls.append((image_size, channels, seed, steps))
        return clf.params, 0.5

    monkeypatch.setattr(dc, "train_classifier", fake_train)
    meta_path = tmp_path / f"digits_classifier_{SIZE}px_1ch_seed0.json"
    meta = json.loads(meta_path.read_text())
    meta["steps"] += 1  # stale metadata -> retrain
    meta_path.write_text(json.dumps(meta))
    assert dc.get_classifier(tmp_path, SIZE, 1, seed=0).test_accuracy == 0.5
    assert len(calls) == 1
    assert dc.get_classifier(tmp_path, SIZE, 1, seed=0).test_accuracy == 0.5  # now cached again
    assert len(calls) == 1
    dc.get_classifier(tmp_path, SIZE, 1, seed=3)  # other seed -> other cache entry
    assert calls[-1][2] == 3 and len(calls) == 2


def test_bad_inputs(trained):
    clf, _, _ = trained
    x, _ = dc.load_digits_images(SIZE)
    with pytest.raises(ValueError, match=r"shape \(N, 16, 16, 1\).*got shape \(4, 32, 32, 1\)"):
        clf.features(np.zeros((4, 32, 32, 1), np.float32))
    with pytest.raises(ValueError, match=r"\(N, 16, 16, 1\).*got shape \(4, 16, 16\)"):
        clf.probs(x[:4, ..., 0])
    with pytest.raises(ValueError, match=r"got shape \(4, 16, 16, 3\)"):
        clf.features(np.repeat(x[:4], 3, -1))
    with pytest.raises(ValueError, match=r"values in \[-1, 1\].*clip"):
        clf.features(x[:4] * 255.0)
    with pytest.raises(ValueError, match="NaN"):
        clf.features(np.full((2, SIZE, SIZE, 1), np.nan, np.float32))
    with pytest.raises(ValueError, match="dtype"):
        clf.features(np.zeros((2, SIZE, SIZE, 1), np.int32))


def test_training_is_deterministic():
    p1, a1 = dc.train_classifier(SIZE, 1, seed=5, steps=15)
    p2, a2 = dc.train_classifier(SIZE, 1, seed=5, steps=15)
    assert a1 == a2
    np.testing.assert_array_equal(p1["fc"]["kernel"], p2["fc"]["kernel"])
    np.testing.assert_array_equal(p1["conv1"]["kernel"], p2["conv1"]["kernel"])


def test_metrics_on_real_digits(trained):
    clf, _, _ = trained
    x, _ = dc.load_digits_images(SIZE)
    tr, te = dc.split_indices(len(x), 0)
    f_tr, f_te = clf.features(x[tr]), clf.features(x[te])
    noise = np.clip(np.random.default_rng(0).normal(size=(len(te), SIZE, SIZE, 1)), -1, 1).astype(np.float32)
    f_noise = clf.features(noise)
    fid_real = M.fid_from_features(f_tr, f_te)
    fid_noise = M.fid_from_features(f_tr, f_noise)
    assert fid_noise > 20 * fid_real
    is_mean, _ = M.inception_score(clf.probs(x), splits=5)
    assert 8.5 < is_mean <= 10.0
    p, r = M.precision_recall(f_tr, f_te)
    assert p > 0.8 and r > 0.8
    p, r = M.precision_recall(f_tr, f_noise)
    assert p < 0.1 and r < 0.1
