"""Long runs that survive preemption, kills, bad checkpoints and non-finite steps (issue 10).

What the training loop (trainer.py) gets from here:

- `RunGuard(mngr)`: SIGTERM (one process) or orbax's preemption sync point (multi-host, where the JAX
  preemption service runs) asks the loop to finish its step, save, flush metrics and raise `Preempted`,
  which the CLI turns into one line and exit 0. On any exit it waits for in-flight async saves, so no
  exception leaves a half-written checkpoint behind a live process.
- `Resume(mngr, cfg)`: the checkpoint a run starts from. Interrupted saves (orbax's
  `<step>.orbax-checkpoint-tmp*` dirs, left by a kill mid-save) are named in a warning and removed, never
  loaded. A complete checkpoint that cannot be used (unreadable config, other architecture, truncated or
  missing array data) stops the run with its path and the reason (`config.resume=latest`), or with
  `config.resume=latest_good` is moved to `<workdir>/checkpoints_rejected/` and the previous one is tried.
- `check_finite(rows, last_step)`: the first step whose loss terms or gradient norm are not finite stops
  the run (`NonFiniteError`, naming the step, every term and the non-finite ones). It runs at every log
  and before every save, so no checkpoint ever holds a non-finite state.
- `run_with_rollback(run, cfg, workdir)`: with `train.nan_policy=rollback`, a non-finite step restarts
  the run from its last checkpoint with that step's batch skipped (`<workdir>/skipped_batches.json`).
- `batches(...)`: the batches of steps `start..total-1`, minus skipped ones.
- `trim_metrics(path, step)`: metrics.jsonl keeps exactly the rows of the steps the checkpoint has seen.

Data order: the batch of training step s is `get_batch(source, d(s))`, a pure function of the data step
d(s) (data/pipeline.py); d(s) = s unless batches were skipped by a rollback, and the skip list is stored
in the workdir. So a run resumed after a kill or preemption reads the batches an uninterrupted run reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np

from bdm_jax import checkpoint as ckpt_lib
from bdm_jax import data as data_lib

log = logging.getLogger("bdm_jax")

PARTIAL_MARK = ".orbax-checkpoint-tmp"  # orbax writes <step>.orbax-checkpoint-tmp*, renames when complete
REJECTED_DIR = "checkpoints_rejected"
SKIPPED_FILE = "skipped_batches.json"
MAX_SKIPPED = 10  # rollbacks per workdir before a non-finite run is called diverged, not unlucky
MAX_SKIPPED_SAME_STEP = 3


class Preempted(Exception):
    """The run stopped on SIGTERM or a preemption notice after saving; running it again resumes."""

    def __init__(self, step: int, path: str, why: str):
        self.step, self.path = step, path
        super().__init__(f"{why}: stopped at step {step} with a checkpoint in {path}; "
                         "run the same command again to resume")


class NonFiniteError(FloatingPointError):
    """A loss term or the gradient norm is NaN/inf at `step` (the count of updates including it)."""

    def __init__(self, step: int, terms: dict, bad: list[str], hint: str = ""):
        self.step, self.terms, self.bad = step, terms, bad
        values = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        super().__init__(f"non-finite {', '.join(bad)} at step {step} ({values}){hint}")


# ------------------------------------------------------------------------------------------ stop signals


class RunGuard:
    """Context manager around the training loop: stop requests, and no save left in flight on exit.

    SIGTERM is only caught in a single-process run: with `jax.distributed`, JAX's preemption service owns
    SIGTERM and every host learns of it at the same step through `mngr.reached_preemption(step)`, which
    must be (and is) polled by all hosts at every step. A second SIGTERM kills the process at once.
    """

    def __init__(self, mngr: Any, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._mngr = mngr
        self._signals = signals
        self._previous: dict[int, Any] = {}
        self.reason: str | None = None
        self._signum: int | None = None

    def __enter__(self) -> "RunGuard":
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signum is not None:  # asked twice: stop now, as without the guard
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._signum = signum  # only a flag: the loop logs and acts between steps

    def should_stop(self, step: int) -> bool:
        """True once a stop was requested; call once per step with the step count (same on all hosts)."""
        if self.reason is None:
            if self._signum is not None:
                self.reason = f"{signal.Signals(self._signum).name} received"
            elif self._mngr.reached_preemption(step):
                self.reason = "preemption notice"
            if self.reason is not None:
                log.warning("%s: finishing step %d, saving a checkpoint and exiting", self.reason, step)
        return self.reason is not None

    def preempted(self, step: int) -> Preempted:
        """The exception to raise after the stop checkpoint of `step` was saved (waits for it)."""
        ckpt_lib.finish(self._mngr)
        return Preempted(step, os.path.join(str(self._mngr.directory), str(step)), self.reason or "stopped")

    def __exit__(self, exc_type, exc, tb) -> bool:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}
        if exc_type is None:
            ckpt_lib.finish(self._mngr)  # a failed async save is reported here, not lost
        else:
            try:  # finish the in-flight save so a restart (or rollback) sees it complete
                self._mngr.wait_until_finished()
            except Exception as e:  # noqa: BLE001 - the original exception is the one to report
                log.warning("an in-flight checkpoint save also failed: %s", ckpt_lib.error_reason(e))
        return False


# ------------------------------------------------------------------------------------------ checkpoints


def partial_saves(ckpt_dir: str) -> list[str]:
    """Paths of interrupted saves (orbax temporary step directories) in `ckpt_dir`."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if PARTIAL_MARK in n)


