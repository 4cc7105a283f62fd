"""Reliability (issue 10): SIGKILL at random points, SIGTERM, NaN, truncated checkpoints, disk full, read-only.

Fault injection. Every training start is a fresh process running train.py as __main__ on the tiny digits
config, through CHILD: a few lines that arm one fault named by $BDM_FAULT by monkeypatching *that* process
(the library has no test hooks). The uninterrupted reference run is a plain `python -c CHILD` subprocess;
the other starts are forked from a fork server (ZYGOTE) that did the ~5 s of imports once; each fork then
initialises its own JAX backend, traces, restores and trains like `python train.py`, and its bit-exact
agreement with the plain reference is part of the test. Faults (kind:step:arg):
  step    SIGKILL `arg` ms after the batch of update `step` was taken (mid-step, async dispatch)
  insave  SIGKILL `arg` ms after ckpt_lib.save(step) was entered (inside orbax's save)
  save    SIGKILL `arg` ms after ckpt_lib.save(step) returned (async commit in flight, or just done)
  gc      delete half the files of the checkpoint orbax's max_to_keep is removing, then SIGKILL
  cleanup delete half of a partial save that Resume is removing at start-up, then SIGKILL
  sample  write half a sample-grid PNG (grid of `step`), then SIGKILL (mid sample dump)
  external  the test sends SIGKILL at a random time in [0, 0.5) s after the second batch was taken
  nan     the batch of data step `arg` is all NaN
  enospc  disk full: orbax's JSON write of checkpoint `step` raises OSError(ENOSPC) in its background
          commit (monkeypatch of orbax's JsonCheckpointHandler._save_fn)
  rofs    read-only file system: os.mkdir of checkpoint `step`'s directory raises OSError(EROFS)
          (monkeypatch; as root, chmod cannot make a directory unwritable)
A fault whose moment may not come in time (gc, external, ...) also arms a backstop SIGKILL at update
$BDM_FAULT_DEADLINE ("deadline" in the counts), so each start ends in a kill and the run keeps progressing.

JAX's persistent compilation cache (a tmp dir shared by the starts) makes a start cost its start-up and
tracing, not XLA compiles; results stay bit-exact (the same executables run). Kill points are drawn from
a seeded RNG ($BDM_FAULT_SEED, default 0): CI is reproducible, another seed explores other points.
$BDM_FAULT_KILLS (default 20) sets how many SIGKILLs the long test survives.

Time (2 shared CPU cores, load 2-4): ~4 min with the default 20 kills: the reference run ~70 s (it fills
the compile cache), the 22 starts of the kill sequence ~125 s, the NaN/truncation/save-failure starts ~40 s;
the unit tests at the end ~5 s.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bdm_jax import checkpoint as ckpt_lib
from bdm_jax import reliability
from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = int(os.environ.get("BDM_FAULT_KILLS", "20"))
SEED = int(os.environ.get("BDM_FAULT_SEED", "0"))
# A kill lands at most 4 updates past the newest checkpoint (gc 6, external and sample 8): KILLS kills fit.
SAVE_EVERY, SAMPLE_EVERY, KEEP = 2, 8, 2
TOTAL = -(-(6 * KILLS + 8) // SAMPLE_EVERY) * SAMPLE_EVERY
PARTIAL = reliability.PARTIAL_MARK
ARGS = [f"--config.train.steps={TOTAL}", f"--config.train.save_every={SAVE_EVERY}", "--config.train.log_every=1",
        f"--config.train.sample_every={SAMPLE_EVERY}", f"--config.train.keep_checkpoints={KEEP}"]

CHILD = r'''
import errno, os, shutil, signal, sys, threading, runpy
import numpy as np

kind, step, arg = (os.environ.get("BDM_FAULT", "none:0:0").split(":") + ["0", "0"])[:3]
step, arg, deadline = int(step), int(arg), int(os.environ.get("BDM_FAULT_DEADLINE", "0"))


def die(tag=kind):
    sys.stderr.write(f"BDM_FAULT_KILL {tag}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def die_after(ms, tag=kind):
    threading.Timer(ms / 1000.0, die, (tag,)).start()


def cut_half(path):
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for f in files[: (len(files) + 1) // 2]:
        os.remove(f)


from bdm_jax import checkpoint as ckpt_lib, images
from bdm_jax.data import pipeline

_next = pipeline.Prefetcher.__next__
def _next_batch(self):
    batch = _next(self)
    s = self.next_step  # the update that uses this batch makes step s
    pipeline._taken = getattr(pipeline, "_taken", 0) + 1
    if pipeline._taken == 2:  # the first update is traced and running: training is under way
        sys.stderr.write("BDM_FAULT_READY\n")
        sys.stderr.flush()
    if kind == "step" and s == step:
        die_after(arg)
    if deadline and s == deadline:
        die_after(0, "deadline")
    return batch
pipeline.Prefetcher.__next__ = _next_batch

_save = ckpt_lib.save
def _save_hooked(mngr, s, state, cfg):
    if kind == "insave" and s == step:
        die_after(arg)
    _save(mngr, s, state, cfg)
    if kind == "save" and s == step:
        die_after(arg)
ckpt_lib.save = _save_hooked

_rmtree = shutil.rmtree
def _rmtree_hooked(path, *a, **k):
    p = str(path).rstrip("/")
    name, parent = os.path.basename(p), os.path.basename(os.path.dirname(p))
    if parent == "checkpoints" and ((kind == "gc" and name.isdigit()) or
                                    (kind == "cleanup" and ".orbax-checkpoint-tmp" in name)):
        cut_half(p)
        die()
    return _rmtree(path, *a, **k)
shutil.rmtree = _rmtree_hooked

_save_png = images.save_png
def _save_png_hooked(image, path, upscale=1):
    if kind == "sample" and path.endswith(f"grid_{step:07d}.png"):
        with open(path + ".tmp.png", "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n half a grid")
        die()
    return _save_png(image, path, upscale)
images.save_png = _save_png_hooked

if kind == "nan":
    _get_batch = pipeline.get_batch
    def _poisoned(source, s, **kw):
        batch = _get_batch(source, s, **kw)
        if s == arg:
            batch["image"] = np.full_like(batch["image"], np.nan)
        return batch
    pipeline.get_batch = _poisoned

if kind == "enospc":
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
    _json_save = jh.JsonCheckpointHandler._save_fn  # AttributeError here: orbax moved it, update the test
    async def _full(self, x, directory):
        if f"/{step}.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await _json_save(self, x, directory)
    jh.JsonCheckpointHandler._save_fn = _full

if kind == "rofs":
    _mkdir = os.mkdir
    def _mkdir_ro(path, *a, **k):
        if os.path.basename(str(path)).startswith(f"{step}.orbax-checkpoint-tmp"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return _mkdir(path, *a, **k)
    os.mkdir = _mkdir_ro

sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
'''


ZYGOTE = r"""
import json, os, sys, threading, traceback
import numpy, sklearn.datasets, jax, orbax.checkpoint  # noqa: F401 - the slow imports, once
import bdm_jax.cli, bdm_jax.trainer  # noqa: F401
child = sys.stdin.readline()  # the CHILD source, json-encoded
child = compile(json.loads(child), "<bdm-fault-child>", "exec")
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # a fresh process: new JAX backend, tracing, checkpoint manager; only imports are shared
        code = 1
        try:
            os.environ.update(req["env"])
            null = os.open(os.devnull, os.O_RDONLY)
            out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(null, 0), os.dup2(out, 1), os.dup2(err, 2)
            sys.argv = req["argv"]
            try:
                exec(child, {"__name__": "__bdm_fault_child__"})
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            threading._shutdown()  # what interpreter exit does: join non-daemon threads
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


