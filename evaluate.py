"""Measure a trained model the way the paper does (SPEC §8): FID, sFID, IS, precision/recall, size.

    python evaluate.py --workdir=workdirs/digits                      # 2,000 samples, digits classifier
    python evaluate.py --workdir=w/cifar --num_samples=50000 --batch_size=500 \\
        --inception_weights=pt_inception-2015-12-05-6726825d.pth       # 50k samples, FID Inception
    python evaluate.py --workdir=w/cifar --samples=my_samples.npz      # metrics of existing samples

Samples of the newest checkpoint (EMA params) are drawn in resumable shards under <workdir>/eval/
(a rerun continues where it stopped), sharded over all local devices; reference statistics of the
training set are computed once and cached in --cache_dir. Results: <workdir>/eval/metrics.json.
Feature network: the digits classifier for data.name=digits, the FID Inception-v3 otherwise (weights:
pt_inception-2015-12-05-6726825d.pth from
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth).
"""

import json
import os
import sys

from absl import app, flags

from bdm_jax.cli import run_main

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints/, config.json).")
_NUM = flags.DEFINE_integer("num_samples", None, "Samples to draw (default: 50,000; 2,000 for digits).", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", None, "Samples per device per batch = per shard "
                              "(default: sample.batch_size).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", lower_bound=0)
_SAMPLER = flags.DEFINE_enum("sampler", None, ["ddim", "ddpm"], "Sampler (default: the run's sample.sampler).")
_STEPS = flags.DEFINE_integer("steps", None, "DDIM steps (default: the run's sample.steps; the paper uses 100).",
                              lower_bound=1)
_ETA = flags.DEFINE_float("eta", None, "DDIM eta (default: the run's sample.eta).", lower_bound=0.0)
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (default: the run's "
                               "sample.guidance_scale; 1 = off).")
_CACHE = flags.DEFINE_string("cache_dir", None, "Reference statistics / classifier cache (default: $BDM_CACHE_DIR "
                             "or ~/.cache/bdm_jax).")
_INCEPTION = flags.DEFINE_string("inception_weights", None, "FID Inception weights (.pth or converted .npz); "
                                 "default $BDM_INCEPTION_WEIGHTS.")
_REF = flags.DEFINE_string("ref_stats", None, "Use this reference statistics file instead of the cache.")
_REF_NUM = flags.DEFINE_integer("ref_num_images", None, "Cap the reference set (default: the whole training split).",
                                lower_bound=1)
_SAMPLES = flags.DEFINE_string("samples", None, "Evaluate this samples .npz (key 'images' or 'arr_0') instead of "
                               "sampling the checkpoint; the dataset comes from <workdir>/config.json.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from bdm_jax import evaluation

    common = dict(cache_dir=_CACHE.value, inception_weights=_INCEPTION.value, ref_stats=_REF.value,
                  ref_num_images=_REF_NUM.value)
    if _SAMPLES.value:
        import ml_collections

        from bdm_jax.checkpoint import write_json

        cfg_path = os.path.join(_WORKDIR.value, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"--samples needs the run's config: {cfg_path} does not exist")
        with open(cfg_path) as f:
            data_cfg = ml_collections.ConfigDict(json.load(f)).data
        result = evaluation.evaluate_samples(_SAMPLES.value, data_cfg, **common)
        out = os.path.join(os.path.dirname(os.path.abspath(_SAMPLES.value)), "metrics.json")
        write_json(out, result)
    else:
        result = evaluation.evaluate_workdir(
            _WORKDIR.value, _NUM.value, _BATCH.value, seed=_SEED.value, sampler=_SAMPLER.value, steps=_STEPS.value,
            eta=_ETA.value, guidance_scale=_GUIDANCE.value, **common)
        out = os.path.join(_WORKDIR.value, "eval", "metrics.json")
    print(evaluation.compare_table([dict(result, name=result.get("method", "samples"))]))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
