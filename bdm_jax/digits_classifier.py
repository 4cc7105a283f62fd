"""A small CNN trained on scikit-learn's ``digits``: the feature extractor for small-scale evaluation.

The paper evaluates with Inception-v3 (ADM suite). For the embedded digits dataset bdm-jax uses this
classifier instead, in the same roles (see :mod:`bdm_jax.metrics`):

* ``Classifier.features``          -- 64-d penultimate activations (post-SiLU)  -> FID, precision/recall
* ``Classifier.probs``             -- softmax over the 10 digits                 -> Inception score
* ``Classifier.spatial_features``  -- NHWC map of the last conv (H/4 x W/4 x 64) -> sFID (first 7 channels)

Images everywhere are float NHWC in [-1, 1], produced by :func:`load_digits_images` (8x8 digits, values
0..16, scaled to [0, 1], resized with PIL bilinear, mapped to [-1, 1], gray channel repeated if C > 1).
Trained weights are cached per (image_size, channels, seed) by :func:`get_classifier`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from bdm_jax.metrics import apply_in_batches

__all__ = [
    "DigitsCNN",
    "Classifier",
    "load_digits_images",
    "split_indices",
    "train_classifier",
    "get_classifier",
    "DEFAULT_STEPS",
]

ARCH_VERSION = 1  # bump when DigitsCNN or the preprocessing changes: invalidates cached weights
DEFAULT_STEPS = 200
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 3e-3
TEST_FRACTION = 0.2
NUM_CLASSES = 10
_RANGE_TOL = 1e-3  # inputs may exceed [-1, 1] by this much (round-off of generated samples)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def _check_size(image_size, channels) -> Tuple[int, int]:
    if int(image_size) != image_size or image_size < 8 or image_size % 4:
        raise ValueError(f"image_size must be an integer >= 8 divisible by 4 (e.g. 16, 32); got {image_size!r}")
    if int(channels) != channels or channels < 1:
        raise ValueError(f"channels must be a positive integer; got {channels!r}")
    return int(image_size), int(channels)


@functools.lru_cache(maxsize=8)
def _digits_gray(image_size: int) -> Tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs8 = (d.images.astype(np.float32) / 16.0)  # (N, 8, 8) in [0, 1]
    if image_size == 8:
        out = imgs8.copy()
    else:
        out = np.stack([
            np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.Resampling.BILINEAR),
                       dtype=np.float32)
            for im in imgs8
        ])
    out = np.clip(out, 0.0, 1.0) * 2.0 - 1.0
    out.setflags(write=False)
    labels = d.target.astype(np.int32)
    labels.setflags(write=False)
    return out, labels


def load_digits_images(image_size: int, channels: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """All 1,797 sklearn digits as float32 NHWC images in [-1, 1] of size ``image_size`` and int32 labels.

    8x8 values 0..16 are divided by 16, resized with PIL bilinear (mode 'F', no quantization), mapped to
    [-1, 1]; for ``channels > 1`` the gray channel is repeated.
    """
    image_size, channels = _check_size(image_size, channels)
    gray, labels = _digits_gray(image_size)
    images = np.repeat(gray[..., None], channels, axis=-1)
    return images, labels.copy()


def split_indices(n: int, seed: int, test_fraction: float = TEST_FRACTION) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed train/test split of ``n`` samples given the seed: (train_idx, test_idx)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """conv16-pool-conv32-pool-conv64 (spatial) -> dense64+SiLU (features) -> dense10 (logits)."""

    feature_dim: int = 64
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x) -> Tuple[jax.Array, jax.Array, jax.Array]:
        x = nn.silu(nn.Conv(16, (3, 3), name="conv1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.silu(nn.Conv(32, (3, 3), name="conv2")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        spatial = nn.silu(nn.Conv(64, (3, 3), name="conv3")(x))
        h = spatial.reshape((spatial.shape[0], -1))
        feats = nn.silu(nn.Dense(self.feature_dim, name="fc")(h))
        logits = nn.Dense(self.num_classes, name="head")(feats)
        return logits, feats, spatial


def _random_shift(key, x):
    """Shifts each image by -1, 0 or +1 px along H and W independently, filling with background (-1)."""
    n, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    offs = jax.random.randint(key, (n, 2), 0, 3)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offs)


def train_classifier(image_size: int, channels: int = 1, seed: int = 0, steps: int = DEFAULT_STEPS,
                     batch_size: int = DEFAULT_BATCH_SIZE, learning_rate: float = DEFAULT_LR,
                     test_fraction: float = TEST_FRACTION, verbose: bool = False) -> Tuple[Dict[str, Any], float]:
    """Trains :class:`DigitsCNN` on the digits train split; returns (params, test_accuracy).

    Deterministic given the seed (split, init, batches and augmentation all derive from it). AdamW with
    a cosine-decayed learning rate; augmentation: random 1 px shifts.
    """
    image_size, channels = _check_size(image_size, channels)
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    images, labels = load_digits_images(image_size, channels)
    tr, te = split_indices(len(images), seed, test_fraction)
    x_tr, y_tr = jnp.asarray(images[tr]), jnp.asarray(labels[tr])
    x_te, y_te = images[te], labels[te]

    model = DigitsCNN()
    key = jax.random.key(seed)
    init_key, key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1, image_size, image_size, channels), jnp.float32))["params"]
    sched = optax.cosine_decay_schedule(learning_rate, int(steps))
    tx = optax.adamw(sched, weight_decay=1e-4)
    opt_state = tx.init(params)
    n_train = x_tr.shape[0]

    @jax.jit
    def train_step(params, opt_state, step_key, x_tr, y_tr):
        k_idx, k_aug = jax.random.split(step_key)
        idx = jax.random.randint(k_idx, (batch_size,), 0, n_train)
        xb = _random_shift(k_aug, x_tr[idx])
        yb = y_tr[idx]

        def loss_fn(p):
            logits, _, _ = model.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    step_keys = jax.random.split(key, int(steps))
    for i in range(int(steps)):
        params, opt_state, loss = train_step(params, opt_state, step_keys[i], x_tr, y_tr)
        if verbose and (i % 100 == 0 or i == steps - 1):
            print(f"[digits_classifier] step {i} loss {float(loss):.4f} ({time.perf_counter() - t0:.1f}s)")
    params = jax.device_get(params)
    clf = Classifier(params, image_size, channels)
    acc = float((clf.predict(x_te) == y_te).mean())
    if verbose:
        print(f"[digits_classifier] {image_size}px x{channels}: test accuracy {acc:.4f} "
              f"in {time.perf_counter() - t0:.1f}s")
    return params, acc


# --------------------------------------------------------------------------------------------------
# inference wrapper
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _jitted_apply(feature_dim: int):
    model = DigitsCNN(feature_dim=feature_dim)

    @jax.jit
    def apply(params, x):
        logits, feats, spatial = model.apply({"params": params}, x)
        return {"logits": logits, "probs": jax.nn.softmax(logits, axis=-1), "features": feats,
                "spatial": spatial}

    return apply


class Classifier:
    """Trained digits CNN. Inputs: float NHWC images in [-1, 1] of shape (N, image_size, image_size,
    channels); outputs are numpy arrays, computed in jitted batches of ``batch_size``."""

    def __init__(self, params, image_size: int, channels: int = 1, test_accuracy: Optional[float] = None,
                 batch_size: int = 256, metadata: Optional[dict] = None):
        self.image_size, self.channels = _check_size(image_size, channels)
        self.params = jax.device_put(params)
        self.test_accuracy = test_accuracy
        self.batch_size = int(batch_size)
        self.metadata = dict(metadata or {})
        self.feature_dim = int(np.shape(params["fc"]["kernel"])[1])
        self._apply = _jitted_apply(self.feature_dim)

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def _validate(self, images) -> np.ndarray:
        s, c = self.image_size, self.channels
        expected = f"float images of shape (N, {s}, {s}, {c}) (NHWC) with values in [-1, 1]"
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[1:] != (s, s, c):
            raise ValueError(f"images must be {expected}; got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"images must be {expected}; got dtype {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"images must be {expected}; got an empty batch")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"images must be {expected}; got NaN or Inf values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.0 - _RANGE_TOL or hi > 1.0 + _RANGE_TOL:
            raise ValueError(f"images must be {expected}; got values in [{lo:.4g}, {hi:.4g}] "
                             f"(clip samples to [-1, 1] first)")
        return x.astype(np.float32, copy=False)

    def outputs(self, images) -> Dict[str, np.ndarray]:
        """All outputs in one pass: dict with 'logits', 'probs' [N, 10], 'features' [N, D],
        'spatial' [N, H/4, W/4, 64]."""
        x = self._validate(images)
        return apply_in_batches(lambda xb: self._apply(self.params, xb), x, self.batch_size)

    def features(self, images) -> np.ndarray:
        """Penultimate (post-SiLU) features, [N, feature_dim] float32: for FID and precision/recall."""
        return self.outputs(images)["features"]

    def probs(self, images) -> np.ndarray:
        """Softmax class probabilities, [N, 10] float32: for the Inception score."""
        return self.outputs(images)["probs"]

    def logits(self, images) -> np.ndarray:
        return self.outputs(images)["logits"]

    def spatial_features(self, images) -> np.ndarray:
        """Last conv map (post-SiLU), [N, H/4, W/4, 64]: feed to metrics.sfid_features for sFID."""
        return self.outputs(images)["spatial"]

    def predict(self, images) -> np.ndarray:
        return self.outputs(images)["logits"].argmax(-1).astype(np.int32)

    def __repr__(self) -> str:
        return (f"Classifier(image_size={self.image_size}, channels={self.channels}, "
                f"feature_dim={self.feature_dim}, test_accuracy={self.test_accuracy})")


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------
def _cache_paths(cache_dir: str, image_size: int, channels: int, seed: int) -> Tuple[str, str]:
    stem = os.path.join(cache_dir, f"digits_classifier_{image_size}px_{channels}ch_seed{seed}")
    return stem + ".npz", stem + ".json"


def _save_params(path: str, params) -> None:
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    tmp = f"{path[:-4]}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()})
    os.replace(tmp, path)


def _load_params(path: str, like) -> Optional[Dict[str, Any]]:
    """Loads params saved by _save_params; None if the file is missing or doesn't match ``like``."""
    try:
        with np.load(path) as f:
            flat = {k: f[k] for k in f.files}
    except (OSError, ValueError, KeyError):
        return None
    ref = traverse_util.flatten_dict(like, sep="/")
    if set(flat) != set(ref) or any(flat[k].shape != tuple(ref[k].shape) for k in ref):
        return None
    return traverse_util.unflatten_dict(flat, sep="/")