class Plain:
    """Starts `python -c CHILD ...` with subprocess."""

    def __init__(self, env):
        self.env = env

    def spawn(self, argv, extra_env, out, err):
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv[1:]], cwd=ROOT, env={**self.env, **extra_env},
                                    stdin=subprocess.DEVNULL, stdout=fo, stderr=fe)
        return proc.pid, proc.poll, lambda timeout: proc.wait(timeout=timeout)


class Zygote:
    """A fork server: imports jax, orbax, bdm_jax once, then forks one fresh process per start (ZYGOTE), so a
    start costs its JAX start-up and tracing but not ~5 s of imports. Exit codes as subprocess's."""

    def __init__(self, env):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write(json.dumps(CHILD) + "\n")
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout], daemon=True).start()

    def spawn(self, argv, extra_env, out, err):
        self.proc.stdin.write(json.dumps(dict(argv=argv, env=extra_env, out=out, err=err)) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.lines.get(timeout=60))["pid"]
        result = []

        def poll():
            if not result:
                try:
                    result.append(json.loads(self.lines.get_nowait())["rc"])
                except queue.Empty:
                    return None
            return result[0]

        def wait(timeout):
            if not result:
                try:
                    result.append(json.loads(self.lines.get(timeout=timeout))["rc"])
                except queue.Empty:
                    os.kill(pid, signal.SIGKILL)
                    raise
            return result[0]

        return pid, poll, wait

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote(env):
    z = Zygote(env)
    yield z
    z.close()


