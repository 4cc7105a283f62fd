"""Dataset sources (random access) and the `create_source` factory.

`data.name` selects the source:

* ``digits``     - scikit-learn's 1,797 8x8 handwritten digits (ship inside scikit-learn; no download),
                   bilinearly resized to `image_size`; labels 0..9. For smoke tests and tiny runs.
* ``synthetic``  - `data.size` random Gaussian-blob images from a fixed seed, made on the fly (benchmarks).
* ``folder``     - every PNG/JPEG/WebP/BMP under `data.data_dir` (recursive), center-cropped to a square
                   and bicubic-resized. With `num_classes > 0` the label is the index of the top-level
                   sub-folder in sorted order. `split="train"` reads `data_dir/train/` if it exists, else
                   the whole folder; any other split reads `data_dir/<split>/`. Undecodable files are
                   found when the source is created and skipped with one warning.
* ``tfds:<name>`` - a TensorFlow-Datasets dataset read with `tfds.data_source` (see `tfds_source`).

Every example is {"image": float32 [H, W, C] in [-1, 1], "label": int32 scalar}; unconditional configs
(`num_classes == 0`) always give label 0.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from bdm_jax.data.pipeline import Source

log = logging.getLogger("bdm_jax.data")

_MISSING = object()
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_PREFIXES = ("digits", "synthetic", "folder", "tfds:<name>")


# --------------------------------------------------------------------------------------------- config
def cfg_get(cfg: Any, name: str, default: Any = _MISSING) -> Any:
    """Reads `data.<name>` from a ConfigDict / dict / attribute object; a missing required field is a
    one-line ValueError naming it."""
    if isinstance(cfg, Mapping):
        value = cfg.get(name, _MISSING)
    else:
        value = getattr(cfg, name, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise ValueError(f"data.{name} is required but missing from the data config")
        return default
    return value


def _positive_int(cfg: Any, name: str) -> int:
    value = cfg_get(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"data.{name}={value!r} must be a positive integer")
    return int(value)


def _num_classes(cfg: Any) -> int:
    value = cfg_get(cfg, "num_classes", 0) or 0
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"data.num_classes={value!r} must be an integer >= 0 (0 = unconditional)")
    return int(value)


def _image_channels(cfg: Any) -> int:
    channels = _positive_int(cfg, "channels")
    if channels not in (1, 3):
        raise ValueError(f"data.channels={channels} must be 1 (grayscale) or 3 (RGB) for data.name={cfg_get(cfg, 'name')!r}")
    return channels


def _bad_split(cfg: Any, split: str, available: Sequence[str]) -> ValueError:
    return ValueError(
        f"split={split!r} does not exist for data.name={cfg_get(cfg, 'name')!r}; available: {sorted(available)}"
    )


# ---------------------------------------------------------------------------------------- transforms
def to_uint8_image(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """PIL image -> uint8 [image_size, image_size, channels]: convert to L/RGB, center-crop to a square,
    bicubic resize (PIL's resize is anti-aliased when shrinking)."""
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    s = min(w, h)
    if w != h:
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if s != image_size:
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def array_to_pil(arr: np.ndarray) -> Image.Image:
    """uint8 [H,W], [H,W,1], [H,W,3] or [H,W,4] array -> PIL image."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr)


def uint8_to_float(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def float_to_uint8(arr: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((np.asarray(arr, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ thread helpers
_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def num_io_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """`[fn(x) for x in items]` on a shared thread pool (PIL decoding releases the GIL)."""
    global _POOL
    if len(items) < 4 or num_io_threads() == 1:
        return [fn(x) for x in items]
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(num_io_threads(), thread_name_prefix="bdm-data-io")
    return list(_POOL.map(fn, items))


# ------------------------------------------------------------------------------------- base classes
class ArraySource:
    """A source held in memory as float32 images [N,H,W,C] in [-1,1] and int32 labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self._images = images
        self._labels = labels

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        return {"image": self._images[index].copy(), "label": np.int32(self._labels[index])}

    def get_examples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        return {"image": self._images[indices], "label": self._labels[indices].astype(np.int32)}

    def get_uint8_images(self, indices: np.ndarray) -> np.ndarray:
        return float_to_uint8(self._images[np.asarray(indices, np.int64)])


class DecodedSource:
    """Base for sources that decode one uint8 image per example (`_uint8(i)`) and know its label."""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _uint8(self, index: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _label(self, index: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _example_uint8(self, index: int) -> tuple[np.ndarray, int]:
        return self._uint8(index), self._label(index)

    def _check_index(self, index: int) -> int:
        index = int(index)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a source of {n} examples")
        return index % n

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        img, label = self._example_uint8(self._check_index(index))
        return {"image": uint8_to_float(img), "label": np.int32(label)}

    def get_examples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        pairs = parallel_map(self._example_uint8, [self._check_index(i) for i in indices])
        return {
            "image": uint8_to_float(np.stack([p[0] for p in pairs])),
            "label": np.asarray([p[1] for p in pairs], np.int32),
        }

    def get_uint8_images(self, indices: np.ndarray) -> np.ndarray:
        return np.stack(parallel_map(self._uint8, [self._check_index(i) for i in indices]))


# ------------------------------------------------------------------------------------------- digits
@functools.lru_cache(maxsize=8)
def _digits_arrays(image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships its data inside scikit-learn

    digits = load_digits()
    raw = (digits.images.astype(np.float32) / 16.0).clip(0.0, 1.0)  # [1797, 8, 8] in [0, 1]
    if image_size != raw.shape[1]:
        raw = np.stack(
            [
                np.asarray(Image.fromarray(im, mode="F").resize((image_size, image_size), Image.Resampling.BILINEAR))
                for im in raw
            ]
        )
    images = (raw * 2.0 - 1.0).clip(-1.0, 1.0).astype(np.float32)[..., None]
    if channels > 1:
        images = np.repeat(images, channels, axis=-1)
    images.flags.writeable = False
    labels = digits.target.astype(np.int32)
    labels.flags.writeable = False
    return images, labels


class DigitsSource(ArraySource):
    """sklearn's 1,797 handwritten 8x8 digits, resized (bilinear) to image_size; labels 0..9."""

    NUM_CLASSES = 10

    def __init__(self, cfg: Any, split: str = "train"):
        if split != "train":
            raise _bad_split(cfg, split, ["train"])
        image_size = _positive_int(cfg, "image_size")
        channels = _positive_int(cfg, "channels")
        num_classes = _num_classes(cfg)
        if num_classes not in (0, self.NUM_CLASSES):
            raise ValueError(f"data.num_classes={num_classes} must be 0 or 10 for data.name='digits'")
        images, labels = _digits_arrays(image_size, channels)
        if num_classes == 0:
            labels = np.zeros_like(labels)
        super().__init__(images, labels)


# ---------------------------------------------------------------------------------------- synthetic
class SyntheticSource:
    """`data.size` images of 1-3 coloured Gaussian blobs on a dark background, each generated on demand
    from `default_rng([seed, index])` (deterministic, O(image) work per example, nothing stored)."""

    SEED = 20240527

    def __init__(self, cfg: Any, split: str = "train"):
        splits = {"train": 0, "test": 1}
        if split not in splits:
            raise _bad_split(cfg, split, list(splits))
        size = cfg_get(cfg, "size", None)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
            raise ValueError(f"data.size={size!r} must be a positive integer (number of examples) for data.name='synthetic'")
        self._n = int(size)
        self._split_id = splits[split]
        self._size = _positive_int(cfg, "image_size")
        self._channels = _positive_int(cfg, "channels")
        self._num_classes = _num_classes(cfg)
        self._grid = (np.arange(self._size, dtype=np.float32) + 0.5) / self._size

    def __len__(self) -> int:
        return self._n

    def _make(self, index: int) -> tuple[np.ndarray, int]:
        index = int(index)
        if not 0 <= index < self._n:
            raise IndexError(f"index {index} out of range for a source of {self._n} examples")
        rng = np.random.default_rng([self.SEED, self._split_id, index])
        label = int(rng.integers(self._num_classes)) if self._num_classes else 0
        img = np.zeros((self._size, self._size, self._channels), np.float32)
        for _ in range(1 + (label % 3 if self._num_classes else int(rng.integers(3)))):
            cy, cx = rng.uniform(0.15, 0.85, size=2)
            sigma = rng.uniform(0.06, 0.2)
            color = rng.uniform(0.2, 2.0, size=self._channels).astype(np.float32)
            gy = np.exp(-((self._grid - cy) ** 2) / (2 * sigma**2))
            gx = np.exp(-((self._grid - cx) ** 2) / (2 * sigma**2))
            img += np.outer(gy, gx)[..., None] * color
        return np.clip(img - 1.0, -1.0, 1.0), label

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        img, label = self._make(index)
        return {"image": img, "label": np.int32(label)}

    def get_examples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        pairs = [self._make(i) for i in indices]
        return {"image": np.stack([p[0] for p in pairs]), "label": np.asarray([p[1] for p in pairs], np.int32)}

    def get_uint8_images(self, indices: np.ndarray) -> np.ndarray:
        return float_to_uint8(self.get_examples(indices)["image"])


# ------------------------------------------------------------------------------------------- folder
_SCAN_CACHE: dict[tuple, tuple[list[str], list[str]]] = {}
_SCAN_LOCK = threading.Lock()


def _check_image_file(path: str) -> str | None:
    """Fully decodes `path` (JPEGs in draft mode: fast, still catches truncation). None if fine."""
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (64, 64))
            img.load()
        return None
    except Exception as e:  # noqa: BLE001 - any decoder error means "skip this file"
        return f"{type(e).__name__}: {e}"


def _scan_folder(root: str) -> tuple[list[str], list[str]]:
    """(valid files, bad files), relative to root, sorted. Validation is memoised on the listing
    (path, size, mtime), so creating the same source twice does not decode everything twice."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for f in filenames:
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                files.append(os.path.relpath(os.path.join(dirpath, f), root))
    files.sort()
    stats = []
    for f in files:
        try:
            st = os.stat(os.path.join(root, f))
            stats.append((f, st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((f, -1, -1))
    key = (os.path.realpath(root), tuple(stats))
    with _SCAN_LOCK:
        if key in _SCAN_CACHE:
            return _SCAN_CACHE[key]
    errors = parallel_map(lambda f: _check_image_file(os.path.join(root, f)), files)
    good = [f for f, err in zip(files, errors) if err is None]
    bad = [f for f, err in zip(files, errors) if err is not None]
    if bad:
        log.warning(
            "data.data_dir=%r: skipping %d of %d image files that could not be decoded (first: %s)",
            root,
            len(bad),
            len(files),
            ", ".join(bad[:5]),
        )
    with _SCAN_LOCK:
        if len(_SCAN_CACHE) > 16:
            _SCAN_CACHE.clear()
        _SCAN_CACHE[key] = (good, bad)
    return good, bad


class FolderSource(DecodedSource):
    """Images under a directory (recursive); see the module docstring."""

    def __init__(self, cfg: Any, split: str = "train"):
        data_dir = cfg_get(cfg, "data_dir", None)
        if not data_dir:
            raise ValueError("data.data_dir must name the image folder for data.name='folder' (it is empty/None)")
        data_dir = os.path.expanduser(str(data_dir))
        if not os.path.isdir(data_dir):
            raise ValueError(f"data.data_dir={data_dir!r} is not a directory (data.name='folder' needs a folder of PNG/JPEG images)")
        root = os.path.join(data_dir, split)
        if not os.path.isdir(root):
            if split != "train":
                raise ValueError(
                    f"split={split!r} does not exist for data.name='folder': no sub-folder {root!r} "
                    "(split 'train' uses data_dir/train/ or else the whole data_dir)"
                )
            root = data_dir
        self.root = root
        self._size = _positive_int(cfg, "image_size")
        self._channels = _image_channels(cfg)
        num_classes = _num_classes(cfg)
        files, bad = _scan_folder(root)
        self.skipped_files = [os.path.join(root, f) for f in bad]
        if not files:
            extra = f" ({len(bad)} files could not be decoded)" if bad else ""
            raise ValueError(
                f"data.data_dir={data_dir!r} (split {split!r}) contains no readable images{extra}; "
                f"expected files ending in {', '.join(IMAGE_EXTENSIONS)} (searched recursively)"
            )
        self._files = [os.path.join(root, f) for f in files]
        if num_classes:
            tops = [f.split(os.sep)[0] if os.sep in f else None for f in files]
            if any(t is None for t in tops):
                raise ValueError(
                    f"data.num_classes={num_classes} but {root!r} has images outside class sub-folders; "
                    "put each class in its own sub-folder or set data.num_classes=0"
                )
            self.class_names = sorted(set(tops))
            if len(self.class_names) != num_classes:
                raise ValueError(
                    f"data.num_classes={num_classes} but {root!r} has {len(self.class_names)} class sub-folders "
                    f"({', '.join(self.class_names[:5])}{', ...' if len(self.class_names) > 5 else ''})"
                )
            lookup = {c: i for i, c in enumerate(self.class_names)}
            self._labels = np.asarray([lookup[t] for t in tops], np.int32)
        else:
            self.class_names = []
            self._labels = np.zeros(len(files), np.int32)
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self._files)

    def _label(self, index: int) -> int:
        return int(self._labels[index])

    def _decode(self, index: int) -> np.ndarray:
        with Image.open(self._files[index]) as img:
            return to_uint8_image(img, self._size, self._channels)

    def _uint8(self, index: int) -> np.ndarray:
        try:
            return self._decode(index)
        except Exception as e:  # noqa: BLE001 - a file changed after validation: never crash mid-run
            for k in range(1, len(self._files)):
                j = (index + k) % len(self._files)
                try:
                    img = self._decode(j)
                except Exception:  # noqa: BLE001
                    continue
                if self._files[index] not in self._warned:
                    self._warned.add(self._files[index])
                    log.warning("could not decode %s (%s); using %s instead", self._files[index], e, self._files[j])
                return img
            raise


# ------------------------------------------------------------------------------------------ factory
def create_source(data_config: Any, *, split: str = "train") -> Source:
    """The source named by `data_config.name` for `split` (see the module docstring)."""
    name = cfg_get(data_config, "name")
    if not isinstance(name, str):
        raise ValueError(f"data.name={name!r} must be a string; allowed: {', '.join(_PREFIXES)}")
    if name == "digits":
        return DigitsSource(data_config, split)
    if name == "synthetic":
        return SyntheticSource(data_config, split)
    if name == "folder":
        return FolderSource(data_config, split)
    if name.startswith("tfds:"):
        from bdm_jax.data.tfds_source import TfdsSource  # imports tensorflow_datasets only now

        return TfdsSource(data_config, split)
    raise ValueError(
        f"data.name={name!r} is not a known dataset; allowed: 'digits', 'synthetic', 'folder', or "
        "'tfds:<tfds name>' (e.g. 'tfds:cifar10', 'tfds:lsun/bedroom', 'tfds:imagenet2012')"
    )


def dataset_info(data_config: Any) -> dict[str, int]:
    """{image_size, channels, num_classes, num_examples} of the training split."""
    source = create_source(data_config, split="train")
    return {
        "image_size": _positive_int(data_config, "image_size"),
        "channels": _positive_int(data_config, "channels"),
        "num_classes": _num_classes(data_config),
        "num_examples": len(source),
    }


def reference_indices(num_examples: int, n: int | None) -> np.ndarray:
    """Which examples `load_reference_images` uses: all, or the first n of a fixed (seed 0) permutation,
    sorted for read locality. Deterministic, so FID reference statistics are reproducible."""
    if n is None or n >= num_examples:
        return np.arange(num_examples, dtype=np.int64)
    return np.sort(np.random.default_rng(0).permutation(num_examples)[:n])


def load_reference_images(data_config: Any, n: int | None = None, split: str = "train") -> np.ndarray:
    """uint8 [n, H, W, C] real images (no flips) for FID reference statistics; n=None means the whole split.
    Asking for more than the split holds gives the whole split (with a warning)."""
    source = create_source(data_config, split=split)
    total = len(source)
    if n is not None:
        if n <= 0:
            raise ValueError(f"n={n} must be positive")
        if n > total:
            log.warning("asked for %d reference images but %r split %r has %d; using all of them", n, cfg_get(data_config, "name"), split, total)
    idx = reference_indices(total, n)
    getter = getattr(source, "get_uint8_images", None)
    chunks = []
    for start in range(0, len(idx), 512):
        part = idx[start : start + 512]
        if getter is not None:
            chunks.append(np.asarray(getter(part), np.uint8))
        else:
            chunks.append(float_to_uint8(np.stack([source[int(i)]["image"] for i in part])))
    return np.concatenate(chunks, axis=0)