def remove_partial_saves(ckpt_dir: str, is_main: bool = True) -> list[str]:
    """Warn about and (on the main process) delete every interrupted save; returns their paths."""
    found = partial_saves(ckpt_dir)
    for path in found:
        log.warning("skipping partial checkpoint %s (a save that never completed, e.g. killed mid-save)", path)
        if is_main:
            shutil.rmtree(path, ignore_errors=True)
    return found


class Resume:
    """The checkpoint a run resumes from: newest complete one, checked; see the module docstring.

    `Resume(mngr, cfg).step` is decided before the model is built (config and architecture of the newest
    checkpoint, so a wrong config fails fast); `.restore(abstract)` then restores it, falling back to
    older ones under `resume=latest_good`. `.partial` and `.rejected` list what was skipped.
    """

    def __init__(self, mngr: Any, cfg: Any, is_main: bool | None = None):
        self.mngr = mngr
        self.cfg = cfg
        self.policy = cfg.get("resume", "latest")
        self.is_main = jax.process_index() == 0 if is_main is None else is_main
        self.ckpt_dir = str(mngr.directory)
        self.partial = remove_partial_saves(self.ckpt_dir, self.is_main)
        self.rejected: list[tuple[int, str]] = []  # (step, reason)
        self._candidates = sorted(mngr.all_steps(), reverse=True)
        self.step = self._next_with_good_config()

    def _path(self, step: int) -> str:
        return os.path.join(self.ckpt_dir, str(step))

    def _reject(self, step: int, error: Exception, hint: str) -> None:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if self.policy != "latest_good":
            raise ckpt_lib.CheckpointError(f"{reason}{hint}") from None
        log.warning("%s; trying the previous checkpoint (resume=latest_good)", reason)
        self.rejected.append((step, reason))

    def _next_with_good_config(self) -> int | None:
        while self._candidates:
            step = self._candidates.pop(0)
            try:
                saved = ckpt_lib.saved_config(self.mngr, step)
                ckpt_lib.check_architecture(saved, self.cfg, self._path(step))
                return step
            except ckpt_lib.CheckpointError as e:
                mismatch = "was written for model." in str(e)
                self._reject(step, e, "" if mismatch else _FALLBACK_HINT)
        if self.rejected:
            raise ckpt_lib.CheckpointError(
                f"no usable checkpoint in {self.ckpt_dir}: "
                + "; ".join(f"step {s}: {r}" for s, r in self.rejected)
                + "; move them away to start from scratch"
            )
        return None

    def restore(self, abstract: Any) -> tuple[Any, int]:
        """(state, step) of the newest usable checkpoint; rejected newer ones are moved aside."""
        while self.step is not None:
            try:
                state = ckpt_lib.restore_state(self.mngr, self.step, abstract)
                break
            except ckpt_lib.CheckpointError as e:
                self._reject(self.step, e, _FALLBACK_HINT)
                self.step = self._next_with_good_config()
        if self.step is None:
            raise ckpt_lib.CheckpointError(f"no usable checkpoint in {self.ckpt_dir}")  # unreachable: raised above
        if self.rejected and self.is_main:
            self._move_rejected()
        return state, self.step

    def _move_rejected(self) -> None:
        """Out of orbax's way (a later save of the same step would collide), kept for inspection."""
        dest_root = os.path.join(os.path.dirname(self.ckpt_dir), REJECTED_DIR)
        os.makedirs(dest_root, exist_ok=True)
        for step, _ in self.rejected:
            dest, n = os.path.join(dest_root, str(step)), 1
            while os.path.exists(dest):
                dest, n = os.path.join(dest_root, f"{step}.{n}"), n + 1
            os.replace(self._path(step), dest)
            log.warning("moved unusable checkpoint %s to %s; resuming from step %d", self._path(step), dest, self.step)
        self.mngr.reload()