class Start:
    """One training start (`train.py` under CHILD) with a fault; `.rc`, `.err`, `.out` after `.wait()`."""

    _n = 0

    def __init__(self, runner, workdir, fault="none:0:0", deadline=0, args=()):
        Start._n += 1
        base = os.path.join(str(workdir) + ".logs", f"{Start._n:03d}")
        os.makedirs(os.path.dirname(base), exist_ok=True)
        self.out_path, self.err_path, self.fault = base + ".out", base + ".err", fault
        for path in (self.out_path, self.err_path):
            open(path, "w").close()
        argv = ["train.py", "--config=configs/tiny.py", f"--workdir={workdir}", *ARGS, *args]
        self.pid, self.poll, self._wait = runner.spawn(
            argv, {"BDM_FAULT": fault, "BDM_FAULT_DEADLINE": str(deadline)}, self.out_path, self.err_path)

    def _text(self, path):
        with open(path, errors="replace") as f:
            return f.read()

    def wait(self, timeout=600):
        self.rc = self._wait(timeout)
        self.out, self.err = self._text(self.out_path), self._text(self.err_path)
        return self

    def kill_after_ready(self, delay_s, sig=signal.SIGKILL):
        """Send `sig` `delay_s` after the first batch was taken (if the start is still running)."""
        while "BDM_FAULT_READY" not in self._text(self.err_path):
            if self.poll() is not None:  # ended without a first batch: nothing to kill
                return self.wait()
            time.sleep(0.02)
        time.sleep(delay_s)
        if self.poll() is None:
            os.kill(self.pid, sig)
        return self.wait()


def _no_failure(e):
    text = e["err"] + e["out"]
    assert "Traceback" not in text and "error:" not in text, (e["fault"], text[-3000:])


def _complete_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _partials(workdir):
    return reliability.partial_saves(os.path.join(workdir, "checkpoints"))


def _state(workdir, step=None):
    """The whole saved TrainState (numpy) of `step` (default newest) of `workdir`."""
    mngr = ckpt_lib.manager(workdir, create=False)
    step = mngr.latest_step() if step is None else step
    target = ckpt_lib.saved_state_target(mngr, step)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    mngr.close()
    return jax.tree.map(np.asarray, state)


