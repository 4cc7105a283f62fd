"""TensorFlow-Datasets sources (`data.name = "tfds:<name>"`), read WITHOUT TensorFlow.

Reading uses `tfds.data_source` / `builder.as_data_source`: random access into ArrayRecord files, with
examples deserialised by tfds' protobuf parser and images decoded by PIL. Only the `tensorflow-datasets`
package is needed at training time (its deps: array_record, protobuf, etc.); TensorFlow is NOT imported.
This module itself is imported only when a tfds source is requested, so `import bdm_jax.data` stays light.

Preparing a dataset (once, on a machine with TensorFlow and internet; the data must be ArrayRecord):

    pip install tensorflow tensorflow-datasets
    tfds build cifar10 --data_dir=/data/tfds --file_format=array_record
    # datasets with manual downloads also take --manual_dir=/path/to/the/downloaded/archives

then copy /data/tfds to the training machine and set `data.data_dir=/data/tfds`. A dataset prepared in
the default TFRecord format cannot be read randomly: rebuild it with `--file_format=array_record`.

The paper's datasets (names as registered in tensorflow-datasets 4.9.x):

| paper             | data.name                    | image_size | num_classes | notes                                   |
| ----------------- | ---------------------------- | ---------- | ----------- | --------------------------------------- |
| CIFAR-10          | tfds:cifar10                 | 32         | 0 or 10     | splits train/test                       |
| LSUN Bedroom      | tfds:lsun/bedroom            | 256        | 0           | splits train/validation (JPEG)          |
| LSUN Church       | tfds:lsun/church_outdoor     | 256        | 0           | splits train/validation (JPEG)          |
| CelebA-HQ         | tfds:celeb_a_hq/256          | 256        | 0           | manual download (--manual_dir)          |
| FFHQ              | folder (not in tfds)         | 256        | 0           | point data.data_dir at the PNG folder   |
| ImageNet          | tfds:imagenet2012            | 256 (or 64)| 1000        | manual download of the ILSVRC2012 tars  |

Each example is center-cropped to a square and bicubic-resized to `data.image_size`; with
`data.num_classes > 0` the dataset's `label` feature is used (its class count must match).
Per-host sharding is done by `get_batch` (each host reads only its block of every global batch), so
every host opens the whole split; no `tfds.split_for_jax_process` is needed.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from bdm_jax.data.sources import (
    DecodedSource,
    _image_channels,
    _num_classes,
    _positive_int,
    array_to_pil,
    cfg_get,
    to_uint8_image,
)

PAPER_DATASETS = {
    "cifar10": "tfds:cifar10",
    "lsun_bedroom": "tfds:lsun/bedroom",
    "lsun_church": "tfds:lsun/church_outdoor",
    "celeba_hq": "tfds:celeb_a_hq/256",
    "ffhq": "folder",
    "imagenet": "tfds:imagenet2012",
}


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ValueError(
            f"data.name='tfds:...' needs the tensorflow-datasets package (pip install tensorflow-datasets; "
            f"TensorFlow itself is not needed): {e}"
        ) from None
    return tfds


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return (text[:limit] + "...") if len(text) > limit else text


def _prepare_hint(name: str) -> str:
    return (
        f"prepare it on a machine with TensorFlow and internet: `tfds build {name} --data_dir=DIR "
        "--file_format=array_record` (add --manual_dir=... for manually downloaded data), then set data.data_dir=DIR"
    )


def _split_names(split: str) -> list[str]:
    """Base split names of a tfds split expression, e.g. 'train[:90%]+test' -> ['train', 'test']."""
    return [p.strip() for p in re.sub(r"\[[^\]]*\]", "", split).split("+") if p.strip()]


class TfdsSource(DecodedSource):
    """`tfds:<name>` (e.g. tfds:cifar10, tfds:lsun/bedroom, tfds:imagenet2012) via `builder.as_data_source`."""

    def __init__(self, cfg: Any, split: str = "train"):
        tfds = _import_tfds()
        full = cfg_get(cfg, "name")
        name = full[len("tfds:") :]
        if not name:
            raise ValueError(f"data.name={full!r} must name a dataset after 'tfds:' (e.g. 'tfds:cifar10')")
        data_dir = cfg_get(cfg, "data_dir", None) or None
        if data_dir is not None:
            data_dir = os.path.expanduser(str(data_dir))
        self._size = _positive_int(cfg, "image_size")
        self._channels = _image_channels(cfg)
        num_classes = _num_classes(cfg)

        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(
                f"data.name={full!r}: tensorflow-datasets has no dataset {name!r} "
                "(e.g. tfds:cifar10, tfds:lsun/bedroom, tfds:lsun/church_outdoor, tfds:celeb_a_hq/256, tfds:imagenet2012)"
            ) from None
        except Exception as e:  # noqa: BLE001 - bad config / version: one clear line
            raise ValueError(f"data.name={full!r}: could not create the tfds builder: {_one_line(e)}") from None
        self.builder = builder

        features = builder.info.features
        if "image" not in features:
            raise ValueError(f"data.name={full!r}: the dataset has no 'image' feature (features: {list(features.keys())})")
        self._use_label = num_classes > 0
        if self._use_label:
            if "label" not in features:
                raise ValueError(
                    f"data.num_classes={num_classes} but data.name={full!r} has no 'label' feature; set data.num_classes=0"
                )
            have = getattr(features["label"], "num_classes", None)
            if have is not None and have != num_classes:
                raise ValueError(f"data.num_classes={num_classes} but data.name={full!r} has {have} classes")

        known = list(builder.info.splits.keys())  # empty when the data is not prepared (or mocked)
        if known:
            missing = [s for s in _split_names(split) if s not in known]
            if missing or not _split_names(split):
                raise ValueError(f"split={split!r} does not exist for data.name={full!r}; available: {sorted(known)}")
        try:
            self._ds = builder.as_data_source(split=split)
        except Exception as e:  # noqa: BLE001 - map every failure to one actionable line
            if not builder.is_prepared():
                raise ValueError(
                    f"data.name={full!r} is not prepared under data.data_dir={data_dir!r} "
                    f"(looked in {builder.data_dir}); {_prepare_hint(name)}"
                ) from None
            if isinstance(e, NotImplementedError):
                raise ValueError(
                    f"data.name={full!r} in data.data_dir={data_dir!r} is not in ArrayRecord format (random access "
                    f"needs it); rebuild: `tfds build {name} --data_dir=DIR --file_format=array_record`"
                ) from None
            raise ValueError(f"data.name={full!r} split={split!r}: {_one_line(e)}") from None
        if len(self._ds) == 0:
            raise ValueError(f"split={split!r} of data.name={full!r} is empty")
        self.name, self.split = name, split

    def __len__(self) -> int:
        return len(self._ds)

    def _example_uint8(self, index: int) -> tuple[np.ndarray, int]:
        ex = self._ds[index]
        img = to_uint8_image(array_to_pil(np.asarray(ex["image"])), self._size, self._channels)
        return img, int(ex["label"]) if self._use_label else 0

    def _uint8(self, index: int) -> np.ndarray:
        return self._example_uint8(index)[0]

    def _label(self, index: int) -> int:
        return self._example_uint8(index)[1]
