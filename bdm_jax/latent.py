"""Latent diffusion glue (SPEC §7, §11): images -> scaled latents for training, latents -> images after sampling.

The data pipeline keeps yielding images; the train loop maps each batch through `to_latents` before the
step, so the UNet (the only binarized part) trains on `scale_factor * z`. With
`autoencoder.cache_latents` the encoder runs once over the dataset and its moments are memory-mapped
from disk; only the cheap posterior draw and scaling run per step.

    codec = Codec.from_config(cfg)                      # None for pixel-space configs
    x0 = codec.to_latents_fn(cached=False)(codec.params, images, rng)
    images = decode(codec, codec.params, samples)       # inside the jitted sampler
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bdm_jax.autoencoder import Autoencoder, load_params, posterior_latents, random_params
from bdm_jax.data.pipeline import read_examples

log = logging.getLogger("bdm_jax")

# Separates the posterior-noise stream from the other streams keyed on (seed, step).
_POSTERIOR_SALT = 0x1A7E


@dataclasses.dataclass(frozen=True)
class Codec:
    """The frozen first stage and its params (a pytree of arrays, passed into jitted code as an argument)."""

    module: Autoencoder
    params: Any
    scale_factor: float
    sample_posterior: bool

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "Codec | None":
        """Load (or, with an empty path, randomly initialise from cfg.seed) the autoencoder of `cfg`."""
        a = cfg.get("autoencoder")
        if a is None or a.kind == "none":
            return None
        module = Autoencoder.from_config(a, cfg.data.channels)
        if a.path:
            params = load_params(a.path, a, cfg.data.channels)
        else:
            log.warning("config.autoencoder.path is empty: using a RANDOMLY initialised %s autoencoder "
                        "(only meaningful for tests and smoke runs)", a.kind)
            params = random_params(module, cfg.seed)
        return cls(module, params, float(a.scale_factor), bool(a.sample_posterior))

    @property
    def moment_channels(self) -> int:
        return self.module.embed_dim * (2 if self.module.kind == "kl" else 1)

    def encode_moments(self, params: Any, images: jax.Array) -> jax.Array:
        """Images in [-1, 1] -> encoder moments (deterministic; what the latent cache stores)."""
        return self.module.apply({"params": params}, images, method=Autoencoder.encode)

    def latents(self, moments: jax.Array, rng: jax.Array) -> jax.Array:
        """Moments -> UNet inputs: scale_factor * z, z drawn from the posterior for kl (LDM)."""
        z = posterior_latents(self.module.kind, moments, rng, self.sample_posterior)
        return self.scale_factor * z

    def decode(self, params: Any, latents: jax.Array) -> jax.Array:
        """UNet-space latents -> float32 images (unclipped)."""
        return self.module.apply({"params": params}, latents / self.scale_factor, method=Autoencoder.decode)

    def to_latents_fn(self, cached: bool, out_sharding: Any = None) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
        """Jitted (params, images or cached moments, rng) -> latents, for the train loop; `out_sharding`
        pins the latents to the batch sharding the train step expects."""

        def fn(params, x, rng):
            moments = x if cached else self.encode_moments(params, x)
            return self.latents(moments, rng)

        return jax.jit(fn) if out_sharding is None else jax.jit(fn, out_shardings=out_sharding)


def step_rng(seed: int, step: int) -> jax.Array:
    """The posterior-noise key of a training step (a pure function of seed and step, so resumes match)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _POSTERIOR_SALT), step)


# ------------------------------------------------------------------------------------ latent cache
class MomentSource:
    """A data source over cached encoder moments: {"image": float32 moments [h, w, C'], "label": int32}."""

    def __init__(self, moments: np.ndarray, labels: np.ndarray):
        self._moments, self._labels = moments, labels

    def __len__(self) -> int:
        return len(self._moments)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": np.array(self._moments[int(index)]), "label": np.int32(self._labels[int(index)])}

    def get_examples(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, np.int64)
        order = np.argsort(idx)  # memmap reads are fastest in file order
        out = np.empty((len(idx),) + self._moments.shape[1:], np.float32)
        out[order] = self._moments[idx[order]]
        return {"image": out, "label": np.asarray(self._labels[idx], np.int32)}


def cache_key(cfg: ml_collections.ConfigDict) -> str:
    """Hash of everything the cached moments depend on: the data and the autoencoder (and its file)."""
    a = cfg.autoencoder
    stamp = ""
    if a.path:
        info = os.path.join(a.path, "autoencoder.json")
        stamp = str(os.path.getmtime(info)) if os.path.exists(info) else ""
    keep = {k: v for k, v in a.to_dict().items() if k not in ("cache_latents", "cache_dir", "scale_factor",
                                                               "sample_posterior")}
    blob = json.dumps({"data": cfg.data.to_dict(), "ae": keep, "stamp": stamp, "seed": cfg.seed if not a.path else 0},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_source(codec: Codec, source: Any, cfg: ml_collections.ConfigDict, workdir: str,
                  batch_size: int) -> MomentSource:
    """Encode every example of `source` once (or reuse the cache) -> a `MomentSource` over the memmap.

    Written to a temporary file and renamed when complete, so an interrupted run never leaves a partial cache.
    """
    cache_dir = cfg.autoencoder.cache_dir or os.path.join(workdir, "latent_cache")
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"moments_{cache_key(cfg)}.npy")
    labels_path = path[:-4] + "_labels.npy"
    n = len(source)
    if not (os.path.exists(path) and os.path.exists(labels_path)):
        log.info("encoding %d examples into the latent cache %s", n, path)
        encode = jax.jit(codec.encode_moments)
        h = np.asarray(source[0]["image"]).shape[0] // codec.module.factor
        # Per-process temporary names: hosts sharing a workdir each write the same cache, then rename.
        tag = f".{jax.process_index()}.{os.getpid()}.tmp.npy"
        out = np.lib.format.open_memmap(path + tag, mode="w+", dtype=np.float32,
                                        shape=(n, h, h, codec.moment_channels))
        labels = np.empty((n,), np.int32)
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            batch = read_examples(source, idx)
            imgs = batch["image"]
            if len(idx) < batch_size:  # pad the last batch: one compiled shape
                imgs = np.concatenate([imgs, np.repeat(imgs[-1:], batch_size - len(idx), axis=0)])
            out[idx] = np.asarray(encode(codec.params, jnp.asarray(imgs)))[: len(idx)]
            labels[idx] = batch["label"]
        out.flush()
        del out
        np.save(labels_path + tag, labels)
        os.replace(labels_path + tag, labels_path)
        os.replace(path + tag, path)  # last: the moments file marks a complete cache
    moments = np.load(path, mmap_mode="r")
    labels = np.load(labels_path)
    if len(moments) != n:
        raise ValueError(f"latent cache {path} has {len(moments)} examples but the dataset {n}; delete it")
    return MomentSource(moments, labels)