def _assert_same_state(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _same_rows(a, b):
    """Per-step metrics equal (the batches, noise and params were the same), timings aside."""
    keys = [k for k in a[0] if k not in ("steps_per_sec", "eta_sec", "elapsed_sec")]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, (ra, rb)


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """An uninterrupted run: a plain `python -c CHILD` process (no fork server), no fault."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    start = Start(Plain(env), workdir).wait()
    assert start.rc == 0, start.err[-3000:]
    assert _complete_steps(workdir) == [TOTAL - SAVE_EVERY, TOTAL]
    return workdir


def _plan_fault(rng, kind, workdir):
    """(fault spec, backstop update) for the next start, from the newest checkpoint c in the workdir.
    Every kill lands at most 4 updates past c (gc: 6, external, sample: 8), so KILLS kills fit in TOTAL."""
    c = max(_complete_steps(workdir), default=0)
    save = c + SAVE_EVERY - c % SAVE_EVERY
    if kind == "cleanup" and not _partials(workdir):
        kind = "insave"
    if c + 6 > TOTAL:  # (only with an unlucky seed) the end is near: kill the final sample dump instead
        return f"sample:{TOTAL}:0", 0
    if kind == "sample":
        s = c + SAMPLE_EVERY - c % SAMPLE_EVERY
        return f"sample:{s}:0", s + 1
    if kind == "step":
        return f"step:{rng.randint(c + 1, c + 4)}:{rng.randint(0, 300)}", 0
    if kind == "insave":
        return f"insave:{save}:{rng.randint(0, 40)}", save + 1
    if kind == "save":
        return f"save:{save}:{rng.choice([0, 0, rng.randint(0, 150)])}", save + 2
    if kind in ("gc", "cleanup"):
        return f"{kind}:{save}:0", c + 6
    return f"external:{c}:0", c + 8


@pytest.fixture(scope="module")
def fault_run(zygote, reference, tmp_path_factory):
    """KILLS SIGKILLs at seeded random points (each kind in turn), one SIGTERM, then a start to the end."""
    workdir = str(tmp_path_factory.mktemp("faults"))
    rng = random.Random(SEED)
    kinds = ["step", "save", "insave", "gc", "external", "cleanup", "sample"]
    events, t0 = [], time.time()
    for i in range(KILLS + 1):
        left = {p for p in _partials(workdir)}
        before = _complete_steps(workdir)
        if i == KILLS // 2:  # the SIGTERM, halfway
            start = Start(zygote, workdir, "term:0:0").kill_after_ready(rng.uniform(0.0, 0.3), signal.SIGTERM)
            rows_then = _rows(workdir)
        else:
            kind = kinds[(i - (i > KILLS // 2)) % len(kinds)]
            fault, deadline = _plan_fault(rng, kind, workdir)
            start = Start(zygote, workdir, fault, deadline)
            start = start.kill_after_ready(rng.uniform(0.0, 0.5)) if fault.startswith("external") else start.wait()
            rows_then = None
        resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", start.err)]
        events.append(dict(fault=start.fault, rc=start.rc, err=start.err, out=start.out, partial_before=left,
                           complete_before=before, complete_after=_complete_steps(workdir), resumed=resumed,
                           rows=rows_then))
    final = Start(zygote, workdir).wait()
    events.append(dict(fault="none", rc=final.rc, err=final.err, out=final.out, partial_before=set(_partials(workdir)),
                       complete_before=[], complete_after=_complete_steps(workdir),
                       resumed=[int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", final.err)], rows=None))
    return workdir, events, time.time() - t0


def test_sigkill_at_random_points_resumes_bit_exact(fault_run, reference):
    workdir, events, seconds = fault_run
    kills = [e for e in events if e["rc"] == -signal.SIGKILL]
    partial_found = 0
    for e in events:
        assert e["rc"] in (-signal.SIGKILL, 0), (e["fault"], e["rc"], e["err"][-3000:])
        _no_failure(e)
        # every partial save a kill left behind is named by the next start, and never loaded
        for path in e["partial_before"]:
            assert f"skipping partial checkpoint {path}" in e["err"], (path, e["err"][-2000:])
        partial_found += len(e["partial_before"])
        if e["complete_before"] and "BDM_FAULT_KILL cleanup" not in e["err"]:  # (that one dies before resuming)
            assert e["resumed"] == [max(e["complete_before"])], (e["fault"], e["resumed"], e["complete_before"])
        assert "moved unusable checkpoint" not in e["err"] and "could not be restored" not in e["err"]
    assert len(kills) == KILLS, [(e["fault"], e["rc"]) for e in events]
    assert events[-1]["rc"] == 0
    # kills landed in every phase they were aimed at, including inside saves
    fired = [k for e in kills for k in re.findall(r"BDM_FAULT_KILL (\w+)", e["err"]) or ["external"]]
    counts = {k: fired.count(k) for k in sorted(set(fired))}
    if KILLS >= 14:
        assert {"step", "save", "insave", "gc", "external", "sample"} <= set(fired), counts
    # final params, EMA, optimizer state, masks, rng: bit-exact; per-step metrics: the same batches
    _assert_same_state(_state(workdir), _state(reference))
    _same_rows(_rows(workdir), _rows(reference))
    assert _complete_steps(workdir) == [TOTAL - SAVE_EVERY, TOTAL] and not _partials(workdir)
    assert os.path.exists(os.path.join(workdir, "samples", f"grid_{TOTAL:07d}.png"))
    print(f"\n[issue 10] {len(kills)} SIGKILLs survived {counts} (deadline: the backstop), {partial_found} partial "
          f"checkpoints found and skipped, 0 loaded; {len(events)} starts in {seconds:.0f} s; final state bit-exact")


def test_sigterm_saves_flushes_metrics_and_exits_0(fault_run):
    workdir, events, _ = fault_run
    i = next(i for i, e in enumerate(events) if e["fault"].startswith("term"))
    term, after = events[i], events[i + 1]
    assert term["rc"] == 0, term["err"][-3000:]
    said = [ln for ln in term["err"].splitlines() if ln.startswith("SIGTERM received: stopped")]
    assert len(said) == 1, term["err"][-3000:]  # one line of its own
    m = re.fullmatch(r"SIGTERM received: stopped at step (\d+) with a checkpoint in (\S+); run the same command "
                     r"again to resume", said[0])
    assert m, said
    step = int(m.group(1))
    assert m.group(2) == os.path.join(workdir, "checkpoints", str(step))
    assert step in term["complete_after"] and not any(PARTIAL in p for p in after["partial_before"])
    assert term["rows"][-1]["step"] == step  # metrics flushed up to the stop step
    assert after["resumed"] == [step]  # and the next start picked it up



def test_nan_stops_naming_the_step_and_terms(zygote, tmp_path):
    """Logging every 4 steps, saving every 2: the save at step 6 finds the NaN of step 5 first."""
    start = Start(zygote, tmp_path, "nan:0:4", args=["--config.train.steps=8", "--config.train.log_every=4"]).wait()
    assert start.rc == 2, start.err[-3000:]
    line = [ln for ln in start.err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in start.err
    assert re.match(r"error: non-finite loss, grad_norm, mse at step 5 \(loss=nan, grad_norm=nan, lr=[0-9.e-]+, "
                    r"mse=nan\); --config.train.nan_policy=rollback", line[0]), line[0]
    assert _complete_steps(tmp_path) == [2, 4]  # step 6's save never happened: no non-finite checkpoint
    assert [r["step"] for r in _rows(tmp_path)] == [4] and np.isfinite(_rows(tmp_path)[0]["loss"])


def test_nan_rollback_skips_the_batch_and_equals_a_run_without_it(zygote, tmp_path):
    rolled, oracle = tmp_path / "rolled", tmp_path / "oracle"
    start = Start(zygote, rolled, "nan:0:4", args=["--config.train.steps=8", "--config.train.nan_policy=rollback"]).wait()
    assert start.rc == 0, start.err[-3000:]
    assert "non-finite loss, grad_norm, mse at step 5: rolling back to the last checkpoint and skipping batch 4" in start.err
    assert re.search(r"resumed from \S+ at step 4", start.err)
    skipped = json.load(open(rolled / reliability.SKIPPED_FILE))
    assert [(e["step"], e["data_step"], e["non_finite"]) for e in skipped] == [(5, 4, ["loss", "grad_norm", "mse"])]
    # the oracle: a clean run told from the start to skip batch 4
    oracle.mkdir()
    shutil.copy(rolled / reliability.SKIPPED_FILE, oracle / reliability.SKIPPED_FILE)
    assert Start(zygote, oracle, args=["--config.train.steps=8"]).wait().rc == 0
    _assert_same_state(_state(str(rolled)), _state(str(oracle)))
    _same_rows(_rows(str(rolled)), _rows(str(oracle)))
    assert all(np.isfinite(r["loss"]) for r in _rows(str(rolled))) and len(_rows(str(rolled))) == 8


def _truncate_arrays(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
             if os.sep + "d" + os.sep in os.path.join(d, f)]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def test_truncated_checkpoint_stops_or_falls_back(zygote, reference, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(reference, workdir)
    bad = os.path.join(workdir, "checkpoints", str(TOTAL))
    _truncate_arrays(bad)
    start = Start(zygote, workdir).wait()
    assert start.rc == 2 and "Traceback" not in start.err
    msg = next(ln for ln in start.err.splitlines() if ln.startswith("error:"))
    assert msg.startswith(f"error: checkpoint {bad} could not be restored (") and "latest_good" in msg, msg
    assert os.path.isdir(bad)  # the default leaves it alone
    start = Start(zygote, workdir, args=["--config.resume=latest_good"]).wait()
    assert start.rc == 0 and "Traceback" not in start.err, start.err[-3000:]
    assert f"checkpoint {bad} could not be restored" in start.err
    assert f"moved unusable checkpoint {bad} to {os.path.join(workdir, 'checkpoints_rejected', str(TOTAL))}" in start.err
    assert re.search(rf"resumed from \S+ at step {TOTAL - SAVE_EVERY}", start.err)
    _assert_same_state(_state(workdir), _state(reference))  # redone from the previous one, bit-exact


@pytest.mark.parametrize("fault, reason", [("enospc", "No space left on device"), ("rofs", "Read-only file system")])
def test_save_failure_is_one_clear_error_and_keeps_the_previous_checkpoint(zygote, tmp_path, fault, reason):
    t0 = time.time()
    start = Start(zygote, tmp_path, f"{fault}:6:0", args=["--config.train.steps=7"]).wait()
    assert start.rc == 2, start.err[-3000:]
    msg = [ln for ln in start.err.splitlines() if ln.startswith("error:")]
    assert len(msg) == 1, start.err[-3000:]
    ckpt = os.path.join(tmp_path, "checkpoints")
    assert msg[0].startswith(f"error: could not write a checkpoint in {ckpt} (OSError: [Errno "), msg[0]
    assert reason in msg[0] and f"the newest complete checkpoint {ckpt}/4 is intact" in msg[0], msg[0]
    assert time.time() - t0 < 120  # no waiting out orbax's stuck helper threads
    assert _complete_steps(tmp_path) == [2, 4]
    state = _state(str(tmp_path))
    assert int(state["step"]) == 4 and all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


# ------------------------------------------------------------------------------- unit tests (no training)


def _tiny_ckpts(workdir, steps=(2, 4, 6), keep=3, cfg=None):
    cfg = cfg or tiny.get_config()
    mngr = ckpt_lib.manager(workdir, keep=keep)
    for s in steps:
        ckpt_lib.save(mngr, s, {"w": np.full((3,), float(s), np.float32), "step": np.int32(s)}, cfg)
    ckpt_lib.finish(mngr)
    mngr.close()
    return cfg


ABSTRACT = {"w": jax.ShapeDtypeStruct((3,), np.float32), "step": jax.ShapeDtypeStruct((), np.int32)}


def test_resume_skips_and_removes_partial_saves(tmp_path, caplog):
    cfg = _tiny_ckpts(tmp_path)
    partial = tmp_path / "checkpoints" / f"8{PARTIAL}-123"
    shutil.copytree(tmp_path / "checkpoints" / "6", partial)
    mngr = ckpt_lib.manager(str(tmp_path))
    with caplog.at_level("WARNING", logger="bdm_jax"):
        r = reliability.Resume(mngr, cfg)
    assert f"skipping partial checkpoint {partial}" in caplog.text
    assert r.step == 6 and r.partial == [str(partial)] and not partial.exists()
    state, step = r.restore(ABSTRACT)
    mngr.close()
    assert step == 6 and float(state["w"][0]) == 6.0


def _garble_config(step_dir):
    with open(os.path.join(step_dir, "config", "metadata"), "w") as f:
        f.write("{not json")


def test_unreadable_checkpoint_stops_by_default_and_falls_back_when_asked(tmp_path, caplog):
    cfg = _tiny_ckpts(tmp_path)
    _garble_config(tmp_path / "checkpoints" / "6")
    _truncate_arrays(str(tmp_path / "checkpoints" / "4"))
    mngr = ckpt_lib.manager(str(tmp_path))
    with pytest.raises(ckpt_lib.CheckpointError, match=rf"checkpoint {tmp_path}/checkpoints/6/config has no readable "
                                                       r"config \(.*\); run with --config.resume=latest_good"):
        reliability.Resume(mngr, cfg)
    mngr.close()
    cfg.resume = "latest_good"
    mngr = ckpt_lib.manager(str(tmp_path))
    with caplog.at_level("WARNING", logger="bdm_jax"):
        r = reliability.Resume(mngr, cfg)
        assert r.step == 4
        state, step = r.restore(ABSTRACT)  # 4 is truncated: on to 2
    assert step == 2 and float(state["w"][0]) == 2.0
    assert [s for s, _ in r.rejected] == [6, 4]
    assert "could not be restored (ValueError: OUT_OF_RANGE" in caplog.text
    assert sorted(os.listdir(tmp_path / "checkpoints_rejected")) == ["4", "6"]
    assert mngr.all_steps() == [2]
    mngr.close()


def test_no_usable_checkpoint_lists_every_reason(tmp_path):
    cfg = _tiny_ckpts(tmp_path, steps=(2, 4))
    for s in (2, 4):
        _garble_config(tmp_path / "checkpoints" / str(s))
    cfg.resume = "latest_good"
    mngr = ckpt_lib.manager(str(tmp_path))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"no usable checkpoint in .*: step 4: .*; step 2: .*; move them"):
        reliability.Resume(mngr, cfg)
    mngr.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # nothing moved when nothing is usable


def test_other_architecture_keeps_its_message(tmp_path):
    _tiny_ckpts(tmp_path, steps=(2,))
    cfg = tiny.get_config()
    cfg.model.model_channels = 64
    mngr = ckpt_lib.manager(str(tmp_path))
    with pytest.raises(ckpt_lib.CheckpointError, match="model.model_channels=32 but the config says"):
        reliability.Resume(mngr, cfg)
    mngr.close()


def test_check_finite_names_first_bad_step_and_terms():
    ok = {"loss": np.float32(1.0), "mse": np.float32(1.0), "grad_norm": np.float32(2.0)}
    bad = {"loss": np.float32(np.nan), "mse": np.float32(1.0), "grad_norm": np.float32(np.inf)}
    reliability.check_finite([ok, ok], 10)
    reliability.check_finite([], 10)
    with pytest.raises(reliability.NonFiniteError, match=r"non-finite loss, grad_norm at step 9 \(loss=nan, "
                                                          r"grad_norm=inf, mse=1\)") as e:
        reliability.check_finite([ok, bad, bad], 10)
    assert e.value.step == 9 and e.value.bad == ["loss", "grad_norm"]
    assert isinstance(e.value, FloatingPointError)


def test_data_steps_after_skips():
    assert [reliability.data_step(s, []) for s in range(5)] == [0, 1, 2, 3, 4]
    assert [reliability.data_step(s, [2]) for s in range(5)] == [0, 1, 3, 4, 5]
    assert [reliability.data_step(s, [2, 3, 6]) for s in range(6)] == [0, 1, 4, 5, 7, 8]


def test_batches_leave_out_skipped_data_steps(tmp_path):
    from bdm_jax import data as data_lib

    source = data_lib.create_source(ml_collections.ConfigDict(dict(name="synthetic", image_size=4, channels=1,
                                                                   num_classes=0, random_flip=False, data_dir="",
                                                                   size=64)))
    kw = dict(global_batch_size=2, seed=0, random_flip=False)
    with reliability.batches(source, 1, 5, str(tmp_path), **kw) as it:
        plain = [b["image"] for b in it]
    ckpt_lib.write_json(str(tmp_path / reliability.SKIPPED_FILE), [{"step": 3, "data_step": 2}])
    with reliability.batches(source, 1, 5, str(tmp_path), **kw) as it:
        skipped = [b["image"] for b in it]
    want = [data_lib.get_batch(source, d, **kw)["image"] for d in (1, 3, 4, 5)]
    assert len(plain) == 4 and len(skipped) == 4
    np.testing.assert_array_equal(plain[1], data_lib.get_batch(source, 2, **kw)["image"])
    for a, b in zip(skipped, want):
        np.testing.assert_array_equal(a, b)


def test_trim_metrics_keeps_seen_steps_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert reliability.trim_metrics(str(path), 3) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    assert reliability.trim_metrics(str(path), 3) == 0
    assert reliability.trim_metrics(str(tmp_path / "absent.jsonl"), 3) == 0


class _FakeManager:
    directory = "/nowhere/checkpoints"

    def __init__(self):
        self.waits = 0

    def reached_preemption(self, step):
        return step == 7

    def wait_until_finished(self):
        self.waits += 1


def test_run_guard_turns_sigterm_into_a_stop_and_restores_the_handler():
    mngr = _FakeManager()
    before = signal.getsignal(signal.SIGTERM)
    with reliability.RunGuard(mngr) as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert guard.should_stop(2) and guard.reason == "SIGTERM received"
        e = guard.preempted(2)
    assert isinstance(e, reliability.Preempted) and e.step == 2 and mngr.waits == 2
    assert "SIGTERM received: stopped at step 2 with a checkpoint in /nowhere/checkpoints/2" in str(e)
    assert signal.getsignal(signal.SIGTERM) == before
    with reliability.RunGuard(_FakeManager()) as guard:  # the TPU preemption sync point
        assert not guard.should_stop(6) and guard.should_stop(7) and guard.reason == "preemption notice"


def test_run_guard_waits_for_saves_when_the_loop_raises():
    mngr = _FakeManager()
    with pytest.raises(ZeroDivisionError):
        with reliability.RunGuard(mngr):
            1 / 0
    assert mngr.waits == 1


def test_save_error_names_the_intact_checkpoint(tmp_path, monkeypatch):
    cfg = _tiny_ckpts(tmp_path, steps=(2,))
    mngr = ckpt_lib.manager(str(tmp_path))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mngr, "save", full)
    with pytest.raises(ckpt_lib.CheckpointWriteError, match=r"could not write a checkpoint in .* \(OSError: \[Errno 28\] "
                                                            r"No space left on device\); the newest complete checkpoint "
                                                            r".*/checkpoints/2 is intact"):
        ckpt_lib.save(mngr, 4, {"w": np.zeros(3, np.float32)}, cfg)
    mngr.close()
