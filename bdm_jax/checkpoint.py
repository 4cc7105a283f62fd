"""Orbax checkpoints of the TrainState plus the config as JSON, in `<workdir>/checkpoints`.

Orbax writes each step into a temporary directory and renames it when complete, so a crash or Ctrl-C
mid-save leaves no directory that `all_steps()` returns; resume always starts from a complete step.
Restores go onto an abstract target (shapes, dtypes, shardings), so they work on another topology.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from bdm_jax.config import architecture_dict


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its path and the reason."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, keep: int = 2, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, config: ml_collections.ConfigDict) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())),
        force=True,
    )


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict:
    path = os.path.join(str(mngr.directory), str(step), "config")
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(restored.config)
    except Exception as e:  # orbax raises several types for a missing/garbled item
        raise CheckpointError(f"checkpoint {path} has no readable config ({type(e).__name__}: {e})") from None


def check_architecture(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
    """Stop with one line if the checkpoint was written for another model architecture."""
    want = architecture_dict(config)
    have = saved.get("model", {})
    for key, value in want.items():
        old = have.get(key)
        if isinstance(old, (list, tuple)):
            old = list(old)
        if old != value:
            raise CheckpointError(
                f"checkpoint {where} was written for model.{key}={old!r} but the config says "
                f"model.{key}={value!r}; use another --workdir or the matching config"
            )


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    path = os.path.join(str(mngr.directory), str(step))
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be restored ({type(e).__name__}: {e})") from None
    return restored.state


def load_params(workdir: str, config: ml_collections.ConfigDict, which: str = "ema_params") -> tuple[Any, int]:
    """Params of the newest checkpoint of a run (EMA by default), checked against `config`'s architecture."""
    ckpt = checkpoint_dir(workdir)
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"no checkpoints in {ckpt}: train there first (python train.py --workdir={workdir})")
    mngr = manager(workdir, create=False)
    step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"no complete checkpoint in {ckpt}")
    check_architecture(saved_config(mngr, step), config, os.path.join(ckpt, str(step)))
    path = os.path.join(ckpt, str(step))
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be restored ({type(e).__name__}: {e})") from None
    state = restored.state
    params = state[which] if isinstance(state, dict) else getattr(state, which)
    return jax.tree.map(jax.numpy.asarray, params), step


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (tmp + rename) so a crash never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
