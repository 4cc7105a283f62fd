"""Evaluation at scale (SPEC §8, §9): sharded resumable sampling, cached reference statistics, metrics.

    metrics = evaluate_workdir("workdirs/digits", num_samples=2000)   # -> <workdir>/eval/metrics.json

Pieces, each usable alone:

* :func:`sample_to_shards` -- N samples in batches, one batch per local device at a time (``shard_map``
  over ``jax.local_devices()``), each batch written to ``<out>/shards/shard_XXXXX.npz`` as soon as it is
  done (a rerun skips finished shards), then merged into one uint8 ``.npz``. Batch ``i`` is drawn with
  ``fold_in(key(seed), i)``, so the samples do not depend on the device count and equal
  :func:`bdm_jax.trainer.generate` with the same batch size and seed.
* :func:`get_extractor` -- the feature network: the digits classifier for ``data.name=digits``
  (:mod:`bdm_jax.digits_classifier`), the FID Inception-v3 otherwise (:mod:`bdm_jax.inception`).
* :func:`reference_stats` -- features of the training set (FID/sFID Gaussians, and up to 10k feature rows
  for precision/recall), computed once and cached as ``<cache>/ref_stats_<dataset>_<res>.npz`` with
  metadata that is checked on load.
* :func:`compute_metrics` -- FID, sFID, IS, precision, recall of uint8 samples against those statistics.
* :func:`weight_bytes` -- model size as SPEC §9 counts it; :func:`compare_table`, :func:`side_by_side`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bdm_jax import images as images_lib
from bdm_jax import metrics

log = logging.getLogger("bdm_jax")

__all__ = [
    "check_samples",
    "load_samples",
    "sample_to_shards",
    "get_extractor",
    "DigitsFeatures",
    "ReferenceStats",
    "reference_stats",
    "compute_metrics",
    "weight_bytes",
    "evaluate_workdir",
    "evaluate_samples",
    "compare_table",
    "side_by_side",
    "report_digits",
    "default_cache_dir",
    "default_num_samples",
]

REF_STATS_VERSION = 1  # bump when the way reference statistics are computed changes
PR_NUM_REFERENCE = 10_000  # SPEC §8: 10k reference images for precision/recall
PAPER_NUM_SAMPLES = 50_000
DIGITS_NUM_SAMPLES = 2_000
FEATURE_CHUNK = 1_000  # images per feature-extraction chunk (bounds host memory for 50k samples)


def default_cache_dir() -> str:
    """``$BDM_CACHE_DIR`` or ``~/.cache/bdm_jax``: reference statistics and the digits classifier."""
    return os.environ.get("BDM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "bdm_jax")


def default_num_samples(cfg: Any) -> int:
    """SPEC §8's 50,000 for real datasets; 2,000 for the 1,797-image digits."""
    return DIGITS_NUM_SAMPLES if cfg.data.name == "digits" else PAPER_NUM_SAMPLES