_FALLBACK_HINT = "; run with --config.resume=latest_good to fall back to the previous good checkpoint"


# ------------------------------------------------------------------------------------------ non-finite


def check_finite(rows: list[dict], last_step: int, hint: bool = True) -> None:
    """Raise NonFiniteError for the first of `rows` (metrics of steps last_step-len+1 .. last_step) that
    has a NaN/inf value; the message names the step, every term and the non-finite ones."""
    for i, row in enumerate(rows):
        names = sorted(row, key=lambda k: (k != "loss", k))  # the total first, then the terms by name
        terms = {k: float(np.mean(row[k])) for k in names}
        bad = [k for k in names if not np.all(np.isfinite(row[k]))]
        if bad:
            extra = ("; --config.train.nan_policy=rollback goes back to the last checkpoint and skips the batch"
                     if hint else "")
            raise NonFiniteError(last_step - len(rows) + 1 + i, terms, bad, extra)


def skipped_data_steps(workdir: str) -> list[int]:
    """Data steps whose batches a rollback skipped (sorted), from `<workdir>/skipped_batches.json`."""
    path = os.path.join(workdir, SKIPPED_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return sorted(int(e["data_step"]) for e in json.load(f))


def data_step(step: int, skipped: list[int]) -> int:
    """The data step that training step `step` (0-based) reads: the step-th one not skipped."""
    d = step
    for k in sorted(skipped):
        if k <= d:
            d += 1
    return d


@contextlib.contextmanager
def batches(source: Any, start: int, total: int, workdir: str, **batch_kw: Any) -> Iterator[Iterator[dict]]:
    """Prefetched batches of training steps start..total-1 (data_lib.Prefetcher), skipped batches left out."""
    skipped = skipped_data_steps(workdir)
    if not skipped or start >= total:
        with data_lib.Prefetcher(source, start, total, **batch_kw) as it:
            yield it
        return
    first, end = data_step(start, skipped), data_step(total - 1, skipped) + 1
    drop = set(skipped)
    with data_lib.Prefetcher(source, first, end, **batch_kw) as it:
        yield (b for d, b in zip(range(first, end), it) if d not in drop)


def run_with_rollback(run: Callable[[Any, str], dict], cfg: Any, workdir: str) -> dict:
    """`run(cfg, workdir)`; under `train.nan_policy=rollback` a NonFiniteError adds the bad step's batch to
    the skip list and runs again, which resumes from the last checkpoint (always finite: saves are
    checked). Stops when the same step fails MAX_SKIPPED_SAME_STEP times or after MAX_SKIPPED skips."""
    while True:
        try:
            return run(cfg, workdir)
        except NonFiniteError as e:
            if cfg.train.get("nan_policy", "stop") != "rollback":
                raise
            _record_skip(os.path.abspath(workdir), e)


def _record_skip(workdir: str, e: NonFiniteError) -> None:
    path = os.path.join(workdir, SKIPPED_FILE)
    entries = []
    if os.path.exists(path):
        with open(path) as f:
            entries = json.load(f)
    same = sum(1 for x in entries if x["step"] == e.step)
    if len(entries) >= MAX_SKIPPED or same >= MAX_SKIPPED_SAME_STEP:
        why = (f"step {e.step} was non-finite with {same + 1} different batches"
               if same >= MAX_SKIPPED_SAME_STEP else f"{len(entries)} batches were skipped already")
        raise NonFiniteError(e.step, e.terms, e.bad, f"; {why} (see {path}): the run diverges, lower train.lr")
    d = data_step(e.step - 1, sorted(x["data_step"] for x in entries))
    entries.append({"step": e.step, "data_step": d, "terms": e.terms, "non_finite": e.bad})
    if jax.process_index() == 0:
        ckpt_lib.write_json(path, entries)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("bdm_jax_rollback")
    log.warning("non-finite %s at step %d: rolling back to the last checkpoint and skipping batch %d (%s)",
                ", ".join(e.bad), e.step, d, path)


# ------------------------------------------------------------------------------------------ metrics


def trim_metrics(path: str, step: int) -> int:
    """Keep the rows of metrics.jsonl up to `step` (those a resumed run will not write again) and drop a
    line cut short by a kill; returns how many rows were dropped. Atomic (tmp + rename)."""
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                ok = int(row["step"]) <= step
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped
