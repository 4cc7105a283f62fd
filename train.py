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
_REPORT = flags.DEFINE_bool("report", True, "digits QAT runs: evaluate teacher and student and print the table.")
_REPORT_SAMPLES = flags.DEFINE_integer("report_samples", 1000, "Samples per model for the digits report.", lower_bound=2)
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "Multi-process start-up "
                                  "(jax.distributed.initialize); auto: when JAX_COORDINATOR_ADDRESS, srun, mpirun or a "
                                  "TPU slice asks for it (bdm_jax/distributed.py).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from bdm_jax import distributed

    distributed.initialize(_DISTRIBUTED.value)  # before anything touches a device
    from bdm_jax.trainer import train_and_evaluate

    cfg = _CONFIG.value
    result = train_and_evaluate(cfg, _WORKDIR.value)
    logging.info("done: %s", result["workdir"])
    print(f"final step {result['step']}; samples: {result['grid']}")
    if cfg.data.name == "digits" and cfg.method != "fp" and _REPORT.value:
        # The main job ends with FP teacher vs binarized student: FID/IS/P/R with the digits classifier.
        from bdm_jax.evaluation import report_digits

        report_digits(result["workdir"], cfg.teacher_workdir or None, num_samples=_REPORT_SAMPLES.value)


if __name__ == "__main__":
    sys.exit(run_main(main))