# --------------------------------------------------------------------------------------------------
# sample arrays
# --------------------------------------------------------------------------------------------------
def check_samples(x: Any, image_size: int, channels: int, name: str = "samples") -> np.ndarray:
    """Validates generated images: uint8 (or integers in [0, 255]) NHWC of the model's size; returns uint8."""
    expected = f"uint8 images of shape (N, {image_size}, {image_size}, {channels}) with values in [0, 255]"
    arr = np.asarray(x)
    if arr.ndim != 4 or arr.shape[1:] != (image_size, image_size, channels):
        raise ValueError(f"{name} must be {expected}; got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must be {expected}; got no images")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        raise ValueError(f"{name} must be {expected}; got {arr.dtype} values in [{lo:.3g}, {hi:.3g}] "
                         f"(convert [-1, 1] model outputs with bdm_jax.images.to_uint8)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be {expected}; got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"{name} must be {expected}; got integer values in [{lo}, {hi}]")
    return arr.astype(np.uint8)


def load_samples(path: str) -> np.ndarray:
    """Images of a samples ``.npz`` (key ``images`` as bdm-jax writes, or ``arr_0`` as ADM's)."""
    if not os.path.isfile(path):
        raise ValueError(f"samples file {path!r} does not exist")
    with np.load(path) as f:
        for key in ("images", "arr_0"):
            if key in f.files:
                return f[key]
        raise ValueError(f"samples file {path!r} has no 'images' (or 'arr_0') array; it has {f.files}")


# --------------------------------------------------------------------------------------------------
# sharded, resumable sampling
# --------------------------------------------------------------------------------------------------
def _shard_path(shard_dir: str, i: int) -> str:
    return os.path.join(shard_dir, f"shard_{i:05d}.npz")


def _sample_meta(setup: Any, batch_size: int, seed: int, extra: Optional[Mapping[str, Any]]) -> dict:
    cfg = setup.cfg
    s = cfg.sample
    shape = [cfg.data.image_size, cfg.data.image_size, cfg.data.channels]  # images (decoded, if latent)
    return {"batch_size": int(batch_size), "seed": int(seed), "image_shape": shape, "sampler": s.sampler,
            "steps": int(s.steps), "eta": float(s.eta), "spacing": s.spacing, "clip_denoised": bool(s.clip_denoised),
            "method": cfg.method, **dict(extra or {})}


def _check_meta(path: str, meta: dict) -> None:
    """Refuses to mix shards made with other settings into this run (they would be different samples)."""
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            k, (was, now) = next(iter(diff.items()))
            raise ValueError(f"{os.path.dirname(path)} holds shards made with {k}={was!r}, this run has {k}={now!r}; "
                             f"use another output directory or delete it")
    else:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


def _sharded_sampler(setup: Any, batch_size: int, devices: Sequence[Any]):
    """fn(params, masks, keys[D]) -> uint8-ready floats [D * batch_size, H, W, C]: one batch per device."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from bdm_jax.trainer import make_sample_fn

    mesh = Mesh(np.asarray(devices), ("shard",))
    sample = make_sample_fn(setup, batch_size)
    per_device = jax.shard_map(lambda p, m, k: sample(p, m, k[0]), mesh=mesh,
                               in_specs=(P(), P(), P("shard")), out_specs=P("shard"))
    return jax.jit(per_device), NamedSharding(mesh, P())


def sample_to_shards(setup: Any, params: Any, masks: Any, out_dir: str, num: int, batch_size: int, seed: int = 0,
                     *, progress: bool = True, devices: Optional[Sequence[Any]] = None,
                     meta: Optional[Mapping[str, Any]] = None) -> str:
    """Generates ``num`` uint8 samples into ``<out_dir>/shards/`` (one ``shard_XXXXX.npz`` per batch of
    ``batch_size``; existing shards are kept and skipped) and merges the first ``num`` into
    ``<out_dir>/samples_<num>.npz`` (key ``images``), which it returns. A larger ``num`` later reuses
    the shards made so far.

    ``devices`` (default ``jax.local_devices()``) each draw one batch per call. ``meta`` (e.g. the
    checkpoint step) is stored with the sampler settings in ``shards/meta.json``; a rerun with other
    settings raises instead of mixing samples. With several processes each draws the shards
    ``i % process_count == process_index`` and process 0 merges (the directory must be shared).
    """
    if int(num) != num or num < 1:
        raise ValueError(f"num={num!r} must be a positive integer (number of samples)")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    num, batch_size = int(num), int(batch_size)
    cfg = setup.cfg
    size, ch = cfg.data.image_size, cfg.data.channels
    merged = os.path.join(out_dir, f"samples_{num}.npz")
    shard_dir = os.path.join(out_dir, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    _check_meta(os.path.join(shard_dir, "meta.json"), _sample_meta(setup, batch_size, seed, meta))
    if os.path.isfile(merged):
        return merged

    n_shards = math.ceil(num / batch_size)
    pid, pcount = jax.process_index(), jax.process_count()
    todo = [i for i in range(n_shards) if i % pcount == pid and not os.path.isfile(_shard_path(shard_dir, i))]
    if todo:
        devices = list(devices if devices is not None else jax.local_devices())
        fn, replicated = _sharded_sampler(setup, batch_size, devices)
        params, masks = jax.device_put((params, masks), replicated)
        key = jax.random.key(seed)
        from tqdm import tqdm

        bar = tqdm(total=n_shards, initial=n_shards - len(todo), desc="sampling", unit="shard",
                   disable=not progress or pid != 0, dynamic_ncols=True)
        for g in range(0, len(todo), len(devices)):
            group = todo[g:g + len(devices)]
            padded = group + [group[-1]] * (len(devices) - len(group))  # idle devices redo a batch, discarded
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(padded, jnp.uint32))
            imgs = images_lib.to_uint8(jax.device_get(fn(params, masks, keys)))
            for j, i in enumerate(group):  # whole batches, so a later, larger num reuses every shard
                images_lib.save_npz(imgs[j * batch_size:(j + 1) * batch_size], _shard_path(shard_dir, i))
            bar.update(len(group))
        bar.close()
    if pcount > 1:  # every process's shards are written before process 0 merges; all return after it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("bdm_jax_sample_shards")
    if pid == 0:
        parts = []
        for i in range(n_shards):
            arr = load_samples(_shard_path(shard_dir, i))
            if arr.shape != (batch_size, size, size, ch) or arr.dtype != np.uint8:
                raise ValueError(f"shard {_shard_path(shard_dir, i)} holds {arr.dtype} {arr.shape}, expected uint8 "
                                 f"{(batch_size, size, size, ch)}; delete it and rerun")
            parts.append(arr)
        images_lib.save_npz(np.concatenate(parts)[:num], merged)
    if pcount > 1:
        multihost_utils.sync_global_devices("bdm_jax_sample_merge")
    return merged


# --------------------------------------------------------------------------------------------------
# feature extractors
# --------------------------------------------------------------------------------------------------
class DigitsFeatures:
    """The digits classifier behind the extractor interface: uint8 NHWC in, dict of features/probs/spatial."""

    name = "digits_classifier"

    def __init__(self, classifier: Any):
        self.classifier = classifier
        self.feature_dim = classifier.feature_dim

    def outputs(self, images_uint8: np.ndarray) -> Dict[str, np.ndarray]:
        x = np.asarray(images_uint8, np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
        out = self.classifier.outputs(x)
        return {"features": out["features"], "probs": out["probs"], "spatial": out["spatial"]}

    def metadata(self) -> Dict[str, Any]:
        m = self.classifier.metadata
        return {"extractor": self.name, "arch_version": m.get("arch_version"), "seed": m.get("seed"),
                "steps": m.get("steps"), "test_accuracy": self.classifier.test_accuracy}


def get_extractor(data_cfg: Any, cache_dir: Optional[str] = None, inception_weights: Optional[str] = None,
                  batch_size: int = 200) -> Any:
    """Digits classifier for ``data.name=digits`` (trained and cached on first use), FID Inception-v3
    from ``inception_weights`` (or ``$BDM_INCEPTION_WEIGHTS``) for every other dataset."""
    if data_cfg.name == "digits":
        from bdm_jax.digits_classifier import get_classifier

        return DigitsFeatures(get_classifier(cache_dir or default_cache_dir(), data_cfg.image_size, data_cfg.channels))
    from bdm_jax.inception import load_fid_inception

    return load_fid_inception(inception_weights, batch_size=batch_size)


def _extract(extractor: Any, batches: Iterator[np.ndarray], keep_rows: Optional[np.ndarray] = None) -> dict:
    """Streams batches through the extractor: FID and sFID accumulators, all probs, and the pool features
    of the rows ``keep_rows`` (global indices; None = all)."""
    fid, sfid = metrics.FeatureStats(), metrics.FeatureStats()
    probs, kept = [], []
    offset = 0
    for batch in batches:
        out = extractor.outputs(batch)
        fid.update(out["features"])
        metrics.compute_sfid_stats(out["spatial"], stats=sfid)
        probs.append(out["probs"])
        rows = np.arange(offset, offset + len(batch))
        sel = slice(None) if keep_rows is None else np.isin(rows, keep_rows)
        kept.append(out["features"][sel])
        offset += len(batch)
    return {"fid": fid, "sfid": sfid, "probs": np.concatenate(probs), "features": np.concatenate(kept), "count": offset}


def _chunks(x: np.ndarray, size: int = FEATURE_CHUNK) -> Iterator[np.ndarray]:
    for i in range(0, len(x), size):
        yield x[i:i + size]


# --------------------------------------------------------------------------------------------------
# reference statistics
# --------------------------------------------------------------------------------------------------
def dataset_id(data_cfg: Any) -> str:
    """Filename-safe dataset name: 'digits', 'tfds-cifar10', 'folder-<dir>-<hash>'."""
    name = data_cfg.name
    if name == "folder":
        d = os.path.abspath(data_cfg.data_dir)
        name = f"folder-{os.path.basename(d.rstrip(os.sep))}-{hashlib.sha1(d.encode()).hexdigest()[:8]}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


@dataclasses.dataclass
class ReferenceStats:
    """FID / sFID Gaussians of the reference set, pool features of up to 10k of its images (P/R)."""

    mu: np.ndarray
    sigma: np.ndarray
    sfid_mu: np.ndarray
    sfid_sigma: np.ndarray
    pr_features: np.ndarray
    metadata: Dict[str, Any]

    def save(self, path: str) -> None:
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, mu=self.mu, sigma=self.sigma, sfid_mu=self.sfid_mu, sfid_sigma=self.sfid_sigma,
                 pr_features=self.pr_features, metadata=np.asarray(json.dumps(self.metadata, sort_keys=True)))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "ReferenceStats":
        try:
            with np.load(path) as f:
                return cls(f["mu"], f["sigma"], f["sfid_mu"], f["sfid_sigma"], f["pr_features"],
                           json.loads(str(f["metadata"])))
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"reference stats {path!r} are not a bdm-jax reference statistics file ({e})") from None


def _wanted_metadata(data_cfg: Any, extractor: Any, num_images: Optional[int]) -> dict:
    return {"version": REF_STATS_VERSION, "dataset": dataset_id(data_cfg), "image_size": int(data_cfg.image_size),
            "channels": int(data_cfg.channels), "num_images_requested": num_images, **extractor.metadata()}


def check_reference(meta: Mapping[str, Any], wanted: Mapping[str, Any], path: str, strict: bool) -> List[str]:
    """Fields where cached stats differ from what this evaluation needs. Dataset, resolution and channels
    always raise (FID against another dataset is meaningless); with ``strict`` any difference raises."""
    for key in ("dataset", "image_size", "channels"):
        if meta.get(key) != wanted[key]:
            raise ValueError(
                f"reference stats {path!r} are for dataset={meta.get('dataset')!r} at "
                f"{meta.get('image_size')}px x{meta.get('channels')}, but the samples are "
                f"dataset={wanted['dataset']!r} at {wanted['image_size']}px x{wanted['channels']} ({key} differs); "
                f"use the matching file")
    diff = [k for k in wanted if meta.get(k) != wanted[k]]
    if strict and diff:
        raise ValueError(f"reference stats {path!r} were computed with {diff[0]}={meta.get(diff[0])!r}, "
                         f"this evaluation needs {wanted[diff[0]]!r}")
    return diff


def reference_stats(data_cfg: Any, extractor: Any, cache_dir: Optional[str] = None, num_images: Optional[int] = None,
                    path: Optional[str] = None, progress: bool = True) -> ReferenceStats:
    """Reference statistics of the training split (all of it, or ``num_images`` of a fixed permutation).

    With ``path`` the file must exist and match (any difference raises). Otherwise the cache file
    ``<cache_dir>/ref_stats_<dataset>_<res>.npz`` is used when its metadata matches, and (re)computed
    and written when it is missing or was made with another extractor / image count.
    """
    wanted = _wanted_metadata(data_cfg, extractor, num_images)
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"reference stats file {path!r} does not exist")
        ref = ReferenceStats.load(path)
        check_reference(ref.metadata, wanted, path, strict=True)
        return ref
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    cpath = os.path.join(cache_dir, f"ref_stats_{dataset_id(data_cfg)}_{int(data_cfg.image_size)}.npz")
    if os.path.isfile(cpath):
        ref = ReferenceStats.load(cpath)
        diff = check_reference(ref.metadata, wanted, cpath, strict=False)
        if not diff:
            return ref
        log.info("reference stats %s were made with other %s; recomputing", cpath, ", ".join(diff))

    from bdm_jax.data import create_source, reference_indices

    t0 = time.time()
    source = create_source(data_cfg, split="train")
    total = len(source)
    idx = reference_indices(total, num_images)
    pr_rows = reference_indices(len(idx), PR_NUM_REFERENCE)
    if len(idx) > 200_000:
        log.warning("computing reference statistics of %d images; pass a smaller num_images to cap it", len(idx))

    def batches() -> Iterator[np.ndarray]:
        from tqdm import tqdm

        for start in tqdm(range(0, len(idx), FEATURE_CHUNK), desc="reference features", unit="chunk",
                          disable=not progress, dynamic_ncols=True):
            part = idx[start:start + FEATURE_CHUNK]
            yield check_samples(source.get_uint8_images(part), data_cfg.image_size, data_cfg.channels,
                                "reference images")

    ex = _extract(extractor, batches(), keep_rows=pr_rows)
    n = ex["count"]
    _enough(n, ex["fid"].dim, "reference images", "FID")
    _enough(n, ex["sfid"].dim, "reference images", "sFID")
    meta = dict(wanted, num_images=n, seconds=round(time.time() - t0, 1))
    ref = ReferenceStats(ex["fid"].mean, ex["fid"].cov, ex["sfid"].mean, ex["sfid"].cov,
                         ex["features"].astype(np.float32), meta)
    ref.save(cpath)
    log.info("reference stats of %d images written to %s (%.0fs)", n, cpath, time.time() - t0)
    return ref


def _enough(n: int, dim: int, what: str, metric: str) -> None:
    if n < dim:
        raise ValueError(f"{metric} needs at least as many {what} as feature dims: got {n} {what} for "
                         f"{dim}-d features (the covariance would be singular); use num_samples >= {dim}")


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------
def compute_metrics(samples: np.ndarray, ref: ReferenceStats, extractor: Any, image_size: int, channels: int,
                    pr_k: int = 3) -> Dict[str, float]:
    """FID, sFID, IS (10 splits), improved precision/recall (k=3) of uint8 samples against ``ref``."""
    samples = check_samples(samples, image_size, channels)
    n = samples.shape[0]
    dim = int(ref.mu.shape[0])
    sdim = int(ref.sfid_mu.shape[0])
    _enough(n, dim, "samples", "FID")
    _enough(n, sdim, "samples", "sFID")
    ex = _extract(extractor, _chunks(samples))
    if ex["fid"].dim != dim:
        raise ValueError(f"reference stats have {dim}-d features but the extractor gives {ex['fid'].dim}-d; "
                         f"they were computed with another feature network")
    fid = metrics.frechet_distance(ex["fid"].mean, ex["fid"].cov, ref.mu, ref.sigma)
    sfid = metrics.frechet_distance(ex["sfid"].mean, ex["sfid"].cov, ref.sfid_mu, ref.sfid_sigma)
    is_mean, is_std = metrics.inception_score(ex["probs"], splits=min(10, n))
    precision, recall = metrics.precision_recall(ref.pr_features, ex["features"], k=pr_k)
    return {"fid": fid, "sfid": sfid, "is": is_mean, "is_std": is_std, "precision": precision, "recall": recall}


def evaluate_samples(samples: Any, data_cfg: Any, *, cache_dir: Optional[str] = None,
                     inception_weights: Optional[str] = None, ref_stats: Optional[str] = None,
                     ref_num_images: Optional[int] = None, progress: bool = True) -> Dict[str, Any]:
    """Metrics of a uint8 sample array (or a samples ``.npz`` path) against the reference statistics of
    the dataset ``data_cfg`` describes (``config.data``)."""
    if isinstance(samples, (str, os.PathLike)):
        samples = load_samples(os.fspath(samples))
    samples = check_samples(samples, data_cfg.image_size, data_cfg.channels)
    extractor = get_extractor(data_cfg, cache_dir, inception_weights)
    ref = reference_stats(data_cfg, extractor, cache_dir, num_images=ref_num_images, path=ref_stats, progress=progress)
    result = compute_metrics(samples, ref, extractor, data_cfg.image_size, data_cfg.channels)
    result.update(num_samples=int(samples.shape[0]), num_reference=int(ref.metadata.get("num_images", 0)),
                  feature_extractor=extractor.metadata())
    return result


def weight_bytes(params: Any, plan: Any = None, masks: Any = None) -> Dict[str, int]:
    """Model size, SPEC §9: a binarized kernel costs 1 bit per weight per active basis; everything else
    (FP layers, scales, biases, norms, LSQ steps) 4 bytes per value. Layers whose ``binarize`` mask is 0
    (not yet binarized) count as FP; a multi-basis layer with ``extra_bases`` 0 (EBB) as one basis.

    Returns {"bytes": total, "fp32_bytes": the same params all in FP32 (only the latent kernels, not the
    binarization scales / LSQ steps, which an FP model lacks), "binarized_weights": count}.
    """
    flat = traverse_util.flatten_dict(jax.device_get(dict(params)))
    mflat = traverse_util.flatten_dict(jax.device_get(dict(masks))) if masks else {}
    bits = 0
    fp_bits = 0
    n_bin = 0
    for key, v in flat.items():
        size = int(np.prod(np.shape(v)))
        path = "/".join(key[:-1])
        spec = plan.get(path) if plan is not None else None
        if key[-1] in ("scales", "act_step"):
            bits += 32 * size
            continue
        fp_bits += 32 * size
        if key[-1] == "kernel" and spec is not None and spec.bases > 0 \
                and float(mflat.get(key[:-1] + ("binarize",), 1.0)) > 0:
            k = spec.bases
            if k > 1 and float(mflat.get(key[:-1] + ("extra_bases",), 1.0)) == 0:
                k = 1
            bits += k * size
            n_bin += size
        else:
            bits += 32 * size
    return {"bytes": (bits + 7) // 8, "fp32_bytes": fp_bits // 8, "binarized_weights": n_bin}


# --------------------------------------------------------------------------------------------------
# a workdir end to end
# --------------------------------------------------------------------------------------------------
def evaluate_workdir(workdir: str, num_samples: Optional[int] = None, batch_size: Optional[int] = None, *,
                     seed: int = 0, sampler: Optional[str] = None, steps: Optional[int] = None,
                     eta: Optional[float] = None, cache_dir: Optional[str] = None,
                     inception_weights: Optional[str] = None, ref_stats: Optional[str] = None,
                     ref_num_images: Optional[int] = None, progress: bool = True,
                     guidance_scale: Optional[float] = None) -> Dict[str, Any]:
    """Samples the newest checkpoint of ``workdir`` (EMA params), measures it against the training
    set's reference statistics, writes and returns ``<workdir>/eval/metrics.json``.

    Unset sampler options come from the run's config (``sample.*``); ``num_samples`` defaults to
    :func:`default_num_samples`; ``batch_size`` (per device) to ``sample.batch_size``. Samples go to
    ``<workdir>/eval/<sampler tag>/samples_<N>.npz`` (resumable shards next to it).
    """
    from bdm_jax.sampling import load_for_sampling, sampler_tag, with_sampler
    from bdm_jax.trainer import Setup

    t0 = time.time()
    cfg, params, masks, step = load_for_sampling(workdir)
    cfg = with_sampler(cfg, sampler, steps, eta, guidance_scale)
    setup = Setup.from_config(cfg)
    num = default_num_samples(cfg) if num_samples is None else num_samples
    bs = cfg.sample.batch_size if batch_size is None else batch_size
    s = cfg.sample
    tag = f"{sampler_tag(cfg)}_eta{s.eta:g}_seed{seed}_step{step}_bs{bs}"
    eval_dir = os.path.join(workdir, "eval")
    out_dir = os.path.join(eval_dir, tag)

    extractor = get_extractor(cfg.data, cache_dir, inception_weights)
    ref = reference_stats(cfg.data, extractor, cache_dir, num_images=ref_num_images, path=ref_stats, progress=progress)
    _enough(num, int(ref.mu.shape[0]), "samples", "FID")  # fail before sampling, not after
    _enough(num, int(ref.sfid_mu.shape[0]), "samples", "sFID")

    t_sample = time.time()
    npz = sample_to_shards(setup, params, masks, out_dir, num, bs, seed, progress=progress,
                           meta={"checkpoint_step": step})
    t_sample = time.time() - t_sample
    samples = load_samples(npz)
    t_feat = time.time()
    result = compute_metrics(samples, ref, extractor, cfg.data.image_size, cfg.data.channels)
    t_feat = time.time() - t_feat
    size = weight_bytes(params, setup.plan, masks)
    images_lib.save_grid(samples[:64], os.path.join(eval_dir, "grid.png"))
    result.update(
        workdir=os.path.abspath(workdir), method=cfg.method, act_bits=int(cfg.quant.act_bits) if setup.quant else 32,
        checkpoint_step=int(step), num_samples=int(num), num_reference=int(ref.metadata.get("num_images", 0)),
        sampler={"sampler": s.sampler, "steps": int(s.steps), "eta": float(s.eta), "seed": int(seed), "batch_size": bs,
                 "guidance_scale": float(s.get("guidance_scale", 1.0))},
        feature_extractor=extractor.metadata(), weight_bytes=size["bytes"], fp32_weight_bytes=size["fp32_bytes"],
        compression=size["fp32_bytes"] / max(size["bytes"], 1), samples_npz=npz,
        grid=os.path.join(eval_dir, "grid.png"),
        seconds={"sampling": round(t_sample, 1), "metrics": round(t_feat, 1), "total": round(time.time() - t0, 1)},
        devices=[str(d) for d in jax.local_devices()],
    )
    os.makedirs(eval_dir, exist_ok=True)
    from bdm_jax.checkpoint import write_json

    write_json(os.path.join(eval_dir, "metrics.json"), _jsonable(result))
    return result


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


# --------------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------------
def _fmt_bytes(n: Optional[float]) -> str:
    """MB = 2^20 bytes, as the paper's size column (and bdm_jax.efficiency) counts."""
    if n is None:
        return "-"
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def compare_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table (readable in a terminal too) of evaluation results.

    Each row: ``name`` plus any of fid, sfid, is, precision, recall, weight_bytes, fp32_weight_bytes
    (missing values print as '-'); the size column also shows the compression against FP32.
    """
    cols = [("model", "name", "{}"), ("FID ↓", "fid", "{:.2f}"), ("sFID ↓", "sfid", "{:.2f}"),
            ("IS ↑", "is", "{:.2f}"), ("precision ↑", "precision", "{:.3f}"), ("recall ↑", "recall", "{:.3f}")]
    header = [c[0] for c in cols] + ["weights"]
    lines = []
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            v = r.get(key)
            cells.append("-" if v is None else fmt.format(v))
        wb, fb = r.get("weight_bytes"), r.get("fp32_weight_bytes")
        size = _fmt_bytes(wb)
        if wb and fb and fb != wb:
            size += f" ({fb / wb:.1f}x smaller)"
        cells.append(size)
        lines.append(cells)
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt_row = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt_row(header), sep] + [fmt_row(l) for l in lines])


def side_by_side(grid_a_path: str, grid_b_path: str, out_path: str,
                 labels: Sequence[str] = ("FP teacher", "BinaryDM")) -> str:
    """Puts two grid PNGs next to each other (white gap, a caption above each) in one PNG."""
    from PIL import Image, ImageDraw

    ims = []
    for p in (grid_a_path, grid_b_path):
        if not os.path.isfile(p):
            raise ValueError(f"grid image {p!r} does not exist")
        ims.append(Image.open(p).convert("RGB"))
    gap, cap = 16, 20
    w = sum(im.width for im in ims) + gap * 3
    h = max(im.height for im in ims) + cap + gap * 2
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for im, label in zip(ims, labels):
        draw.text((x, gap // 2), label, fill="black")
        canvas.paste(im, (x, gap + cap))
        x += im.width + gap
    tmp = out_path + ".tmp.png"
    canvas.save(tmp)
    os.replace(tmp, out_path)
    return out_path


def report_digits(workdir: str, teacher_workdir: Optional[str] = None, num_samples: int = DIGITS_NUM_SAMPLES,
                  batch_size: Optional[int] = None, cache_dir: Optional[str] = None, progress: bool = True) -> str:
    """The digits main job's ending: evaluates the FP teacher and the BinaryDM student, prints the
    comparison table, writes it to ``<workdir>/eval/compare.md`` and both grids side by side to
    ``<workdir>/eval/fp_vs_binarydm.png``. Returns the table."""
    teacher_workdir = teacher_workdir or os.path.join(workdir, "teacher")
    rows = []
    for name, wd in (("FP teacher", teacher_workdir), ("BinaryDM student", workdir)):
        r = evaluate_workdir(wd, num_samples, batch_size, cache_dir=cache_dir, progress=progress)
        if r["method"] != "fp":
            name = f"{r['method']} W1A{r['act_bits']}" if r["method"] != "binarydm" else f"BinaryDM W1A{r['act_bits']}"
        rows.append(dict(r, name=name))
    table = compare_table(rows)
    png = side_by_side(rows[0]["grid"], rows[1]["grid"], os.path.join(workdir, "eval", "fp_vs_binarydm.png"),
                       labels=(rows[0]["name"], rows[1]["name"]))
    with open(os.path.join(workdir, "eval", "compare.md"), "w") as f:
        f.write(table + "\n")
    print(f"\n{table}\n\n({num_samples} samples each, features: {rows[0]['feature_extractor']['extractor']}; "
          f"grids: {png})")
    return table
