"""Orbax checkpoints of the TrainState plus the config as JSON, in `<workdir>/checkpoints`.

Orbax writes each step into a temporary directory and renames it when complete, so a crash or Ctrl-C
mid-save leaves no directory that `all_steps()` returns; resume always starts from a complete step
(`reliability.Resume` names and removes such leftovers, and checks the checkpoint it resumes from).
Restores go onto an abstract target (shapes, dtypes, shardings), so they work on another topology.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from bdm_jax.config import ADDED_MODEL_FIELDS, architecture_dict


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its path and the reason."""


class CheckpointWriteError(CheckpointError):
    """A save failed (disk full, unwritable directory); the newest complete checkpoint is intact."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, keep: int = 2, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, config: ml_collections.ConfigDict) -> None:
    """Start an async save of `step`; a failure (this save's start or the previous one's commit, e.g. disk
    full, unwritable directory) raises CheckpointError naming the newest complete checkpoint, intact."""
    try:
        mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())),
            force=True,
        )
    except Exception as e:  # noqa: BLE001 - OSError, orbax and tensorstore errors alike
        raise _write_error(mngr, e) from None


def finish(mngr: ocp.CheckpointManager) -> None:
    """Wait for in-flight saves; a failed one raises CheckpointError like `save`."""
    try:
        mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        raise _write_error(mngr, e) from None


def _drop_closed_loop_noise() -> None:
    """When a restore fails, orbax's still-pending tensorstore reads complete into its closed asyncio loop:
    each raises RuntimeError('Event loop is closed') into sys.unraisablehook, and each dropped future makes
    asyncio log "... exception was never retrieved": hundreds of tracebacks around our one-line reason.
    Drop exactly those, for the rest of the process."""
    previous = sys.unraisablehook
    if getattr(previous, "bdm_drops_closed_loop", False):
        return

    def hook(unraisable: Any) -> None:
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook.bdm_drops_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: not str(record.msg).split("\n", 1)[0].endswith("exception was never retrieved"))


def error_reason(e: BaseException) -> str:
    """`Type: message` of the innermost cause, first line, short (orbax wraps tensorstore's real reason)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = re.sub(r"\s*\[tensorstore_spec.*$", "", msg.split(" See full TensorStore details")[0])
    if len(msg) > 300:  # tensorstore nests "what: where: ...: root cause"; keep both ends
        msg = f"{msg[:130]} ... {msg[-160:]}"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _write_error(mngr: ocp.CheckpointManager, e: BaseException) -> CheckpointWriteError:
    ckpt = str(mngr.directory)
    done = sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) if os.path.isdir(ckpt) else []
    kept = (f"the newest complete checkpoint {os.path.join(ckpt, str(done[-1]))} is intact" if done
            else "no complete checkpoint was written yet")
    return CheckpointWriteError(f"could not write a checkpoint in {ckpt} ({error_reason(e)}); {kept}; "
                           "free disk space or fix the directory's permissions, then run again to resume")


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict:
    path = os.path.join(str(mngr.directory), str(step), "config")
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(restored.config)
    except Exception as e:  # orbax raises several types for a missing/garbled item
        raise CheckpointError(f"checkpoint {path} has no readable config ({error_reason(e)})") from None


def check_architecture(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
    """Stop with one line if the checkpoint was written for another model architecture."""
    want = architecture_dict(config)
    have = saved.get("model", {})
    for key, value in want.items():
        # A field the saved config predates has the value the code that wrote it used.
        old = have.get(key, ADDED_MODEL_FIELDS.get(key))
        if isinstance(old, (list, tuple)):
            old = list(old)
        if old != value:
            raise CheckpointError(
                f"checkpoint {where} was written for model.{key}={old!r} but the config says "
                f"model.{key}={value!r}; use another --workdir or the matching config"
            )


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    path = os.path.join(str(mngr.directory), str(step))
    _drop_closed_loop_noise()  # before: the noise starts while the failing restore is still running
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be restored ({error_reason(e)})") from None
    return restored.state


def saved_state_target(mngr: ocp.CheckpointManager, step: int, mesh: Any = None,
                       fsdp_min_size: int | None = None) -> Any:
    """Restore target for `step`'s whole saved state, whatever topology wrote it (issue 5).

    Shapes and dtypes come from the checkpoint's metadata; shardings from the state rule on `mesh`
    (default: all devices, replicated). Without a target orbax refuses a checkpoint written on another
    device count ("Topology mismatch").
    """
    from etils import epath

    from bdm_jax import sharding

    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(str(mngr.directory)) / str(step) / "state")
    tree = getattr(meta, "tree", meta)
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
    mesh = mesh if mesh is not None else sharding.create_mesh({"data": -1, "fsdp": 1})
    min_size = sharding.FSDP_MIN_SIZE if fsdp_min_size is None else fsdp_min_size
    return sharding.with_shardings(abstract, sharding.state_shardings(abstract, mesh, min_size))


def load_params(workdir: str, config: ml_collections.ConfigDict, which: str = "ema_params", mesh: Any = None,
                fsdp_min_size: int | None = None) -> tuple[Any, int]:
    """Params of the newest checkpoint of a run (EMA by default), checked against `config`'s architecture,
    placed on `mesh` by the state rule (default: replicated on all devices) whatever topology saved them."""
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
        target = saved_state_target(mngr, step, mesh, fsdp_min_size)
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be restored ({error_reason(e)})") from None
    finally:
        mngr.close()
    state = restored.state
    params = state[which] if isinstance(state, dict) else getattr(state, which)
    return jax.tree.map(jax.numpy.asarray, params), step


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (tmp + rename) so a crash never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