def get_classifier(cache_dir, image_size: int, channels: int = 1, seed: int = 0,
                   steps: int = DEFAULT_STEPS, verbose: bool = False) -> Classifier:
    """Returns the trained classifier for (image_size, channels, seed), loading it from ``cache_dir`` if
    a matching cache exists (``digits_classifier_{S}px_{C}ch_seed{seed}.npz`` + ``.json`` metadata with
    image_size, channels, seed, steps, arch version, test_accuracy), training and caching it otherwise."""
    image_size, channels = _check_size(image_size, channels)
    cache_dir = os.fspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    npz_path, json_path = _cache_paths(cache_dir, image_size, channels, seed)
    wanted = {"arch_version": ARCH_VERSION, "image_size": image_size, "channels": channels,
              "seed": int(seed), "steps": int(steps), "batch_size": DEFAULT_BATCH_SIZE,
              "learning_rate": DEFAULT_LR, "test_fraction": TEST_FRACTION}
    try:
        with open(json_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = None
    if meta is not None and all(meta.get(k) == v for k, v in wanted.items()):
        like = jax.eval_shape(lambda: DigitsCNN().init(
            jax.random.key(0), jnp.zeros((1, image_size, image_size, channels), jnp.float32))["params"])
        params = _load_params(npz_path, like)
        if params is not None:
            return Classifier(params, image_size, channels, meta.get("test_accuracy"), metadata=meta)
    t0 = time.perf_counter()
    params, acc = train_classifier(image_size, channels, seed, steps=steps, verbose=verbose)
    meta = dict(wanted, test_accuracy=acc, train_seconds=round(time.perf_counter() - t0, 2),
                jax_version=jax.__version__)
    _save_params(npz_path, params)
    tmp = f"{json_path[:-5]}.{os.getpid()}.tmp.json"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp, json_path)
    return Classifier(params, image_size, channels, acc, metadata=meta)
