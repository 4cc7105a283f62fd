"""Time one train step of bdm-jax — FP or BinaryDM QAT — as trainer.train builds it (issue 9, items 1, 2, 4).

    python -m benchmarks.train_step --out=benchmarks/results/h100 --model=ldm4 --method=binarydm --act_bits=8 --batch=32
    python -m benchmarks.train_step --out=/tmp/bench --model=cifar10 --method=fp --batch=128 --quick
    python -m benchmarks.train_step --out=DIR --model=ldm4 --act_bits=8 --batch=32 --set quant.lrm_precision=float32 \
        --name=train-ldm4-binarydm_w1a8-bf16-b32-lrm_precision_float32      # an A/B row: one config field changed

One row per process (device peak-memory counters cannot be reset, so each row gets its own process).
The step is the library's: `Setup.from_config`, `make_optimizer`, `make_init_fn` (QAT: the student from a
random FP teacher (`common.random_variables`), LSQ calibration and LRM bases, as at the start of QAT), `make_mask_fn`,
`make_train_step` under `jax.jit(..., donate_argnums=0)`. The batch is fixed random data of the model's
input shape (CIFAR: 32x32x3 images in [-1, 1]; LDM-4: 64x64x3 latents ~N(0, 1)); the step draws its own
t and noise. Values do not change the speed.

Measured: trace+lower and compile seconds (AOT, `.lower().compile()`), XLA's FLOPs of the compiled step
(`cost_analysis`; the unoptimized HLO's count where the compiled one misses most of it, e.g. convolutions
as library calls — `flops_source` says which), model FLOPs (2 x MACs of the UNet forward x batch x passes:
FP 3 = forward + backward, QAT 4 = teacher forward + student forward + backward), the seconds of each
step after warm-up (blocking on the step's outputs) -> median, when each blocked step's call returned to
Python (`dispatch_timing`), a pipelined run (no blocking between steps), and the device memory counters (peak
is the process peak: init + steps). With
--profile_steps, a jax.profiler trace of that many more steps, broken down by op category (convolution,
matmul, fused attention, fusions, copies), step phase (teacher forward, student forward/backward,
optimizer) and model part (attention core, LSQ quantizers, binarizer, norms, ...) from XLA's op metadata, and
the host threads' busy time and top events (`--profile_timed`: of the timed executable itself). A row that
fails (OOM, compile error) writes its JSON with status "oom"/"error" and the reason.
Writes <out>/train/<name>.json.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import os
import sys
import time
from typing import Any

from benchmarks import common


def row_name(model: str, method: str, act_bits: int, dtype: str, batch: int | str) -> str:
    variant = "fp" if method == "fp" else f"{method}_w1a{act_bits}"
    return f"train-{model}-{variant}-{dtype}-b{batch}"


def _init_state(setup: Any, tx: Any, x0: Any, calib: int) -> tuple[Any, dict]:
    """The step-0 TrainState as trainer.train makes it (jit(init)); QAT teacher = random FP params."""
    import jax

    from bdm_jax.trainer import make_init_fn

    times = {}
    teacher: Any = {}
    if setup.quant:
        t0 = time.perf_counter()
        teacher = common.random_variables(setup.fp_model, setup.cfg.model, seed=1)["params"]
        times["teacher_init_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rng_data = jax.random.key_data(jax.random.key(0))
    state = jax.jit(make_init_fn(setup, tx))(rng_data, teacher, {"image": x0[:calib]})
    jax.block_until_ready(state)
    times["init_s"] = time.perf_counter() - t0
    return state, times


def measure(cfg: Any, *, latents: bool, steps: int, max_time_s: float, calib: int, quick: bool,
            profile_steps: int = 0, profile_dir: str = "", profile_timed: bool = False) -> dict:
    """Compile and time the train step of validated `cfg` at cfg.train.batch_size; returns the metrics."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from bdm_jax.train_state import make_optimizer
    from bdm_jax.trainer import Setup, make_mask_fn, make_train_step

    m, b = cfg.model, cfg.train.batch_size
    out: dict = {}
    setup = Setup.from_config(cfg)
    tx = make_optimizer(cfg.train)
    shape = (b, m.image_size, m.image_size, m.in_channels)
    key = jax.random.key(123)
    x0 = (jax.random.normal(key, shape, jnp.float32) if latents
          else jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0))
    batch = {"image": x0}
    state, times = _init_state(setup, tx, x0, min(calib, b))
    out.update(times)
    out["params"] = int(sum(v.size for v in traverse_util.flatten_dict(dict(state.params)).values()))
    out["state_bytes"] = int(sum(v.nbytes for v in jax.tree.leaves(state)))
    out["memory_after_init"] = common.memory_now()

    step = jax.jit(make_train_step(setup, tx, make_mask_fn(setup, state.masks)), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    out["lower_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    out["compile_s"] = time.perf_counter() - t0
    out["flops_compiled"] = common.compiled_flops(compiled)
    out["flops_hlo"] = common.lowered_flops(lowered)
    out["flops_xla"], out["flops_source"] = common.pick_flops(out["flops_compiled"], out["flops_hlo"])
    out["xla_memory"] = common.compiled_memory(compiled)
    passes = 3 + (1 if setup.quant and cfg.quant.lrm != "none" else 0)
    out["model_passes"] = passes
    out["flops_model"] = common.forward_flops_per_sample(m) * b * passes

    holder = {"state": state}
    del state

    def one_step(executable: Any = compiled) -> Any:
        holder["state"], metrics = executable(holder["state"], batch)
        return metrics

    for _ in range(2):  # warm-up: first executions (allocator growth, autotuning caches)
        metrics = one_step()
        metrics["loss"].block_until_ready()
    out["loss_after_warmup"] = float(metrics["loss"])
    # One executable: when its loss is ready the whole step (new state included) is done.
    dispatch_s: list[float] = []

    def blocking_step() -> None:
        t0 = time.perf_counter()
        loss = one_step()["loss"]
        dispatch_s.append(time.perf_counter() - t0)  # the call's host work (leaves, launches) and any queue wait
        loss.block_until_ready()

    times_s = common.time_calls(blocking_step, min_n=3 if not quick else 2, max_n=steps, max_s=max_time_s)
    out["timing"] = common.summarize(times_s)
    out["times_s"] = times_s
    out["dispatch_timing"] = common.summarize(dispatch_s)
    out["state_leaves"] = len(jax.tree.leaves(holder["state"]))
    n_pipe = max(2, min(steps, len(times_s), int(5.0 / max(out["timing"]["median_s"], 1e-6)) + 1))  # <= ~5 s
    t0 = time.perf_counter()
    for _ in range(n_pipe):
        metrics = one_step()
    metrics["loss"].block_until_ready()
    out["pipelined_step_s"] = (time.perf_counter() - t0) / n_pipe
    out["pipelined_steps"] = n_pipe
    out["loss_final"] = float(metrics["loss"])
    out["memory"] = common.memory_now()
    if profile_steps:  # after the timing: tracing must not slow the timed steps
        import jax.profiler

        traced, no_cmd_buffers = compiled, False
        if jax.default_backend() == "gpu" and not profile_timed:
            # XLA:GPU replays runs of kernels as CUDA graphs ("command buffers"); a trace then shows one opaque
            # op per graph. The profiled executable is the same program compiled without them.
            try:
                traced = lowered.compile(compiler_options={"xla_gpu_enable_command_buffer": ""})
                no_cmd_buffers = True
            except Exception as e:  # profile the timed executable rather than lose the row
                common.log(f"profile: recompiling without command buffers failed ({common.short_error(e)})")

        one_step(traced)["loss"].block_until_ready()  # its first run outside the trace
        jax.profiler.start_trace(profile_dir)
        for _ in range(profile_steps):
            one_step(traced)["loss"].block_until_ready()
        jax.profiler.stop_trace()
        hlo = traced.as_text()
        out["profile"] = common.profile_breakdown(profile_dir, hlo, profile_steps, top=150)
        out["profile"]["command_buffers_disabled"] = no_cmd_buffers
        out["profile"]["host"] = common.host_breakdown(profile_dir, profile_steps)
        with gzip.open(os.path.join(profile_dir, "compiled_hlo.txt.gz"), "wt") as f:  # the ops the profile names
            f.write(hlo)

    med = out["timing"]["median_s"]
    out["step_ms"] = 1e3 * med
    out["img_per_s"] = b / med
    out["img_per_s_pipelined"] = b / out["pipelined_step_s"]
    out["tflops_xla"] = out["flops_xla"] / med / 1e12 if out["flops_xla"] else None
    out["tflops_model"] = out["flops_model"] / med / 1e12
    return out


def run_row(*, out: str, model: str, method: str, act_bits: int, dtype: str, batch: int, quick: bool,
            steps: int = 20, max_time_s: float = 10.0, calib: int = 8, name: str = "", shrink_on_oom: int = 0,
            note: str = "", attention_impl: str = "", profile_steps: int = 0,
            overrides: dict[str, str] | None = None, profile_timed: bool = False) -> dict:
    """Measure one row and write <out>/train/<name>.json; never raises for a failing row."""
    import jax

    name = name or row_name(model, method, act_bits, dtype, batch)
    rec: dict = dict(kind="train", name=name, model=model, method=method, act_bits=32 if method == "fp" else act_bits,
                     dtype=dtype, requested_batch=batch, quick=quick, note=note, attempts=[],
                     overrides=dict(overrides or {}))
    path = f"{out}/train/{name}.json"
    try:
        rec["device"] = common.device_info()
        rec["matmul_precision"] = str(getattr(jax.config, "jax_default_matmul_precision", None))
        rec["compile_cache"] = bool(os.environ.get("JAX_COMPILATION_CACHE_DIR"))  # compile_s then may be warm
        b = batch
        for attempt in range(shrink_on_oom + 1):
            common.log(f"{name}: batch {b}{' (quick: tiny model)' if quick else ''} ...")
            rec["batch"] = b
            try:
                cfg = common.model_config(model, method, act_bits, dtype, b, quick)
                if attention_impl:
                    cfg.model.attention_impl = attention_impl
                for key, value in (overrides or {}).items():
                    common.set_config(cfg, key, value)
                if overrides:
                    from bdm_jax.config import validate

                    cfg = validate(cfg)
                rec["config"] = dict(model=cfg.model.to_dict(), quant=cfg.quant.to_dict(), method=cfg.method)
                rec.update(measure(cfg, latents=model == "ldm4", steps=steps, max_time_s=max_time_s, calib=calib,
                                   quick=quick, profile_steps=profile_steps,
                                   profile_dir=f"{out}/traces/{name}", profile_timed=profile_timed))
                rec["status"] = "ok"
                break
            except Exception as e:
                rec["attempts"].append(dict(batch=b, error=common.short_error(e), oom=common.is_oom(e)))
                nb = (b * 3 // 4) // 8 * 8
                if not common.is_oom(e) or attempt == shrink_on_oom or nb < 1:
                    raise
                common.log(f"{name}: OOM at batch {b}; retrying at {nb}")
                b = nb
                jax.clear_caches()
                gc.collect()
    except Exception as e:
        rec.update(common.error_fields(e))
        common.log(f"{name}: {rec['status'].upper()} {rec['error']}")
    if rec.get("status") == "ok":
        common.log(f"{name}: {rec['step_ms']:.1f} ms/step (median of {rec['timing']['n']}), "
                   f"{rec['img_per_s']:.1f} img/s, "
                   f"compile {rec['compile_s']:.1f} s, XLA {rec['tflops_xla'] or 0:.4g} TFLOP/s, "
                   f"peak {common.mib(rec['memory']['peak_bytes_in_use'])}")
    common.write_json(path, rec)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results directory (writes train/<name>.json)")
    p.add_argument("--model", required=True, choices=common.MODELS)
    p.add_argument("--method", default="binarydm", choices=common.METHODS)
    p.add_argument("--act_bits", type=int, default=32, choices=(4, 8, 32))
    p.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--quick", action="store_true", help="tiny model of the same family (CPU smoke run)")
    p.add_argument("--steps", type=int, default=20, help="at most this many timed steps")
    p.add_argument("--max_time_s", type=float, default=10.0, help="stop timing after this long (>= 3 steps)")
    p.add_argument("--calib", type=int, default=8, help="samples of the QAT init's calibration batch")
    p.add_argument("--shrink_on_oom", type=int, default=0,
                   help="retries at 3/4 of the batch after an OOM, in this process (after a large OOM the allocator "
                   "may fail to place the smaller step too, as seen on an H100; run_all retries its largest-batch "
                   "rows in fresh processes)")
    p.add_argument("--name", default="", help="row name (default from the arguments)")
    p.add_argument("--note", default="", help="free text stored with the row (e.g. how the batch was chosen)")
    p.add_argument("--attention_impl", default="", choices=("", "auto", "explicit", "xla", "cudnn", "pallas"),
                   help="model.attention_impl for this row (default: the config's, auto)")
    p.add_argument("--profile_steps", type=int, default=0,
                   help="after timing, trace this many steps and store the device-time breakdown in the row "
                        "(by op category, step phase, model part; top ops); trace in <out>/traces/<name>")
    p.add_argument("--profile_timed", action="store_true",
                   help="trace the timed executable itself (on GPU with XLA's command buffers: kernels inside them "
                        "are opaque, but the host threads show what each step's launch costs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for this row, repeatable (e.g. quant.lrm_precision=float32 for an A/B); "
                        "the value is parsed as the field's type")
    a = p.parse_args(argv)
    overrides = {}
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--set={item!r} is not allowed: expected KEY=VALUE, e.g. quant.lrm_precision=float32")
        overrides[key] = value
    rec = run_row(out=a.out, model=a.model, method=a.method, act_bits=a.act_bits, dtype=a.dtype, batch=a.batch,
                  quick=a.quick, steps=a.steps, max_time_s=a.max_time_s, calib=a.calib, name=a.name,
                  shrink_on_oom=a.shrink_on_oom, note=a.note, attention_impl=a.attention_impl,
                  profile_steps=a.profile_steps, overrides=overrides, profile_timed=a.profile_timed)
    return 0 if rec.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
