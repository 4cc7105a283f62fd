"""Evaluation at scale (bdm_jax.evaluation): sample checks, sharded resumable sampling, cached reference
statistics, metrics, weight size, reporting, and evaluate_workdir end to end on a tiny checkpoint.

~35 CPU-seconds (60 s wall on the shared 2 cores); most of it is sampler compilation and the
2-device subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from bdm_jax import evaluation as E
from bdm_jax.data import load_reference_images
from bdm_jax.layers import LayerSpec, QuantPlan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digits_cfg(size=8):
    return ml_collections.ConfigDict({"name": "digits", "image_size": size, "channels": 1, "num_classes": 0,
                                      "random_flip": False, "data_dir": "", "size": 16})


class FakeExtractor:
    """Deterministic features of uint8 images (a fixed random projection), counting its calls."""

    name = "fake"

    def __init__(self, dim=16, tag="v1"):
        self.w = np.random.default_rng(0).standard_normal((64, dim)).astype(np.float32)
        self.dim, self.tag, self.calls = dim, tag, 0
        self.feature_dim = dim

    def outputs(self, x):
        self.calls += 1
        f = (np.asarray(x, np.float32).reshape(len(x), -1)[:, :64] / 255.0) @ self.w
        e = np.exp(f[:, :10] - f[:, :10].max(1, keepdims=True))
        return {"features": f, "probs": e / e.sum(1, keepdims=True), "spatial": f.reshape(len(x), 1, 1, self.dim)}

    def metadata(self):
        return {"extractor": self.name, "tag": self.tag}


# --------------------------------------------------------------------------------------------------
def test_check_samples_errors():
    ok = np.zeros((3, 8, 8, 1), np.uint8)
    assert E.check_samples(ok, 8, 1) is ok
    assert E.check_samples(ok.astype(np.int64), 8, 1).dtype == np.uint8
    with pytest.raises(ValueError, match=r"shape \(N, 8, 8, 1\).*got shape \(3, 8, 8, 3\)"):
        E.check_samples(np.zeros((3, 8, 8, 3), np.uint8), 8, 1)
    with pytest.raises(ValueError, match=r"got float32 values in \[-1, 1\].*images.to_uint8"):
        E.check_samples(np.linspace(-1, 1, 192, dtype=np.float32).reshape(3, 8, 8, 1), 8, 1)
    bad = np.zeros((3, 8, 8, 1), np.int32)
    bad[0, 0, 0, 0] = -5
    with pytest.raises(ValueError, match=r"integer values in \[-5, 0\]"):
        E.check_samples(bad, 8, 1)
    with pytest.raises(ValueError, match="got no images"):
        E.check_samples(np.zeros((0, 8, 8, 1), np.uint8), 8, 1)


def test_weight_bytes_counts_spec9():
    params = {"a": {"kernel": np.zeros((3, 3, 4, 8)), "bias": np.zeros(8), "scales": np.zeros((2, 8))},
              "b": {"kernel": np.zeros((8, 16)), "bias": np.zeros(16), "act_step": np.zeros(())},
              "fp": {"kernel": np.zeros((16, 4)), "bias": np.zeros(4)},
              "norm": {"scale": np.zeros(8), "bias": np.zeros(8)}}
    plan = QuantPlan.from_dict({"a": LayerSpec(2, 32), "b": LayerSpec(1, 8)})
    bits = 2 * 288 + 32 * 8 + 32 * 16 + 1 * 128 + 32 * 16 + 32 * 1 + 32 * (64 + 4) + 32 * 16
    got = E.weight_bytes(params, plan)
    assert got["bytes"] == (bits + 7) // 8
    assert got["fp32_bytes"] == 4 * (288 + 8 + 128 + 16 + 64 + 4 + 16)  # no scales / LSQ steps in an FP model
    assert got["binarized_weights"] == 288 + 128
    # progressive mask 0 = still FP; EBB's extra_bases 0 = one basis
    masks = {"a": {"binarize": np.float32(1), "extra_bases": np.float32(0)}, "b": {"binarize": np.float32(0)}}
    got = E.weight_bytes(params, plan, masks)
    assert got["bytes"] * 8 == bits - 288 + (32 * 128 - 128)
    assert E.weight_bytes(params)["bytes"] == E.weight_bytes(params)["fp32_bytes"] + 4 * (16 + 1)


def test_compare_table_and_side_by_side(tmp_path):
    rows = [{"name": "FP teacher", "fid": 1.234, "sfid": 2.0, "is": 9.5, "precision": 0.81, "recall": 0.7,
             "weight_bytes": 4 * 2**20, "fp32_weight_bytes": 4 * 2**20},
            {"name": "BinaryDM W1A4", "fid": 10.0, "weight_bytes": 2**19, "fp32_weight_bytes": 4 * 2**20}]
    t = E.compare_table(rows).splitlines()
    assert len(t) == 4 and t[0].startswith("| model") and set(t[1]) <= {"|", "-"}
    assert "| 1.23 " in t[2] and "4.00 MB" in t[2] and "smaller" not in t[2]
    assert "| - " in t[3] and "512.00 KB (8.0x smaller)" in t[3]
    assert len({len(line) for line in t}) == 1  # aligned columns
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (30, 20), "red").save(a)
    Image.new("L", (40, 50), 0).save(b)
    out = E.side_by_side(str(a), str(b), str(tmp_path / "ab.png"))
    im = np.asarray(Image.open(out))
    assert im.shape[1] == 30 + 40 + 3 * 16 and im.shape[0] >= 50
    assert (im[..., 0] == 255).all(axis=0).any()  # white gap columns exist
    with pytest.raises(ValueError, match="does not exist"):
        E.side_by_side(str(a), str(tmp_path / "missing.png"), str(tmp_path / "x.png"))


def test_reference_stats_cache_and_checks(tmp_path):
    cfg, ext = digits_cfg(), FakeExtractor()
    ref = E.reference_stats(cfg, ext, str(tmp_path), progress=False)
    path = tmp_path / "ref_stats_digits_8.npz"
    assert path.is_file() and ref.metadata["num_images"] == 1797 and ref.pr_features.shape == (1797, 16)
    calls = ext.calls
    again = E.reference_stats(cfg, ext, str(tmp_path), progress=False)  # cached: no feature extraction
    assert ext.calls == calls
    np.testing.assert_array_equal(again.sigma, ref.sigma)
    # stats equal a direct computation on the same images
    feats = ext.outputs(load_reference_images(cfg))["features"]
    np.testing.assert_allclose(ref.mu, feats.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.sigma, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-6)
    # another extractor version: recomputed, not silently reused
    ext2 = FakeExtractor(tag="v2")
    E.reference_stats(cfg, ext2, str(tmp_path), progress=False)
    assert ext2.calls > 0 and ReferenceMeta(path)["tag"] == "v2"
    # explicit file of another resolution / dataset: a clear error
    with pytest.raises(ValueError, match=r"dataset='digits' at 8px x1, but the samples are dataset='digits' at 16px"):
        E.reference_stats(digits_cfg(16), ext2, str(tmp_path), path=str(path))
    other = ml_collections.ConfigDict(dict(digits_cfg().to_dict(), name="synthetic"))
    with pytest.raises(ValueError, match="dataset='digits'.*dataset='synthetic'"):
        E.reference_stats(other, ext2, str(tmp_path), path=str(path))
    with pytest.raises(ValueError, match="computed with tag='v2', this evaluation needs 'v1'"):
        E.reference_stats(cfg, FakeExtractor(tag="v1"), str(tmp_path), path=str(path))
    with pytest.raises(ValueError, match="does not exist"):
        E.reference_stats(cfg, ext2, str(tmp_path), path=str(tmp_path / "nope.npz"))


def ReferenceMeta(path):
    return E.ReferenceStats.load(str(path)).metadata


def test_compute_metrics_real_vs_noise(tmp_path):
    cfg, ext = digits_cfg(), FakeExtractor()
    ref = E.reference_stats(cfg, ext, str(tmp_path), progress=False)
    real = load_reference_images(cfg)
    m = E.compute_metrics(real, ref, ext, 8, 1)
    assert m["fid"] < 1e-6 and m["sfid"] < 1e-6 and m["precision"] == 1.0 and m["recall"] == 1.0
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    m2 = E.compute_metrics(noise, ref, ext, 8, 1)
    assert m2["fid"] > 10 and m2["precision"] < 0.1
    with pytest.raises(ValueError, match="at least as many samples as feature dims: got 10 samples for 16-d"):
        E.compute_metrics(real[:10], ref, ext, 8, 1)
    with pytest.raises(ValueError, match="float32 values"):
        E.compute_metrics(real.astype(np.float32), ref, ext, 8, 1)


def test_missing_inception_weights_error(monkeypatch):
    from bdm_jax.inception import FID_WEIGHTS_URL, MissingWeightsError

    monkeypatch.delenv("BDM_INCEPTION_WEIGHTS", raising=False)
    cfg = ml_collections.ConfigDict(dict(digits_cfg().to_dict(), name="tfds:cifar10", image_size=32, channels=3))
    with pytest.raises(MissingWeightsError, match=FID_WEIGHTS_URL):
        E.get_extractor(cfg, inception_weights="/no/such/file.pth")


# --------------------------------------------------------------------------------------------------
# sampling and a workdir end to end (tiny config)
# --------------------------------------------------------------------------------------------------
def tiny_config(method="fp"):
    from configs import tiny

    cfg = tiny.get_config()
    cfg.method = method
    cfg.sample.steps = 3
    return cfg


def random_params(setup, seed=1):
    """Random weights for the tiny UNet without running its (slow to compile) init."""
    shapes = jax.eval_shape(setup.model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes["params"])


@pytest.fixture(scope="module")
def tiny_setup():
    from bdm_jax.config import validate
    from bdm_jax.trainer import Setup

    setup = Setup.from_config(validate(tiny_config()))
    return setup, random_params(setup)


def test_sample_to_shards_resumes_and_matches_generate(tiny_setup, tmp_path):
    from bdm_jax.trainer import generate

    setup, params = tiny_setup
    out = str(tmp_path / "s")
    path = E.sample_to_shards(setup, params, {}, out, num=10, batch_size=4, seed=3, progress=False)
    imgs = E.load_samples(path)
    assert path.endswith("samples_10.npz") and imgs.shape == (10, 8, 8, 1) and imgs.dtype == np.uint8
    shards = sorted(f for f in os.listdir(os.path.join(out, "shards")) if f.startswith("shard_"))
    assert shards == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    np.testing.assert_array_equal(imgs, generate(setup, params, {}, 10, 4, 3))
    # resume: only the missing shard is drawn again, and the result is the same
    first = os.path.join(out, "shards", shards[0])
    t0 = os.stat(first).st_mtime_ns
    os.remove(os.path.join(out, "shards", shards[1]))
    os.remove(path)
    again = E.load_samples(E.sample_to_shards(setup, params, {}, out, num=10, batch_size=4, seed=3, progress=False))
    np.testing.assert_array_equal(again, imgs)
    assert os.stat(first).st_mtime_ns == t0
    # more samples reuse the shards made so far
    more = E.load_samples(E.sample_to_shards(setup, params, {}, out, num=14, batch_size=4, seed=3, progress=False))
    np.testing.assert_array_equal(more[:10], imgs)
    with pytest.raises(ValueError, match="made with seed=3, this run has seed=4"):
        E.sample_to_shards(setup, params, {}, out, num=10, batch_size=4, seed=4, progress=False)
    with pytest.raises(ValueError, match="num=0 must be a positive integer"):
        E.sample_to_shards(setup, params, {}, out, num=0, batch_size=4, progress=False)


def test_sample_to_shards_over_two_devices_equals_one(tiny_setup, tmp_path):
    """The same shards come out of 2 (fake CPU) devices as out of one: shard i depends on i only."""
    setup, params = tiny_setup
    one = E.load_samples(E.sample_to_shards(setup, params, {}, str(tmp_path / "one"), 10, 4, seed=5, progress=False))
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp
        assert len(jax.local_devices()) == 2, jax.local_devices()
        from bdm_jax import evaluation as E
        from bdm_jax.config import validate
        from bdm_jax.trainer import Setup
        from test_evaluation import random_params, tiny_config
        setup = Setup.from_config(validate(tiny_config()))
        params = random_params(setup)
        E.sample_to_shards(setup, params, {{}}, {str(tmp_path / 'two')!r}, 10, 4, seed=5, progress=False)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = E.load_samples(str(tmp_path / "two" / "samples_10.npz"))
    np.testing.assert_array_equal(two, one)


def test_evaluate_workdir_end_to_end(tiny_setup, tmp_path):
    """A workdir holding one checkpoint (random weights; training is tested elsewhere) -> metrics.json."""
    from bdm_jax import checkpoint as ckpt_lib
    from bdm_jax.train_state import TrainState

    setup, params = tiny_setup
    wd = str(tmp_path / "run")
    mngr = ckpt_lib.manager(wd)
    state = TrainState(step=np.int32(1), params=params, ema_params=params, opt_state={},
                       rng=jax.random.key_data(jax.random.key(0)))
    ckpt_lib.save(mngr, 1, state, setup.cfg)
    mngr.wait_until_finished()
    cache = str(tmp_path / "cache")
    m = E.evaluate_workdir(wd, num_samples=64, batch_size=32, cache_dir=cache, progress=False)
    with open(os.path.join(wd, "eval", "metrics.json")) as f:
        saved = json.load(f)
    for k in ("fid", "sfid", "is", "precision", "recall"):
        assert np.isfinite(saved[k]) and saved[k] == pytest.approx(m[k])
    assert saved["num_samples"] == 64 and saved["num_reference"] == 1797 and saved["method"] == "fp"
    assert saved["feature_extractor"]["extractor"] == "digits_classifier"
    assert saved["weight_bytes"] == saved["fp32_weight_bytes"] and saved["compression"] == 1.0
    assert 1.0 <= saved["is"] <= 10.0 and os.path.isfile(saved["grid"])
    assert os.path.isfile(os.path.join(cache, "ref_stats_digits_8.npz"))
    assert E.load_samples(saved["samples_npz"]).shape == (64, 8, 8, 1)
    # fewer samples than the 64-d classifier features: refused before any sampling
    with pytest.raises(ValueError, match="got 32 samples for 64-d features"):
        E.evaluate_workdir(wd, num_samples=32, batch_size=32, cache_dir=cache, progress=False)
