"""Sample a trained (FP or BinaryDM) model from its workdir: a PNG grid and a uint8 .npz.

    python sample.py --workdir=workdirs/digits --num=64
    python sample.py --workdir=workdirs/digits/teacher --sampler=ddpm --out=/tmp/fp_samples
    python sample.py --packed=workdirs/digits/packed --num=64     # 1-bit export (python -m bdm_jax.export)

The model, plan and masks come from the newest checkpoint's saved config; EMA params are used.
"""

import os
import sys

from absl import app, flags

from bdm_jax.cli import run_main

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints/.")
_NUM = flags.DEFINE_integer("num", 64, "Number of samples.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 64, "Samples per batch.", lower_bound=1)
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", ["ddim", "ddpm"], "DDIM or ancestral DDPM.")
_STEPS = flags.DEFINE_integer("steps", 100, "DDIM steps (ignored by ddpm).", lower_bound=1)
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta (0 = deterministic).", lower_bound=0.0)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", lower_bound=0)
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale of a class-conditional model "
                               "with model.uncond_label (default: the run's sample.guidance_scale; 1 = off).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <workdir>/samples or <packed>/../samples).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "Multi-process start-up "
                                  "(jax.distributed.initialize); auto: when JAX_COORDINATOR_ADDRESS, srun, mpirun or a "
                                  "TPU slice asks for it (bdm_jax/distributed.py).")
_PACKED = flags.DEFINE_string("packed", None, "Packed 1-bit checkpoint (python -m bdm_jax.export) to sample "
                              "instead of --workdir; same samples as the training model for the same seed.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (_WORKDIR.value is None) == (_PACKED.value is None):
        raise app.UsageError("give exactly one of --workdir or --packed")
    from bdm_jax import distributed

    distributed.initialize(_DISTRIBUTED.value)  # before anything touches a device
    kw = dict(num=_NUM.value, batch_size=_BATCH.value, sampler=_SAMPLER.value, steps=_STEPS.value, eta=_ETA.value,
              seed=_SEED.value, progress=True, guidance_scale=_GUIDANCE.value)
    if _PACKED.value:
        from bdm_jax.export import sample_packed

        out = _OUT.value or os.path.join(os.path.dirname(os.path.abspath(_PACKED.value)), "samples")
        result = sample_packed(_PACKED.value, out, **kw)
    else:
        from bdm_jax.sampling import sample_workdir

        out = _OUT.value or os.path.join(_WORKDIR.value, "samples")
        result = sample_workdir(_WORKDIR.value, out, **kw)
    print(f"wrote {result['grid']} and {result['npz']}")


if __name__ == "__main__":
    sys.exit(run_main(main))
