"""Sample-quality metrics on precomputed features (pure numpy/scipy).

Everything here works on feature arrays, so the feature extractor is pluggable: the ADM suite uses
Inception-v3 (pool3 for FID/P/R, ``mixed_6/conv`` for sFID, softmax for IS); bdm-jax's small-scale
experiments use the digits classifier in :mod:`bdm_jax.digits_classifier`.

* :class:`FeatureStats` -- streaming float64 mean/covariance accumulator (savable as ``.npz``).
* :func:`frechet_distance` -- FID/sFID between two Gaussians ``(mu, sigma)``.
* :func:`inception_score` -- IS from class probabilities.
* :func:`sfid_features` / :func:`compute_sfid_stats` -- sFID is FID on flattened spatial features.
* :func:`precision_recall` -- improved precision/recall (Kynkaanniemi et al., 2019), chunked.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np
import scipy.linalg

__all__ = [
    "FeatureStats",
    "compute_stats",
    "frechet_distance",
    "fid_from_features",
    "inception_score",
    "sfid_features",
    "compute_sfid_stats",
    "SFID_NUM_CHANNELS",
    "precision_recall",
]

# ADM evaluation suite: sFID keeps the first 7 channels of Inception's mixed_6/conv (17x17x768) map.
SFID_NUM_CHANNELS = 7


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------
def _as_2d_features(x, name: str) -> np.ndarray:
    """Validates a (N, D) finite real array; returns it as a numpy array (dtype unchanged)."""
    try:
        arr = np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} must be array-like of shape (N, D); got {type(x).__name__}") from e
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D of shape (N, D) (one row per sample); got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers (float or int); got dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one sample and one feature; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf; only finite values are allowed")
    return arr


def _check_gaussian(mu, sigma, name: str) -> Tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"mu{name} must be 1-D of shape (D,); got shape {mu.shape}")
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"sigma{name} must be a square 2-D (D, D) matrix; got shape {sigma.shape}")
    if sigma.shape[0] != mu.shape[0]:
        raise ValueError(f"sigma{name} has shape {sigma.shape} but mu{name} has shape {mu.shape}; "
                         f"sigma must be (D, D) for mu of shape (D,)")
    if not np.all(np.isfinite(mu)):
        raise ValueError(f"mu{name} contains NaN or Inf; only finite values are allowed")
    if not np.all(np.isfinite(sigma)):
        raise ValueError(f"sigma{name} contains NaN or Inf; only finite values are allowed")
    scale = max(np.abs(sigma).max(), 1e-300)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise ValueError(f"sigma{name} must be a symmetric covariance matrix")
    return mu, sigma


# --------------------------------------------------------------------------------------------------
# streaming statistics
# --------------------------------------------------------------------------------------------------
class FeatureStats:
    """Streaming mean/covariance of feature vectors, accumulated in float64.

    Keeps the count, the sum and the sum of outer products of ``x - shift``, where ``shift`` is the
    mean of the first batch (a fixed offset that makes the one-pass covariance numerically stable
    when features have a large mean). ``cov`` is the unbiased (``N - 1``) estimate, matching
    ``np.cov(feats, rowvar=False)``.
    """

    def __init__(self, dim: Optional[int] = None):
        if dim is not None and (int(dim) != dim or dim < 1):
            raise ValueError(f"dim must be a positive integer or None; got {dim!r}")
        self.dim = None if dim is None else int(dim)
        self.count = 0
        self.shift: Optional[np.ndarray] = None
        self.sum: Optional[np.ndarray] = None
        self.sum_outer: Optional[np.ndarray] = None
        if self.dim is not None:
            self._allocate(np.zeros(self.dim))

    def _allocate(self, shift: np.ndarray) -> None:
        d = shift.shape[0]
        self.shift = shift.astype(np.float64)
        self.sum = np.zeros(d, np.float64)
        self.sum_outer = np.zeros((d, d), np.float64)

    def update(self, batch_feats) -> "FeatureStats":
        x = _as_2d_features(batch_feats, "batch_feats").astype(np.float64)
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise ValueError(f"batch_feats must have {self.dim} features per row (shape (N, {self.dim})); "
                             f"got shape {x.shape}")
        if self.count == 0:  # (re)choose the shift from the first data seen
            self._allocate(x.mean(axis=0))
        xc = x - self.shift
        self.sum += xc.sum(axis=0)
        self.sum_outer += xc.T @ xc
        self.count += x.shape[0]
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Adds another accumulator's data to this one (e.g. from another host/shard)."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.dim, self.count = other.dim, other.count
            self.shift, self.sum, self.sum_outer = other.shift.copy(), other.sum.copy(), other.sum_outer.copy()
            return self
        if other.dim != self.dim:
            raise ValueError(f"other has feature dim {other.dim}, expected {self.dim}")
        # re-express other's sums around self.shift: x - s = (x - s_o) + (s_o - s)
        delta = other.shift - self.shift
        n = other.count
        self.sum_outer += (other.sum_outer + np.outer(other.sum, delta) + np.outer(delta, other.sum)
                           + n * np.outer(delta, delta))
        self.sum += other.sum + n * delta
        self.count += n
        return self

    @property
    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("FeatureStats has no samples yet; call update() first")
        return self.shift + self.sum / self.count

    def covariance(self, allow_singular: bool = False) -> np.ndarray:
        """Unbiased covariance. Raises unless ``count >= max(2, dim)`` (pass ``allow_singular=True`` to
        accept rank-deficient estimates from fewer samples than feature dims)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples; FeatureStats has {self.count}")
        if not allow_singular and self.count < self.dim:
            raise ValueError(f"a covariance of {self.dim}-d features needs at least {self.dim} samples "
                             f"(fewer samples than feature dims give a singular estimate); got {self.count}")
        m = self.sum / self.count
        cov = (self.sum_outer - self.count * np.outer(m, m)) / (self.count - 1)
        return 0.5 * (cov + cov.T)

    @property
    def cov(self) -> np.ndarray:
        return self.covariance()

    # ---- persistence ------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Saves the raw accumulators to ``path`` (``.npz``); written atomically."""
        if self.count == 0:
            raise ValueError("refusing to save an empty FeatureStats")
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        tmp = path[:-4] + ".tmp.npz"
        np.savez(tmp, count=np.int64(self.count), shift=self.shift, sum=self.sum, sum_outer=self.sum_outer,
                 mu=self.mean, sigma=self.covariance(allow_singular=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "FeatureStats":
        with np.load(os.fspath(path)) as f:
            st = cls()
            st.count = int(f["count"])
            st.shift = f["shift"].astype(np.float64)
            st.sum = f["sum"].astype(np.float64)
            st.sum_outer = f["sum_outer"].astype(np.float64)
            st.dim = st.shift.shape[0]
        return st

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, count={self.count})"


def compute_stats(feats, allow_singular: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of a (N, D) feature array in float64 (unbiased covariance)."""
    st = FeatureStats().update(feats)
    return st.mean, st.covariance(allow_singular=allow_singular)


# --------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------
def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrt(sigma1 sigma2)) = tr(sqrt(sqrt(S1) S2 sqrt(S1))): the inner matrix is symmetric PSD, so
    its square root's trace is the sum of sqrt of its (clipped) eigenvalues."""
    s1 = _psd_sqrt(sigma1)
    m = s1 @ sigma2 @ s1
    w = np.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """The reference (pytorch-fid / ADM) formulation with scipy.linalg.sqrtm of the product."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has a large imaginary component ({imag:.3g}); "
                             f"the covariances are probably not valid PSD matrices")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "eigh") -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:

        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)).

    ``method="eigh"`` (default) uses the symmetric form tr(sqrt(sqrt(S1) S2 sqrt(S1))), which is exact for
    singular/ill-conditioned covariances and never produces complex values. ``method="sqrtm"`` is the
    classic scipy.linalg.sqrtm(sigma1 @ sigma2) route (with ``eps * I`` added to both covariances if the
    result is not finite; tiny imaginary parts are dropped, large ones raise). Both agree to round-off.
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "1")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same shape (D,); got {mu1.shape} and {mu2.shape}")
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm'; got {method!r}")
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(fd, 0.0)  # tiny negative values are round-off (the exact value is >= 0 for PSD inputs)


def fid_from_features(feats1, feats2, method: str = "eigh") -> float:
    """FID between two (N, D) feature arrays (each needs N >= D samples)."""
    mu1, s1 = compute_stats(_as_2d_features(feats1, "feats1"))
    mu2, s2 = compute_stats(_as_2d_features(feats2, "feats2"))
    return frechet_distance(mu1, s1, mu2, s2, method=method)


# --------------------------------------------------------------------------------------------------
# Inception score
# --------------------------------------------------------------------------------------------------
def inception_score(probs, splits: int = 10) -> Tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), computed on ``splits`` equal consecutive chunks of the samples
    (p(y) = the chunk's mean prediction); returns (mean, std) over the chunks.

    ``probs``: (N, C) class probabilities (rows non-negative, summing to 1), N >= splits.
    """
    p = _as_2d_features(probs, "probs").astype(np.float64)
    if int(splits) != splits or splits < 1:
        raise ValueError(f"splits must be a positive integer; got {splits!r}")
    splits = int(splits)
    n = p.shape[0]
    if n < splits:
        raise ValueError(f"probs must have at least splits={splits} rows; got {n}")
    if p.min() < 0:
        raise ValueError("probs must be non-negative class probabilities (softmax outputs)")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs rows must sum to 1 (softmax outputs, not logits)")
    p = p / p.sum(axis=1, keepdims=True)
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------------
# sFID
# --------------------------------------------------------------------------------------------------
def sfid_features(feature_maps, num_channels: int = SFID_NUM_CHANNELS) -> np.ndarray:
    """Flattens spatial feature maps for sFID, following the ADM evaluation suite: keep the first
    ``num_channels`` (7) channels of an NHWC map (ADM: Inception ``mixed_6/conv``, 17x17x768 ->
    17*17*7 = 2023 dims) and flatten each sample in (H, W, C) row-major order -> (N, H*W*num_channels).
    sFID is then plain FID (:func:`frechet_distance`) on these vectors.
    """
    fm = np.asarray(feature_maps)
    if fm.ndim != 4:
        raise ValueError(f"feature_maps must be 4-D NHWC (N, H, W, C); got shape {fm.shape}")
    if int(num_channels) != num_channels or num_channels < 1:
        raise ValueError(f"num_channels must be a positive integer; got {num_channels!r}")
    if fm.shape[-1] < num_channels:
        raise ValueError(f"feature_maps must have at least num_channels={num_channels} channels (last axis, "
                         f"NHWC); got shape {fm.shape}")
    if not np.all(np.isfinite(fm)):
        raise ValueError("feature_maps contains NaN or Inf; only finite values are allowed")
    return fm[..., :num_channels].reshape(fm.shape[0], -1)


def compute_sfid_stats(feature_maps, num_channels: int = SFID_NUM_CHANNELS,
                       stats: Optional[FeatureStats] = None) -> FeatureStats:
    """Accumulates sFID statistics of a batch of NHWC spatial feature maps into ``stats`` (a new
    :class:`FeatureStats` if None) and returns it; call repeatedly to stream over batches."""
    if stats is None:
        stats = FeatureStats()
    return stats.update(sfid_features(feature_maps, num_channels))


# --------------------------------------------------------------------------------------------------
# improved precision / recall
# --------------------------------------------------------------------------------------------------
def _sq_dists_f32(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(a), len(b)) in float32, clipped at 0."""
    a_sq = np.einsum("ij,ij->i", a, a)
    d = a_sq[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]
    return np.maximum(d, 0.0, out=d)


def _knn_radii(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance of each row of x to its k-th nearest neighbour in x (itself excluded)."""
    n = x.shape[0]
    x_sq = np.einsum("ij,ij->i", x, x)
    radii = np.empty(n, np.float32)
    for i in range(0, n, batch_size):
        rows = x[i:i + batch_size]
        best = None  # running k+1 smallest distances per row (the row itself is one of them)
        for j in range(0, n, batch_size):
            d = _sq_dists_f32(rows, x[j:j + batch_size], x_sq[j:j + batch_size])
            cand = d if best is None else np.concatenate([best, d], axis=1)
            kk = min(k + 1, cand.shape[1])
            best = np.partition(cand, kk - 1, axis=1)[:, :kk]
        radii[i:i + batch_size] = np.partition(best, k, axis=1)[:, k]
    return radii


def _in_manifold(query: np.ndarray, ref: np.ndarray, ref_radii: np.ndarray, batch_size: int) -> np.ndarray:
    """For each query row: is it within the k-NN ball of at least one reference sample?"""
    ref_sq = np.einsum("ij,ij->i", ref, ref)
    out = np.zeros(query.shape[0], bool)
    for i in range(0, query.shape[0], batch_size):
        q = query[i:i + batch_size]
        hit = np.zeros(q.shape[0], bool)
        for j in range(0, ref.shape[0], batch_size):
            d = _sq_dists_f32(q, ref[j:j + batch_size], ref_sq[j:j + batch_size])
            hit |= (d <= ref_radii[None, j:j + batch_size]).any(axis=1)
        out[i:i + batch_size] = hit
    return out


def precision_recall(real_feats, fake_feats, k: int = 3, batch_size: int = 2000) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019; as in the ADM suite, k = 3).

    Each set's manifold is the union of balls around its samples with radius = distance to the sample's
    k-th nearest neighbour within the same set. Precision = fraction of fake samples inside the real
    manifold; recall = fraction of real samples inside the fake manifold.

    Distances are computed in float32 blocks of at most ``batch_size x batch_size`` (after centring on
    the real mean in float64, which keeps the float32 error small), so 10k+ x 10k sets fit in memory.
    """
    real = _as_2d_features(real_feats, "real_feats")
    fake = _as_2d_features(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real_feats and fake_feats must have the same feature dim; got shapes "
                         f"{real.shape} and {fake.shape}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    k = int(k)
    for name, arr in (("real_feats", real), ("fake_feats", fake)):
        if arr.shape[0] <= k:
            raise ValueError(f"{name} needs more than k={k} samples for k-NN radii; got {arr.shape[0]}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    batch_size = int(batch_size)
    center = real.astype(np.float64).mean(axis=0)
    real32 = (real.astype(np.float64) - center).astype(np.float32)
    fake32 = (fake.astype(np.float64) - center).astype(np.float32)
    real_radii = _knn_radii(real32, k, batch_size)
    fake_radii = _knn_radii(fake32, k, batch_size)
    precision = float(_in_manifold(fake32, real32, real_radii, batch_size).mean())
    recall = float(_in_manifold(real32, fake32, fake_radii, batch_size).mean())
    return precision, recall


def apply_in_batches(apply: Callable[[np.ndarray], Dict[str, Any]], x: np.ndarray,
                     batch_size: int) -> Dict[str, np.ndarray]:
    """Run a feature network's `apply(batch) -> {name: array}` over `x` in fixed-shape batches.

    The last batch is zero-padded to the batch shape (one compilation) and the padding cut off again.
    Shared by the FID Inception and the digits classifier.
    """
    n = x.shape[0]
    b = min(batch_size, n)
    chunks = []
    for i in range(0, n, b):
        xb = x[i:i + b]
        m = xb.shape[0]
        if m < b:
            xb = np.concatenate([xb, np.zeros((b - m,) + xb.shape[1:], xb.dtype)])
        out = jax.device_get(apply(xb))
        chunks.append({k: v[:m] for k, v in out.items()})
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

