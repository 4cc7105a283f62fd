"""Multi-process start-up: `jax.distributed.initialize()` when the environment asks for it (issue 5).

JAX runs one process per host (or per GPU); every process runs the same `train.py` and they meet at
the coordinator before any device is touched. `initialize(mode)` is called first thing by train.py and
sample.py (flag `--distributed=auto|on|off`):

- `auto` (default) initializes only when the environment describes more than one process:
  `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; any launcher),
  SLURM with more than one task in the `srun` step, Open MPI with more than one rank (`mpirun`), or a GKE TPU
  slice with several workers (`TPU_WORKER_HOSTNAMES`). A single process does nothing.
- `on` always calls it (JAX then finds Cloud TPU VM pods, SLURM, Open MPI or K8s itself); use it on
  Cloud TPU VM pod slices, where initialization is optional but recommended.
- `off` never calls it.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

log = logging.getLogger("bdm_jax")

MODES = ("auto", "on", "off")


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def detect(env: Mapping[str, str] | None = None) -> tuple[str | None, dict]:
    """(why, kwargs for jax.distributed.initialize) if `env` describes several processes, else (None, {})."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kw = {}
        n, pid = _int_env(env, "JAX_NUM_PROCESSES"), _int_env(env, "JAX_PROCESS_ID")
        if n is not None:
            kw["num_processes"] = n
        if pid is not None:
            kw["process_id"] = pid
        return "JAX_COORDINATOR_ADDRESS", kw  # jax reads the address itself
    slurm = _int_env(env, "SLURM_STEP_NUM_TASKS")  # set by srun; not in a plain sbatch script
    if env.get("SLURM_JOB_ID") and slurm and slurm > 1:
        return f"SLURM ({slurm} tasks)", {}
    ompi = _int_env(env, "OMPI_COMM_WORLD_SIZE")
    if ompi and ompi > 1:
        return f"Open MPI ({ompi} ranks)", {}
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if hosts.count(",") >= 1:
        return f"TPU slice ({hosts.count(',') + 1} workers)", {}
    return None, {}


def initialize(mode: str = "auto", env: Mapping[str, str] | None = None) -> bool:
    """Call `jax.distributed.initialize` per `mode` (see the module docstring); True if it was called.

    Must run before anything creates a JAX array or asks for devices.
    """
    if mode not in MODES:
        raise ValueError(f"--distributed={mode!r} is not allowed: one of {', '.join(MODES)}")
    if mode == "off":
        return False
    import jax

    if jax.distributed.is_initialized():
        return True
    why, kw = detect(env)
    if mode == "auto" and why is None:
        return False
    log.info("jax.distributed.initialize (%s)", why or "--distributed=on")
    jax.distributed.initialize(**kw)
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True
