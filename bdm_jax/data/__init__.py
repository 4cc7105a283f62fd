"""Data for bdm-jax: random-access sources and step-indexed, resumable batching.

    source = create_source(config.data, split="train")       # digits | synthetic | folder | tfds:<name>
    batch = get_batch(source, step, global_batch_size=B, seed=s, random_flip=True,
                      process_index=jax.process_index(), process_count=jax.process_count())

`get_batch` is a pure function of (step, seed, batch size, dataset size): a resumed run reads exactly the
batches an uninterrupted run would have. `import bdm_jax.data` does not import tensorflow_datasets (only a
`tfds:` source does) nor JAX.
"""

from bdm_jax.data.pipeline import (
    Prefetcher,
    Source,
    batch_indices,
    flip_mask,
    get_batch,
    host_slice,
)
from bdm_jax.data.sources import (
    DigitsSource,
    FolderSource,
    SyntheticSource,
    create_source,
    dataset_info,
    load_reference_images,
    reference_indices,
)

__all__ = [
    "DigitsSource",
    "FolderSource",
    "Prefetcher",
    "Source",
    "SyntheticSource",
    "batch_indices",
    "create_source",
    "dataset_info",
    "flip_mask",
    "get_batch",
    "host_slice",
    "load_reference_images",
    "reference_indices",
]
