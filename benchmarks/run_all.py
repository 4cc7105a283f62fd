"""Run every benchmark row of issue 9 in priority order within a time budget; one command for a GPU session.

    python -m benchmarks.run_all --out=benchmarks/results/h100 --budget_s=450
    python -m benchmarks.run_all --out=/tmp/bench --quick                  # CPU smoke run of every row kind
    python -m benchmarks.run_all --out=DIR --list                           # the plan and its estimates
    python -m benchmarks.run_all --out=DIR --rows='train-cifar10-*' --resume  # a subset; keep finished rows

Each row runs in its own process (`python -m benchmarks.train_step|sampling|peak ...`) so device peak
memory is per row, and a crash, OOM or hang of one row is recorded and the run goes on. Rows run most
important first (the LDM-4 QAT vs FP comparison with the official PyTorch numbers, then CIFAR-10, then
sampling, then the largest-batch and float32 rows). Before each row the driver compares the time left
with the row's estimate (a prior for an H100, rescaled by how the finished rows compared with theirs);
a row that cannot finish is skipped and recorded as such, and each row is killed at the deadline.
"Largest batch that fits" rows take their batch from the measured peak memory of a batch-32 row:
batch = (0.9 x device limit - memory after init) / (bytes per sample), a multiple of 8, with JAX's memory
pool allocated up front; after an OOM the row runs again at 3/4 of that batch in a fresh process (up to
BMAX_RETRIES times; the OOM's JSON is kept as <name>-b<batch>-oom), so the result brackets the largest batch.
After every row: <out>/summary.json; at the end <out>/BENCHMARKS.md (benchmarks.report). Logs of each row in
<out>/logs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from benchmarks import common, sampling, train_step

RESERVE_S = 5.0  # kept for the summary and the report after the last row
# Of the device limit, what a largest-batch row plans to use. 0.9 ran W1A4 out of memory on an H100 (batch 248
# from the W1A8 b32 peak) while the allocator grew on demand; with the pool allocated up front (BMAX_ENV) W1A4
# 256 ran at 71.3 of 75.2 GiB and W1A32 320 at 55.9 GiB (docs/PERF_NOTES.md, session 5).
BMAX_FRACTION = 0.9
# Largest-batch rows allocate JAX's pool up front. Growing it on demand (the other rows, so that nothing is held
# beyond use) fragments it: W1A32 288 and 352 failed to place one 46 / 56 GiB buffer with 75 GiB allowed, and
# 256 and 320 ran preallocated. The peak counters count bytes in use either way.
BMAX_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
# Retries of a largest-batch row after an OOM, each in a fresh process: retrying inside the process that ran out
# of memory failed on an H100 (FP 448 -> 336 could not place one 45.6 GiB buffer; 384 then ran in a new process).
BMAX_RETRIES = 2
MIN_CAP_S = 120.0  # a row is killed after max(4 x its estimate, this), or at the deadline


@dataclasses.dataclass
class Row:
    name: str
    module: str  # benchmarks.<module>
    args: list[str]
    est_s: float  # wall-clock prior on an H100 (process start, compiles, timing)
    outputs: list[str]  # JSON files (relative to --out) the process writes
    quick_est_s: float = 30.0
    batch_from: Callable[[str], tuple[int, str]] | None = None  # bmax rows: (batch, note) from results so far
    metas: list[dict] = dataclasses.field(default_factory=list)  # per output: fields for a skipped/failed stub


def _train(model: str, method: str, bits: int, dtype: str, batch: int | str, est: float, quick_est: float = 30.0,
           batch_from=None, attention: str = "", profile: int = 0, overrides: dict[str, str] | None = None) -> Row:
    overrides = overrides or {}
    name = (train_step.row_name(model, method, bits, dtype, batch) + (f"-attn_{attention}" if attention else "")
            + "".join(f"-{k.split('.')[-1]}_{v}" for k, v in overrides.items()))
    args = ["--model", model, "--method", method, "--act_bits", str(bits), "--dtype", dtype, "--name", name]
    if attention:  # A/B of the attention core (issue 9): the same step with model.attention_impl=<attention>
        args += ["--attention_impl", attention]
    for k, v in overrides.items():  # A/B of one config field: the same step with <k>=<v>
        args += ["--set", f"{k}={v}"]
    if profile:
        args += ["--profile_steps", str(profile)]
    if batch_from is None:
        args += ["--batch", str(batch)]
    meta = dict(model=model, method=method, act_bits=32 if method == "fp" else bits, dtype=dtype, requested_batch=batch,
                attention_impl=attention or "auto", overrides=dict(overrides))
    return Row(name, "train_step", args, est, [f"train/{name}.json"], quick_est, batch_from, [meta])


def _sample(model: str, batch: int, est: float, act_bits: int, measure_steps: int = 0, quick_est: float = 20.0) -> Row:
    metas = [dict(model=model, mode=m, act_bits=32 if m == "fp" else act_bits, dtype="bf16", batch=batch)
             for m in sampling.MODES]
    outs = [f"sample/{sampling.row_name(model, m['mode'], m['act_bits'], 'bf16', batch)}.json" for m in metas]
    args = ["--model", model, "--batch", str(batch), "--act_bits", str(act_bits), "--dtype", "bf16"]
    if measure_steps:
        args += ["--measure_steps", str(measure_steps)]
    return Row(f"sample-{model}-b{batch}", "sampling", args, est, outs, quick_est, metas=metas)


def max_batch_from(out: str, sources: list[str], fallback: int, quick: bool) -> Callable[[str], tuple[int, str]]:
    """A bmax row's batch from the peak memory of the first finished row in `sources` (train row names)."""

    def choose(_: str) -> tuple[int, str]:
        if quick:
            return fallback, f"quick: fixed batch {fallback}"
        for src in sources:
            r = _load(f"{out}/train/{src}.json")
            mem, base = (r or {}).get("memory") or {}, ((r or {}).get("memory_after_init") or {}).get("bytes_in_use")
            peak, limit, b = mem.get("peak_bytes_in_use"), mem.get("bytes_limit"), (r or {}).get("batch")
            if r and r.get("status") == "ok" and peak and limit and base is not None and b and peak > base:
                per_sample = (peak - base) / b
                bmax = int((BMAX_FRACTION * limit - base) / per_sample) // 8 * 8
                bmax = max(8, min(bmax, 2048))
                return bmax, (f"largest batch estimated from {src}: ({BMAX_FRACTION} x {limit / 2**30:.1f} GiB - "
                              f"{base / 2**30:.2f} GiB after init) / {per_sample / 2**20:.0f} MiB per sample")
        return fallback, f"no peak memory of {', '.join(sources)} available: fallback batch {fallback}"

    return choose


