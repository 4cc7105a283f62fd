"""Tests for bdm_jax.data. Needs tensorflow-datasets (NOT TensorFlow): tfds sources are tested with
`tfds.testing.mock_data(policy=USE_CODE)` and with a tiny ArrayRecord dataset prepared here TF-free."""

import gc
import logging
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from bdm_jax import data as bdata

tfds.disable_progress_bar()


def cfg(**kw):
    base = dict(name="digits", image_size=16, channels=3, random_flip=False, data_dir=None, num_classes=0, size=0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


# ------------------------------------------------------------------------------------------ general
def test_import_does_not_pull_tfds_or_jax():
    code = "import sys, bdm_jax.data; print(sorted(m for m in ('tensorflow_datasets','tensorflow','jax','sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_unknown_name_error_names_field():
    with pytest.raises(ValueError, match=r"data\.name='foo'.*allowed") as e:
        bdata.create_source(cfg(name="foo"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_bad_split_error(name):
    with pytest.raises(ValueError, match=r"split='nope'.*data\.name=.*available") as e:
        bdata.create_source(cfg(name=name, size=4), split="nope")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- digits
def test_digits_shapes_range_determinism():
    src = bdata.create_source(cfg(image_size=16, channels=3, num_classes=10))
    assert len(src) == 1797 and isinstance(src, bdata.Source)
    ex = src[5]
    assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.float32
    assert ex["label"].dtype == np.int32 and ex["label"].shape == ()
    np.testing.assert_array_equal(ex["image"][..., 0], ex["image"][..., 2])  # gray repeated
    b = bdata.get_batch(src, 3, global_batch_size=32, seed=1, random_flip=False)
    assert b["image"].shape == (32, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (32,) and b["label"].dtype == np.int32
    assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0 and b["image"].min() < -0.99 and b["image"].max() > 0.5
    assert set(np.unique(b["label"])) <= set(range(10)) and len(np.unique(b["label"])) > 3
    again = bdata.create_source(cfg(image_size=16, channels=3, num_classes=10))
    b2 = bdata.get_batch(again, 3, global_batch_size=32, seed=1, random_flip=False)
    np.testing.assert_array_equal(b["image"], b2["image"])
    np.testing.assert_array_equal(b["label"], b2["label"])


def test_digits_native_size_values_and_unconditional_labels():
    from sklearn.datasets import load_digits

    src = bdata.create_source(cfg(image_size=8, channels=1, num_classes=0))
    raw = load_digits().images[7].astype(np.float32)
    np.testing.assert_allclose(src[7]["image"][..., 0], raw / 16.0 * 2.0 - 1.0, atol=1e-6)
    assert int(src[7]["label"]) == 0
    with pytest.raises(ValueError, match=r"data\.num_classes=3"):
        bdata.create_source(cfg(num_classes=3))


def test_synthetic_source():
    src = bdata.create_source(cfg(name="synthetic", size=50, image_size=24, channels=3, num_classes=4))
    assert len(src) == 50
    a, b = src[7], src[7]
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["image"].shape == (24, 24, 3) and a["image"].dtype == np.float32
    assert -1.0 <= a["image"].min() and a["image"].max() <= 1.0 and a["image"].std() > 0.05
    assert not np.array_equal(src[7]["image"], src[8]["image"])
    assert 0 <= int(a["label"]) < 4
    with pytest.raises(ValueError, match=r"data\.size"):
        bdata.create_source(cfg(name="synthetic", size=0))


# -------------------------------------------------------------------------------------- batch_indices
@pytest.mark.parametrize("n,b", [(10, 5), (10, 3), (7, 16)])
def test_batch_indices_are_epoch_permutations(n, b):
    steps = 3 * n  # covers >= 3 epochs
    stream = np.concatenate([bdata.batch_indices(s, b, n, seed=4) for s in range(steps)])
    for e in range(len(stream) // n):
        epoch = stream[e * n : (e + 1) * n]
        assert sorted(epoch.tolist()) == list(range(n)), (e, epoch)
        np.testing.assert_array_equal(epoch, np.random.default_rng([4, e]).permutation(n))


def test_batch_indices_pure_and_seeded():
    a = bdata.batch_indices(123, 64, 1000, seed=7)
    assert a.dtype == np.int64 and a.shape == (64,)
    bdata.batch_indices(5, 64, 1000, seed=7)  # other calls in between change nothing
    np.testing.assert_array_equal(a, bdata.batch_indices(123, 64, 1000, seed=7))
    assert not np.array_equal(a, bdata.batch_indices(123, 64, 1000, seed=8))
    assert not np.array_equal(a, bdata.batch_indices(124, 64, 1000, seed=7))
    with pytest.raises(ValueError):
        bdata.batch_indices(0, 0, 10, 0)
    with pytest.raises(ValueError):
        bdata.batch_indices(0, 4, 0, 0)


# ---------------------------------------------------------------------------------- host slicing/flip
@pytest.fixture(scope="module")
def digits16():
    return bdata.create_source(cfg(image_size=16, channels=3, num_classes=10))


def test_get_batch_host_slices(digits16):
    kw = dict(global_batch_size=12, seed=3, random_flip=True)
    full = bdata.get_batch(digits16, 9, **kw)
    parts = [bdata.get_batch(digits16, 9, process_index=i, process_count=2, **kw) for i in range(2)]
    assert parts[0]["image"].shape == (6, 16, 16, 3)
    for k in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    idx = bdata.batch_indices(9, 12, len(digits16), 3)
    s0, s1 = bdata.host_slice(12, 0, 2), bdata.host_slice(12, 1, 2)
    assert set(idx[s0]).isdisjoint(idx[s1])  # batch lies inside one epoch here: distinct examples
    with pytest.raises(ValueError, match="multiple of process_count"):
        bdata.get_batch(digits16, 0, global_batch_size=7, seed=0, random_flip=False, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        bdata.get_batch(digits16, 0, global_batch_size=8, seed=0, random_flip=False, process_index=2, process_count=2)


def test_flip_deterministic_and_mirrors(digits16):
    kw = dict(global_batch_size=64, seed=11)
    plain = bdata.get_batch(digits16, 2, random_flip=False, **kw)["image"]
    f1 = bdata.get_batch(digits16, 2, random_flip=True, **kw)["image"]
    f2 = bdata.get_batch(digits16, 2, random_flip=True, **kw)["image"]
    np.testing.assert_array_equal(f1, f2)
    mask = bdata.flip_mask(11, 2, np.arange(64))
    assert 10 < mask.sum() < 54
    np.testing.assert_array_equal(f1[mask], plain[mask][:, :, ::-1])
    np.testing.assert_array_equal(f1[~mask], plain[~mask])
    assert not np.array_equal(mask, bdata.flip_mask(11, 3, np.arange(64)))
    assert not np.array_equal(mask, bdata.flip_mask(12, 2, np.arange(64)))


# ----------------------------------------------------------------------------------------- Prefetcher
def test_prefetcher_matches_direct_calls(digits16):
    kw = dict(global_batch_size=8, seed=5, random_flip=True, process_index=1, process_count=2)
    with bdata.Prefetcher(digits16, 4, 10, buffer_size=2, **kw) as pf:
        got = list(pf)
        assert pf.next_step == 10
    assert len(got) == 6
    for k, b in enumerate(got):
        ref = bdata.get_batch(digits16, 4 + k, **kw)
        np.testing.assert_array_equal(b["image"], ref["image"])
        np.testing.assert_array_equal(b["label"], ref["label"])


class _Failing:
    def __init__(self, inner, bad):
        self.inner, self.bad = inner, bad

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if i == self.bad:
            raise RuntimeError(f"cannot read example {i}")
        return self.inner[i]


def test_prefetcher_reraises_and_closes(digits16):
    bad = int(bdata.batch_indices(3, 4, len(digits16), 0)[0])
    pf = bdata.Prefetcher(_Failing(digits16, bad), 0, 100, global_batch_size=4, seed=0, random_flip=False)
    got = []
    with pytest.raises(RuntimeError, match=f"cannot read example {bad}"):
        for b in pf:
            got.append(b)
    assert len(got) == 3
    pf.close()
    # closing early (consumer stops) ends the thread promptly
    pf2 = bdata.Prefetcher(digits16, 0, 10_000, global_batch_size=4, seed=0, random_flip=False)
    next(pf2)
    pf2.close()
    assert not pf2._thread.is_alive()
    with pytest.raises(StopIteration):
        next(pf2)
    # an abandoned (never closed) Prefetcher is garbage-collected and its thread stops
    pf3 = bdata.Prefetcher(digits16, 0, 10_000, global_batch_size=4, seed=0, random_flip=False)
    next(pf3)
    thread = pf3._thread
    del pf3
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


# --------------------------------------------------------------------------------------------- folder
def _write_images(root, spec):
    rng = np.random.default_rng(0)
    for rel, (h, w) in spec.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(path)


def test_folder_source_with_corrupt_file(tmp_path, caplog):
    root = str(tmp_path / "imgs")
    _write_images(root, {"cat/a.png": (20, 30), "cat/b.jpg": (40, 40), "dog/c.png": (30, 20), "dog/sub/d.png": (16, 16)})
    with open(os.path.join(root, "dog", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nthis is not a png")
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("ignored")
    with caplog.at_level(logging.WARNING, logger="bdm_jax.data"):
        src = bdata.create_source(cfg(name="folder", data_dir=root, image_size=12, channels=3, num_classes=2))
    warnings = [r for r in caplog.records if "could not be decoded" in r.getMessage()]
    assert len(warnings) == 1 and "skipping 1 of 5" in warnings[0].getMessage() and "broken.png" in warnings[0].getMessage()
    assert len(src) == 4 and src.class_names == ["cat", "dog"]
    assert [int(src[i]["label"]) for i in range(4)] == [0, 0, 1, 1]
    b = bdata.get_batch(src, 0, global_batch_size=4, seed=0, random_flip=True)
    assert b["image"].shape == (4, 12, 12, 3) and b["image"].dtype == np.float32
    assert -1.0 <= b["image"].min() < -0.5 and 0.5 < b["image"].max() <= 1.0
    gray = bdata.create_source(cfg(name="folder", data_dir=root, image_size=8, channels=1))
    assert gray[0]["image"].shape == (8, 8, 1) and int(gray[0]["label"]) == 0
    refs = bdata.load_reference_images(cfg(name="folder", data_dir=root, image_size=12, channels=3), n=3)
    assert refs.shape == (3, 12, 12, 3) and refs.dtype == np.uint8
    with pytest.raises(ValueError, match=r"data\.num_classes=3.*2 class"):
        bdata.create_source(cfg(name="folder", data_dir=root, image_size=12, num_classes=3))


def test_folder_center_crop(tmp_path):
    root = str(tmp_path / "crop")
    os.makedirs(root)
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, 10:20] = 255  # the central square is white, the sides black
    Image.fromarray(arr).save(os.path.join(root, "x.png"))
    img = bdata.create_source(cfg(name="folder", data_dir=root, image_size=10, channels=3))[0]["image"]
    np.testing.assert_array_equal(img, np.ones((10, 10, 3), np.float32))


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"data\.data_dir=.*no readable images") as e:
        bdata.create_source(cfg(name="folder", data_dir=str(empty)))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"data\.data_dir"):
        bdata.create_source(cfg(name="folder", data_dir=None))
    with pytest.raises(ValueError, match=r"data\.data_dir=.*not a directory"):
        bdata.create_source(cfg(name="folder", data_dir=str(tmp_path / "missing")))
    _write_images(str(empty), {"a.png": (8, 8)})
    with pytest.raises(ValueError, match=r"split='test'.*folder"):
        bdata.create_source(cfg(name="folder", data_dir=str(empty)), split="test")


# ----------------------------------------------------------------------------------------------- tfds
def _mock(n):
    return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.mark.parametrize(
    "name,size,classes",
    [("tfds:cifar10", 32, 10), ("tfds:lsun/bedroom", 16, 0), ("tfds:imagenet2012", 16, 1000)],
)
def test_tfds_mock_sources(name, size, classes):
    c = cfg(name=name, image_size=size, channels=3, num_classes=classes, data_dir=None)
    kw = dict(global_batch_size=8, seed=2, random_flip=True)
    with _mock(24):
        src = bdata.create_source(c)
        assert len(src) == 24
        full = bdata.get_batch(src, 1, **kw)
        again = bdata.get_batch(bdata.create_source(c), 1, **kw)
        parts = [bdata.get_batch(src, 1, process_index=i, process_count=2, **kw) for i in range(2)]
        info = bdata.dataset_info(c)
    assert full["image"].shape == (8, size, size, 3) and full["image"].dtype == np.float32
    assert full["label"].shape == (8,) and full["label"].dtype == np.int32
    assert -1.0 <= full["image"].min() < -0.9 and 0.9 < full["image"].max() <= 1.0
    if classes:
        assert full["label"].max() < classes and len(set(full["label"].tolist())) > 1
    else:
        assert not full["label"].any()
    for k in ("image", "label"):
        np.testing.assert_array_equal(full[k], again[k])  # deterministic given the seed
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    idx = bdata.batch_indices(1, 8, 24, 2)
    assert set(idx[bdata.host_slice(8, 0, 2)]).isdisjoint(idx[bdata.host_slice(8, 1, 2)])
    assert info == {"image_size": size, "channels": 3, "num_classes": classes, "num_examples": 24}
    assert "tensorflow" not in sys.modules  # read path is TF-free


def test_tfds_label_mismatch_and_unknown_name():
    with _mock(4):
        with pytest.raises(ValueError, match=r"data\.num_classes=7 but data\.name='tfds:cifar10' has 10"):
            bdata.create_source(cfg(name="tfds:cifar10", image_size=32, num_classes=7))
        with pytest.raises(ValueError, match=r"data\.num_classes=10 but .*no 'label'"):
            bdata.create_source(cfg(name="tfds:lsun/church_outdoor", image_size=32, num_classes=10))
    with pytest.raises(ValueError, match=r"data\.name='tfds:no_such_dataset_xyz'.*no dataset") as e:
        bdata.create_source(cfg(name="tfds:no_such_dataset_xyz"))
    assert "\n" not in str(e.value)


class BdmTestTinyImages(tfds.core.GeneratorBasedBuilder):
    """A tiny real ArrayRecord dataset; PIL images so that preparing it needs no TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=3)}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(10), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
        rng = np.random.default_rng(n)
        for i in range(n):
            img = rng.integers(0, 256, (12 + i, 9, 3), dtype=np.uint8)
            yield i, {"image": Image.fromarray(img), "label": i % 3}


def test_tfds_real_prepared_array_record(tmp_path):
    data_dir = str(tmp_path / "tfds")
    BdmTestTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    c = cfg(name="tfds:bdm_test_tiny_images", data_dir=data_dir, image_size=8, channels=3, num_classes=3)
    src = bdata.create_source(c)
    assert len(src) == 10 and len(bdata.create_source(c, split="test")) == 4
    assert len(bdata.create_source(c, split="train[:6]")) == 6
    assert sorted(int(src[i]["label"]) for i in range(10)) == [0] * 4 + [1] * 3 + [2] * 3  # tfds shuffles order
    b = bdata.get_batch(src, 0, global_batch_size=10, seed=0, random_flip=False)
    assert b["image"].shape == (10, 8, 8, 3) and -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    refs = bdata.load_reference_images(c, n=None, split="test")
    assert refs.shape == (4, 8, 8, 3) and refs.dtype == np.uint8
    np.testing.assert_array_equal(refs, bdata.load_reference_images(c, split="test"))
    with pytest.raises(ValueError, match=r"split='validation' does not exist.*available: \['test', 'train'\]") as e:
        bdata.create_source(c, split="validation")
    assert "\n" not in str(e.value)
    assert "tensorflow" not in sys.modules


def test_tfds_not_prepared_error(tmp_path):
    c = cfg(name="tfds:cifar10", data_dir=str(tmp_path / "nothing_here"), image_size=32)
    with pytest.raises(ValueError, match=r"data\.name='tfds:cifar10' is not prepared.*tfds build cifar10") as e:
        bdata.create_source(c)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- reference images
def test_load_reference_images_and_info():
    c = cfg(image_size=8, channels=1, num_classes=10)
    refs = bdata.load_reference_images(c, n=100)
    assert refs.shape == (100, 8, 8, 1) and refs.dtype == np.uint8
    np.testing.assert_array_equal(refs, bdata.load_reference_images(c, n=100))
    assert refs.max() == 255 and refs.min() == 0
    assert bdata.load_reference_images(c, n=5000).shape[0] == 1797
    assert bdata.dataset_info(c) == {"image_size": 8, "channels": 1, "num_classes": 10, "num_examples": 1797}
