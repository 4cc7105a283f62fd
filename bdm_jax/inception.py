"""FID Inception-v3 in Flax: the network behind FID, sFID, IS and precision/recall (SPEC §8).

This is the Inception-v3 of TensorFlow's 2015-12-05 graph (`classify_image_graph_def.pb`), which the
FID reference implementation (TTUR), the ADM evaluation suite and pytorch-fid all use, with that graph's
quirks kept (they differ from torchvision's ImageNet Inception-v3):

* Mixed_5b/5c/5d (InceptionA), Mixed_6b-6e (InceptionC) and Mixed_7b (first InceptionE): the 3x3 average
  pool of the pool branch does not count the zero padding (``count_include_pad=False``);
* Mixed_7c (second InceptionE): that pool branch is a 3x3 *max* pool;
* 1008 output classes (1000 ImageNet classes + 8 unused), batch-norm epsilon 1e-3, no biases in convs.

Outputs of :class:`FIDInceptionV3` (NHWC in, float32 out):

* ``pool``: 2048-d global average pool (``pool_3``) -- FID and precision/recall features;
* ``spatial``: ``Mixed_6d.branch1x1`` after its ReLU, 17x17x192 at 299 px -- the TF graph's
  ``mixed_6/conv`` that the ADM suite uses for sFID (it keeps the first 7 channels);
* ``logits`` (with the fc bias) and ``logits_unbiased`` (without it): the Inception score uses the
  softmax of ``logits_unbiased``, as the original TF IS code and the ADM suite do (``pool_3 @ W``).

Weights: the standard FID weights are pytorch-fid's port of the TF graph,
``pt_inception-2015-12-05-6726825d.pth`` (:data:`FID_WEIGHTS_URL`). Download that file yourself and
convert it once with ``python -m bdm_jax.convert_inception --src=<that .pth> --dst=<file>.npz`` (needs
torch), or pass the ``.pth`` directly where torch is installed; see :func:`load_fid_inception`.

Preprocessing follows pytorch-fid: uint8 [0, 255] -> [0, 1] -> bilinear resize to 299x299 (half-pixel
centres, no antialiasing, i.e. ``F.interpolate(align_corners=False)``) -> [-1, 1]. The TF graph's own
resize differs slightly, so FIDs here match pytorch-fid's and are close to, not identical with, the
ADM TF evaluator's.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bdm_jax.metrics import apply_in_batches

__all__ = [
    "FIDInceptionV3",
    "InceptionFeatures",
    "MissingWeightsError",
    "load_fid_inception",
    "preprocess",
    "resize_bilinear",
    "FID_WEIGHTS_URL",
    "FID_WEIGHTS_FILE",
    "NUM_CLASSES",
    "INPUT_SIZE",
    "POOL_DIM",
]

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
NUM_CLASSES = 1008
INPUT_SIZE = 299
POOL_DIM = 2048
BN_EPS = 1e-3
MIN_INPUT_SIZE = 75  # smallest input the stride-2 stem and reductions accept (resize=False only)

_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH,
               "default": jax.lax.Precision.DEFAULT}


# --------------------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------------------
class BasicConv(nn.Module):
    """conv (no bias) -> batch norm (inference statistics, eps 1e-3) -> ReLU."""

    features: int
    kernel_size: Tuple[int, int]
    strides: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel_size, self.strides, padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=_PRECISIONS[self.precision], name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
    # The TF graph's average pools ignore padded zeros (pytorch: count_include_pad=False).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (35x35 at 299 px)."""

    pool_features: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        C = functools.partial(BasicConv, precision=self.precision)
        b1 = C(64, (1, 1), name="branch1x1")(x)
        b5 = C(48, (1, 1), name="branch5x5_1")(x)
        b5 = C(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = C(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = C(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = C(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = C(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        C = functools.partial(BasicConv, precision=self.precision)
        b3 = C(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = C(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = C(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = C(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-6e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1 (17x17 at 299 px).

    Returns (output, branch1x1 output): Mixed_6d's branch1x1 is the TF graph's ``mixed_6/conv``.
    """

    channels_7x7: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        C = functools.partial(BasicConv, precision=self.precision)
        c7 = self.channels_7x7
        b1 = C(192, (1, 1), name="branch1x1")(x)
        b7 = C(c7, (1, 1), name="branch7x7_1")(x)
        b7 = C(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = C(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = C(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = C(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = C(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = C(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = C(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = C(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    """Mixed_7a (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        C = functools.partial(BasicConv, precision=self.precision)
        b3 = C(192, (1, 1), name="branch3x3_1")(x)
        b3 = C(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = C(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = C(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = C(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = C(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1 (8x8 at 299 px).

    ``max_pool=True`` is the FID graph's Mixed_7c quirk (a max pool where Inception-v3 has an average).
    """

    max_pool: bool = False
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        C = functools.partial(BasicConv, precision=self.precision)
        b1 = C(320, (1, 1), name="branch1x1")(x)
        b3 = C(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([C(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              C(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = C(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = C(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([C(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              C(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_same(x)
        bp = C(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 body on preprocessed NHWC inputs in [-1, 1] (299x299 for the standard
    features). Returns a dict: ``pool`` [N, 2048], ``spatial`` [N, 17, 17, 192] (``mixed_6/conv``),
    ``logits`` / ``logits_unbiased`` [N, 1008]. Module names follow the PyTorch state dict
    (``Conv2d_1a_3x3``, ``Mixed_5b``, ..., ``fc``) so the converter is a rename + transpose."""

    num_classes: int = NUM_CLASSES
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> Dict[str, jax.Array]:
        C = functools.partial(BasicConv, precision=self.precision)
        x = C(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = C(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = C(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_valid(x)
        x = C(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = C(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_valid(x)
        p = self.precision
        x = InceptionA(32, p, name="Mixed_5b")(x)
        x = InceptionA(64, p, name="Mixed_5c")(x)
        x = InceptionA(64, p, name="Mixed_5d")(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        x, _ = InceptionC(128, p, name="Mixed_6b")(x)
        x, _ = InceptionC(160, p, name="Mixed_6c")(x)
        x, spatial = InceptionC(160, p, name="Mixed_6d")(x)  # spatial = mixed_6/conv (sFID)
        x, _ = InceptionC(192, p, name="Mixed_6e")(x)
        x = InceptionD(p, name="Mixed_7a")(x)
        x = InceptionE(False, p, name="Mixed_7b")(x)
        x = InceptionE(True, p, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits_unbiased, logits = _Logits(self.num_classes, self.precision, name="fc")(pool)
        return {"pool": pool, "spatial": spatial, "logits": logits, "logits_unbiased": logits_unbiased}


class _Logits(nn.Module):
    """The 2048 -> 1008 classifier; returns (pool @ W, pool @ W + b)."""

    num_classes: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, pool):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool.shape[-1], self.num_classes))
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
        unbiased = jnp.dot(pool, kernel, precision=_PRECISIONS[self.precision])
        return unbiased, unbiased + bias


# --------------------------------------------------------------------------------------------------
# preprocessing and the batched feature extractor
# --------------------------------------------------------------------------------------------------
def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """NHWC bilinear resize to ``size`` x ``size`` with half-pixel centres and no antialiasing: the
    same sampling as torch ``F.interpolate(mode='bilinear', align_corners=False)`` (pytorch-fid)."""
    n, h, w, c = x.shape
    if (h, w) == (size, size):
        return x
    return jax.image.resize(x, (n, size, size, c), method="bilinear", antialias=False)


def preprocess(images_uint8: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """uint8 NHWC (1 or 3 channels) -> float32 [-1, 1] 3-channel ``size`` x ``size`` (pytorch-fid order:
    scale to [0, 1], resize, then map to [-1, 1]; gray is repeated to RGB)."""
    x = images_uint8.astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return 2.0 * resize_bilinear(x, size) - 1.0


@functools.lru_cache(maxsize=None)
def _jitted_apply(precision: str):
    net = FIDInceptionV3(precision=precision)

    @jax.jit
    def apply(variables, images_uint8):
        out = net.apply(variables, preprocess(images_uint8))
        return {"features": out["pool"], "spatial": out["spatial"], "logits": out["logits"],
                "probs": jax.nn.softmax(out["logits_unbiased"], axis=-1)}

    return apply


class InceptionFeatures:
    """Batched FID-Inception features of uint8 NHWC images (any size, 1 or 3 channels; resized to 299).

    ``outputs(images)`` -> dict of numpy arrays: ``features`` [N, 2048] (pool_3), ``probs`` [N, 1008]
    (softmax of the unbiased logits, for IS), ``spatial`` [N, 17, 17, 192] (mixed_6/conv, for sFID),
    ``logits`` [N, 1008] (with the fc bias).
    """

    name = "inception_fid"

    def __init__(self, variables: Dict[str, Any], batch_size: int = 100, precision: str = "highest",
                 source: str = ""):
        if precision not in _PRECISIONS:
            raise ValueError(f"precision={precision!r} must be one of {sorted(_PRECISIONS)}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        self.variables = jax.device_put(variables)
        self.batch_size = int(batch_size)
        self.precision = precision
        self.source = source
        self.feature_dim = POOL_DIM
        self._apply = _jitted_apply(precision)

    def _validate(self, images) -> np.ndarray:
        expected = "uint8 images of shape (N, H, W, C) (NHWC, C = 1 or 3) with values in [0, 255]"
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] == 0:
            raise ValueError(f"images must be {expected}; got shape {x.shape}")
        if x.dtype != np.uint8:
            if not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"images must be {expected}; got dtype {x.dtype} (convert [-1, 1] floats "
                                 f"with bdm_jax.images.to_uint8)")
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi > 255:
                raise ValueError(f"images must be {expected}; got integer values in [{lo}, {hi}]")
            x = x.astype(np.uint8)
        return x

    def outputs(self, images) -> Dict[str, np.ndarray]:
        x = self._validate(images)
        return apply_in_batches(lambda xb: self._apply(self.variables, xb), x, self.batch_size)

    def metadata(self) -> Dict[str, Any]:
        return {"extractor": self.name, "weights": os.path.basename(self.source), "precision": self.precision}

    def __repr__(self) -> str:
        return f"InceptionFeatures(source={self.source!r}, batch_size={self.batch_size})"


class MissingWeightsError(ValueError):
    """The FID Inception weight file is missing or is not the FID Inception's."""


def missing_weights_message(path: Optional[str]) -> str:
    where = f"not found at {path!r}" if path else "not given"
    return (f"FID Inception weights {where}: download {FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL} "
            f"(pytorch-fid's port of TF's inception-2015-12-05 graph) and pass its path "
            f"(--inception_weights=... or $BDM_INCEPTION_WEIGHTS); optionally convert it once to .npz with "
            f"`python -m bdm_jax.convert_inception --src=<.pth> --dst=<.npz>` so torch is not needed")


def load_fid_inception(path: Optional[str] = None, batch_size: int = 100,
                       precision: str = "highest") -> InceptionFeatures:
    """The FID Inception feature extractor from a local weight file: the original PyTorch
    ``pt_inception-2015-12-05-6726825d.pth`` (converted on the fly; needs torch) or the ``.npz`` written by
    ``python -m bdm_jax.convert_inception``. ``path=None`` reads ``$BDM_INCEPTION_WEIGHTS``."""
    from bdm_jax import convert_inception

    path = path or os.environ.get("BDM_INCEPTION_WEIGHTS") or None
    if not path or not os.path.isfile(path):
        raise MissingWeightsError(missing_weights_message(path))
    variables = convert_inception.load_variables(path)
    return InceptionFeatures(variables, batch_size=batch_size, precision=precision, source=path)