def plan(out: str, quick: bool, f32: bool, sample_act_bits: int = 32) -> list[Row]:
    """All rows, most important first. Estimates are seconds on an H100 (guesses, rescaled while running)."""
    ldm_qat32 = train_step.row_name("ldm4", "binarydm", 8, "bf16", 32)
    ldm_fp32 = train_step.row_name("ldm4", "fp", 32, "bf16", 32)
    fb = 4 if quick else 64
    rows = [
        Row("peak", "peak", [], 30, ["peak.json"], 10),
        # The headline: LDM-4 QAT (official setting W1A8 + LRM) and FP at batch 32, then QAT at batch 4.
        _train("ldm4", "binarydm", 8, "bf16", 32, 150, profile=0 if quick else 3),
        _train("ldm4", "fp", 32, "bf16", 32, 90, profile=0 if quick else 3),
        # Before/after of the fused attention core (bdm_jax.attention): the explicit einsum path, same card.
        _train("ldm4", "fp", 32, "bf16", 32, 90, attention="explicit"),
        _train("ldm4", "binarydm", 8, "bf16", 32, 150, attention="explicit"),
        _train("ldm4", "binarydm", 32, "bf16", 32, 150),
        # Change 4 (issue 9): the LRM projection in the features' dtype; A/B against the float32 projection.
        _train("ldm4", "binarydm", 8, "bf16", 32, 150, profile=0 if quick else 3,
               overrides={"quant.lrm_precision": "float32"}),
        _train("ldm4", "binarydm", 32, "bf16", 32, 150, attention="explicit"),
        _train("cifar10", "fp", 32, "bf16", 128, 60),
        _train("cifar10", "binarydm", 32, "bf16", 128, 80),
        _train("cifar10", "binarydm", 4, "bf16", 128, 80),
        _sample("cifar10", 1, 60, sample_act_bits),
        _sample("cifar10", 256, 80, sample_act_bits),
        _train("ldm4", "binarydm", 8, "bf16", 4, 120),
        _train("ldm4", "binarydm", 32, "bf16", "max", 180,
               batch_from=max_batch_from(out, [train_step.row_name("ldm4", "binarydm", 32, "bf16", 32), ldm_qat32], fb,
                                         quick)),
        _train("ldm4", "binarydm", 4, "bf16", "max", 180, batch_from=max_batch_from(out, [ldm_qat32], fb, quick)),
        _sample("ldm4", 1, 120, sample_act_bits),
        # 100 DDIM steps of the 274M-param UNet at batch 256: run 10, extrapolate (labelled in the row).
        _sample("ldm4", 256, 150, sample_act_bits, measure_steps=10),
        _train("ldm4", "fp", 32, "bf16", "max", 120, batch_from=max_batch_from(out, [ldm_fp32, ldm_qat32], fb, quick)),
    ]
    if f32:
        rows += [
            _train("cifar10", "fp", 32, "f32", 128, 60),
            _train("cifar10", "binarydm", 32, "f32", 128, 90),
            _train("ldm4", "binarydm", 8, "f32", 32, 160),  # the official step is fp32
        ]
    if quick:  # tiny models, small batches: a smoke run of every row kind
        for r in rows:
            if r.module == "train_step" and r.batch_from is None:
                i = r.args.index("--batch")
                r.args[i + 1] = str(min(int(r.args[i + 1]), 4))
            if r.module == "sampling":
                i = r.args.index("--batch")
                r.args[i + 1] = str(min(int(r.args[i + 1]), 2))
                r.args += ["--measure_steps", "2", "--repeats", "1"]
                r.outputs = [o.replace("-b256.json", "-b2.json") for o in r.outputs]
                for m in r.metas:
                    m["batch"] = min(m["batch"], 2)
            if r.module == "train_step":
                r.args += ["--steps", "3", "--max_time_s", "1"]
    return rows


