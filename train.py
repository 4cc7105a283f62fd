"""Train a diffusion UNet (FP) or binarize one with BinaryDM (QAT).

    python train.py --config=configs/digits.py --workdir=workdirs/digits
    python train.py --config=configs/ddpm_cifar10.py --workdir=w/fp --config.train.steps=1000

Any config field can be overridden with --config.<field>=<value> (see configs/default.py). A workdir
with checkpoints is resumed from its newest complete one. Metrics go to <workdir>/metrics.jsonl,
sample grids to <workdir>/samples/, checkpoints to <workdir>/checkpoints/.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bdm_jax.cli import run_main

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from bdm_jax.trainer import train_and_evaluate

    result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("done: %s", result["workdir"])
    print(f"final step {result['step']}; samples: {result['grid']}")


if __name__ == "__main__":
    sys.exit(run_main(main))