def select(rows: list[Row], patterns: list[str] | None) -> list[Row]:
    """Rows matching any fnmatch pattern, in the order of the patterns (plan order among one pattern's rows)."""
    if not patterns:
        return rows
    first = {r.name: next((i for i, p in enumerate(patterns) if fnmatch.fnmatch(r.name, p)), None) for r in rows}
    return sorted((r for r in rows if first[r.name] is not None), key=lambda r: first[r.name])


def _load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def child_env(quick: bool, compile_cache: str = "") -> dict:
    env = dict(os.environ)
    if compile_cache:  # JAX's persistent cache; on GPU it also turns on XLA's per-fusion autotuning cache, so
        # rows that share convolution shapes (FP / QAT / A-B twins) skip re-autotuning: compile_s then is not a
        # cold compile (the summary and every row record it).
        env.update(JAX_COMPILATION_CACHE_DIR=os.path.abspath(compile_cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # grow on demand: peak counters show real use
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # the largest-batch rows may use the card
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    env["PYTHONPATH"] = os.pathsep.join([common.ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if quick:  # smoke runs wait on XLA:CPU's LLVM passes, not on the math
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                            " --xla_llvm_disable_expensive_passes=true").strip()
    return env


def run_process(argv: list[str], log_path: str, timeout_s: float, env: dict) -> tuple[int | None, float, str]:
    """Run argv in its own process group, stream its progress lines, kill it after timeout_s.

    Returns (exit code or None if killed, wall seconds, last lines of its output).
    """
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.perf_counter()
    tail: list[str] = []
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=common.ROOT, start_new_session=True)

        def pump():
            for line in proc.stdout:
                logf.write(line)
                logf.flush()
                tail.append(line)
                del tail[:-40]
                if line.startswith("["):  # benchmarks.common.log lines: progress
                    print("  " + line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group of the child we started
            proc.wait()
            rc = None
        reader.join(timeout=5)
    return rc, time.perf_counter() - t0, "".join(tail)


def _stub(path: str, row: Row, status: str, reason: str, **extra) -> dict:
    """The JSON of an output the row's process did not write (skipped, crashed, killed)."""
    kind = {"train_step": "train", "sampling": "sample", "peak": "peak"}.get(row.module, row.module)
    meta = next((m for o, m in zip(row.outputs, row.metas) if path.endswith("/" + o)), {})
    rec = dict(meta, kind=kind, name=os.path.basename(path)[:-5], status=status, error=reason, driver_row=row.name,
               **extra)
    common.write_json(path, rec)
    return rec


def _module(module: str) -> str:
    """The module a row's process runs: benchmarks.<module>, or a dotted path as given (tests' fake rows)."""
    return module if "." in module else f"benchmarks.{module}"


def _keep_oom(path: str, name: str) -> str:
    """Move a largest-batch row's OOM record to <dir>/<name>.json (its own row in the report); returns `name`."""
    rec = _load(path) or {}
    why = "largest-batch search: this batch ran out of memory; the row ran again smaller"
    rec.update(name=name, note=f"{rec['note']}; {why}" if rec.get("note") else why)
    common.write_json(os.path.join(os.path.dirname(path), f"{name}.json"), rec)
    os.remove(path)
    return name


def run(out: str, *, quick: bool, budget_s: float, f32: bool = True, patterns: list[str] | None = None,
        resume: bool = False, sample_act_bits: int = 32, rows: list[Row] | None = None,
        compile_cache: str = "") -> dict:
    """Run the plan (or `rows`) into `out`; returns the summary (also <out>/summary.json)."""
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    rows = rows if rows is not None else plan(out, quick, f32, sample_act_bits)
    rows = select(rows, patterns)
    env = child_env(quick, compile_cache)
    start = time.perf_counter()
    deadline = start + budget_s
    summary = dict(command=" ".join([os.path.basename(sys.executable), "-m", "benchmarks.run_all"] + sys.argv[1:]),
                   quick=quick, budget_s=budget_s, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                   compile_cache=bool(compile_cache), rows=[])
    ratios: list[float] = []  # actual / estimated wall time of finished rows
    for row in rows:
        paths = [f"{out}/{o}" for o in row.outputs]
        entry = dict(name=row.name, module=row.module, outputs=row.outputs)
        summary["rows"].append(entry)
        if resume and all((_load(p) or {}).get("status") in ("ok", "not_available") for p in paths):
            entry.update(status="kept", note="finished in an earlier run (--resume)")
            common.log(f"{row.name}: kept from an earlier run")
            continue
        scale = min(max(sorted(ratios)[len(ratios) // 2], 0.3), 3.0) if ratios else 1.0
        est = (row.quick_est_s if quick else row.est_s) * scale
        left = deadline - time.perf_counter() - RESERVE_S
        entry["est_s"] = round(est, 1)
        if left < 0.8 * est:
            reason = f"skipped: {left:.0f} s of the budget left, the row needs ~{est:.0f} s"
            entry.update(status="skipped", note=reason)
            for p in paths:
                _stub(p, row, "skipped", reason)
            common.log(f"{row.name}: {reason}")
            continue
        b, note = row.batch_from(out) if row.batch_from is not None else (None, "")
        # the caller's own allocator setting wins (child_env keeps it too)
        row_env = env if b is None else {**env, **{k: v for k, v in BMAX_ENV.items() if k not in os.environ}}
        for retry in range(BMAX_RETRIES + 1 if b is not None else 1):
            args = list(row.args)
            if b is not None:
                args += ["--batch", str(b), "--note", note]
                entry["batch"] = b
                common.log(f"{row.name}: batch {b} ({note})")
            argv = ([sys.executable, "-m", _module(row.module), "--out", out] + (["--quick"] if quick else []) + args)
            entry["argv"] = " ".join(argv[1:])
            left = deadline - time.perf_counter() - RESERVE_S
            cap = min(left, max(4.0 * est, MIN_CAP_S))  # a hung row must not eat the budget; a slow one may finish
            common.log(f"{row.name}: start (estimate {est:.0f} s, killed after {cap:.0f} s; {left:.0f} s left)")
            for p in paths:  # a stale file from an earlier run must not pass for this run's result
                if os.path.exists(p):
                    os.remove(p)
            rc, wall, tail = run_process(argv, f"{out}/logs/{row.name}.log", cap, row_env)
            entry.update(rc=rc, wall_s=round(wall + entry.get("wall_s", 0.0), 1))
            statuses = []
            for p in paths:
                rec = _load(p)
                if rec is None:
                    why = f"killed after {cap:.0f} s" if rc is None else f"process exited {rc} without writing its JSON"
                    rec = _stub(p, row, "timeout" if rc is None else "crashed", why, log_tail=tail[-3000:])
                statuses.append(rec.get("status"))
            smaller = (b * 3 // 4) // 8 * 8 if b is not None else 0
            if (b is None or statuses != ["oom"] or retry == BMAX_RETRIES or smaller < 8
                    or deadline - time.perf_counter() - RESERVE_S < 0.8 * est):
                break
            oom = _keep_oom(paths[0], f"{row.name}-b{b}-oom")
            entry.setdefault("oom_rows", []).append(oom)
            note = f"largest batch searched: {b} ran out of memory (row {oom}); {smaller} in a fresh process"
            common.log(f"{row.name}: OOM at batch {b}; again at {smaller} in a fresh process")
            b = smaller
        good = all(s in ("ok", "not_available") for s in statuses)
        entry["status"] = "ok" if good else ",".join(sorted(set(statuses)))
        if rc is not None and entry["status"] == "ok" and row.module != "peak":  # peak compiles little
            ratios.append(wall / max(row.quick_est_s if quick else row.est_s, 1.0))
        common.log(f"{row.name}: {entry['status']} in {wall:.0f} s")
        if rc is None or rc != 0:  # show why on the console too (full output in the log)
            print("".join("  | " + ln for ln in tail.splitlines(keepends=True)[-6:]), end="", flush=True)
        summary["elapsed_s"] = round(time.perf_counter() - start, 1)
        common.write_json(f"{out}/summary.json", summary)
    summary["elapsed_s"] = round(time.perf_counter() - start, 1)
    common.write_json(f"{out}/summary.json", summary)
    try:
        from benchmarks import report

        md = report.write(out, f"{out}/BENCHMARKS.md")
        common.log(f"wrote {md}")
    except Exception as e:  # the JSON is the result; the markdown can be made later with benchmarks.report
        common.log(f"report failed: {common.short_error(e)}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--budget_s", type=float, default=450.0, help="wall-clock budget of the whole run (seconds)")
    p.add_argument("--quick", action="store_true", help="tiny models and batches: a CPU smoke run of every row kind")
    p.add_argument("--f32", action=argparse.BooleanOptionalAction, default=True,
                   help="also the float32 rows (last, if the budget allows)")
    p.add_argument("--rows", default="", help="comma-separated fnmatch patterns of row names to run, in this order "
                   "(default: all, in priority order)")
    p.add_argument("--resume", action="store_true", help="keep rows whose JSON in --out already says ok")
    p.add_argument("--sample_act_bits", type=int, default=32, choices=(4, 8, 32),
                   help="activation bits of the binary sampling modes")
    p.add_argument("--list", action="store_true", help="print the rows and their estimates, run nothing")
    p.add_argument("--compile_cache", default="", help="persistent compilation (+ GPU autotuning) cache directory "
                   "shared by the rows: faster later compiles, which then are not cold compiles")
    a = p.parse_args(argv)
    patterns = [s for s in a.rows.split(",") if s]
    if a.list:
        total = 0.0
        for r in select(plan(os.path.abspath(a.out), a.quick, a.f32, a.sample_act_bits), patterns):
            est = r.quick_est_s if a.quick else r.est_s
            total += est
            print(f"{r.name:45s} ~{est:5.0f} s   python -m benchmarks.{r.module} {' '.join(r.args)}")
        print(f"total ~{total:.0f} s (budget {a.budget_s:.0f} s)")
        return 0
    summary = run(a.out, quick=a.quick, budget_s=a.budget_s, f32=a.f32, patterns=patterns, resume=a.resume,
                  sample_act_bits=a.sample_act_bits, compile_cache=a.compile_cache)
    bad = [r["name"] for r in summary["rows"] if r.get("status") not in ("ok", "kept", "skipped")]
    common.log(f"done in {summary['elapsed_s']:.0f} s; {len(bad)} rows failed{': ' + ', '.join(bad) if bad else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
