"""Shared pieces of the benchmarks (issue 9): benchmark configs, device facts, timing, XLA cost/memory, JSON.

Every benchmark process writes one JSON record per row with `record(...)`; a row that fails (OOM, compile
error) is a record with `status="error"` and the one-line reason, never a crash of the whole run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import socket
import statistics
import sys
import time
import traceback
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `configs` is a top-level package of the repository
    sys.path.insert(0, ROOT)

MODELS = ("cifar10", "ldm4")
METHODS = ("fp", "baseline", "binarydm")
DTYPES = {"bf16": "bfloat16", "f32": "float32"}

# The official PyTorch BinaryDM QAT step (LDM openaimodel UNet, fp32, LRM + 8-bit activation quantization),
# random 64x64x3 latents, measured by the author. Shown next to ours in docs/BENCHMARKS.md.
OFFICIAL_REFERENCE = {
    "card": "NVIDIA H200",
    "source": "official PyTorch BinaryDM (LDM openaimodel UNet, fp32), issue 9",
    "rows": [
        dict(what="QAT step W1A8 + LRM", model="ldm4", batch=4, step_ms=292.0, img_s=13.7, peak_gib=None),
        dict(what="QAT step W1A8 + LRM", model="ldm4", batch=32, step_ms=600.0, img_s=53.3, peak_gib=32.9),
        dict(what="FP train step", model="ldm4", batch=32, step_ms=254.0, img_s=126.0, peak_gib=None),
    ],
    "goal": "bdm-jax QAT throughput >= 8x the official QAT at batch 32 on the same card (>= 426 img/s)",
    "goal_factor": 8.0,
}

# Datasheet dense bf16 tensor-core peaks (TFLOP/s), only to put the measured matmul peak in context.
SPEC_BF16_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H200": 989.4,
                    "A100-SXM4-80GB": 312.0, "A100-SXM4-40GB": 312.0}


class BenchError(ValueError):
    """A benchmark argument that is not allowed (one line naming it)."""


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def shrink_for_quick(cfg: Any) -> None:
    """Tiny model of the same family (keeps the config's numerics, schedule, attention and quantization).

    One resolution level: XLA's CPU compile time, not the math, is what a smoke run waits for.
    """
    m = cfg.model
    m.image_size = 8
    m.model_channels = 32
    m.channel_mult = (1,)
    m.num_res_blocks = 1
    m.attention_resolutions = (8,)
    if m.num_head_channels > 0:
        m.num_head_channels = 32


def model_config(model: str, method: str, act_bits: int, dtype: str, batch: int, quick: bool = False) -> Any:
    """The validated config of a benchmark row: the paper config of `model` with method, bits, dtype, batch.

    ldm4 is the LDM-4 Bedrooms UNet on latents: `autoencoder.kind=none`, the benchmark feeds random
    64x64x3 latents to the step directly (no data pipeline, no VQ encode/decode).
    """
    from bdm_jax.config import validate
    from configs import ddpm_cifar10, ldm4_bedrooms

    if model not in MODELS:
        raise BenchError(f"--model={model!r} is not allowed: one of {', '.join(MODELS)}")
    if method not in METHODS:
        raise BenchError(f"--method={method!r} is not allowed: one of {', '.join(METHODS)}")
    if dtype not in DTYPES:
        raise BenchError(f"--dtype={dtype!r} is not allowed: one of {', '.join(DTYPES)}")
    if batch < 1:
        raise BenchError(f"--batch={batch} is not allowed: must be >= 1")
    if model == "cifar10":
        cfg = ddpm_cifar10.get_config("fp" if method == "fp" else f"{method}_w1a{act_bits}")
    else:
        cfg = ldm4_bedrooms.get_config()
        cfg.method, cfg.quant.act_bits = method, act_bits
        cfg.autoencoder.kind = "none"
    if method == "fp":
        cfg.quant.act_bits = 32
    cfg.model.dtype = DTYPES[dtype]
    cfg.train.batch_size = batch
    if quick:
        shrink_for_quick(cfg)
    return validate(cfg)


def set_config(cfg: Any, key: str, value: str) -> None:
    """cfg.<key> = value parsed as the field's current type (str, bool, int, float, tuple via literal_eval)."""
    import ast

    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part, None)
        if node is None:
            raise BenchError(f"--set {key}={value!r}: the config has no field {key!r}")
    if leaf not in node:
        raise BenchError(f"--set {key}={value!r}: the config has no field {key!r}")
    old = node[leaf]
    try:
        if isinstance(old, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            new: Any = value.lower() in ("true", "1")
        elif isinstance(old, (int, float)):
            new = type(old)(value)
        elif isinstance(old, (tuple, list)):
            new = tuple(ast.literal_eval(value))
        else:
            new = value
    except (ValueError, SyntaxError) as e:
        raise BenchError(f"--set {key}={value!r}: not a {type(old).__name__} ({e})") from None
    node[leaf] = new


def forward_flops_per_sample(model_cfg: Any) -> float:
    """Model FLOPs of one UNet forward of one sample: 2 x (conv/dense MACs + attention-matmul MACs)."""
    from bdm_jax.efficiency import layer_shapes

    return 2.0 * sum(li.macs for li in layer_shapes(model_cfg))


# --------------------------------------------------------------------------------------------------
# Device, XLA analyses, timing
# --------------------------------------------------------------------------------------------------


def device_info() -> dict:
    import jax
    import jaxlib

    dev = jax.devices()[0]
    stats = _memory_stats()
    return dict(
        platform=dev.platform, device_kind=str(dev.device_kind), device_count=jax.device_count(),
        jax=jax.__version__, jaxlib=jaxlib.__version__, python=platform.python_version(), host=socket.gethostname(),
        bytes_limit=stats.get("bytes_limit"),
        # how JAX's GPU allocator was set up: a largest batch depends on it (docs/PERF_NOTES.md, session 5)
        allocator={k: os.environ.get(f"XLA_PYTHON_CLIENT_{k.upper()}")
                   for k in ("preallocate", "mem_fraction", "allocator")},
    )


def _memory_stats() -> dict:
    import jax

    try:
        return dict(jax.devices()[0].memory_stats() or {})
    except Exception:  # some backends raise instead of returning None
        return {}


def memory_now() -> dict:
    """bytes_in_use / peak_bytes_in_use / bytes_limit of device 0 (None where the backend has no counters)."""
    s = _memory_stats()
    return {k: (int(s[k]) if k in s else None) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def cost_flops(analysis: Any) -> float | None:
    """'flops' of a cost analysis: a dict (new JAX) or a list of per-module dicts (older JAX)."""
    if analysis is None:
        return None
    if isinstance(analysis, (list, tuple)):
        vals = [cost_flops(a) for a in analysis]
        vals = [v for v in vals if v is not None]
        return sum(vals) if vals else None
    v = analysis.get("flops") if hasattr(analysis, "get") else None
    return float(v) if v is not None and v >= 0 else None


def compiled_flops(compiled: Any) -> float | None:
    try:
        return cost_flops(compiled.cost_analysis())
    except Exception:
        return None


def lowered_flops(lowered: Any) -> float | None:
    """FLOPs of the unoptimized HLO (backend independent; no custom calls hide convs here)."""
    try:
        return cost_flops(lowered.cost_analysis())
    except Exception:
        return None


def pick_flops(compiled: float | None, hlo: float | None) -> tuple[float | None, str]:
    """XLA's FLOPs of a step: the compiled executable's count, unless it lacks most of the unoptimized HLO's
    (a backend whose cost analysis does not see into library calls such as cuDNN convolutions)."""
    if compiled and (not hlo or compiled >= 0.5 * hlo):
        return compiled, "compiled"
    if hlo:
        return hlo, "hlo (compiled cost analysis gave %s)" % (None if compiled is None else f"{compiled:.3g}")
    return None, "unavailable"


def compiled_memory(compiled: Any) -> dict:
    """XLA's memory analysis of an executable (argument/output/temp/alias bytes), {} where unavailable."""
    try:
        ma = compiled.memory_analysis()
    except Exception:
        return {}
    if ma is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k: int(getattr(ma, k)) for k in keys if hasattr(ma, k)}


def summarize(times: list[float]) -> dict:
    """Median / min / mean / p90 seconds of timed calls."""
    if not times:
        return dict(n=0)
    s = sorted(times)
    return dict(n=len(s), median_s=statistics.median(s), min_s=s[0], mean_s=statistics.fmean(s),
                p90_s=s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)])


def time_calls(call: Callable[[], Any], *, min_n: int, max_n: int, max_s: float) -> list[float]:
    """Seconds of each blocking `call()` (it must block itself): at least min_n, at most max_n or ~max_s."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_n and (len(times) < min_n or time.perf_counter() - start < max_s):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def short_error(exc: BaseException) -> str:
    """One line: exception type and the first informative line of its message."""
    msg = str(exc).strip().splitlines()
    first = next((ln for ln in msg if ln.strip()), "")
    return f"{type(exc).__name__}: {first[:500]}"


def is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def error_fields(exc: BaseException) -> dict:
    return dict(status="oom" if is_oom(exc) else "error", error=short_error(exc),
                traceback=traceback.format_exc(limit=8)[-4000:])


def write_json(path: str, obj: Any) -> str:
    """Atomic write (tmp + rename), so a killed run never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)
    return path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------------
# Random weights of the right shapes (values do not change speed or memory)
# --------------------------------------------------------------------------------------------------


def random_variables(model: Any, model_cfg: Any, seed: int = 0) -> dict:
    """{'params': ..., 'masks': ...} of `model` filled on the device by one small jitted RNG program.

    Floats ~ 0.05 * N(0, 1) (scales and LSQ steps 0.05), unsigned words (packed sign bits) random bits,
    masks 1 (fully binarized). Much cheaper than compiling `model.init` (a whole forward) on a big UNet.
    """
    import jax
    import jax.numpy as jnp

    s, c = model_cfg.image_size, model_cfg.in_channels
    y = jnp.zeros((1,), jnp.int32) if model_cfg.num_classes else None
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, c)), jnp.zeros((1,), jnp.int32), y)
    shapes = {k: v for k, v in shapes.items() if k in ("params", "masks")}

    def fill(key):
        leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
        kind = []
        for path, leaf in leaves:
            if getattr(path[0], "key", "") == "masks":
                kind.append("one")
            elif jnp.issubdtype(leaf.dtype, jnp.unsignedinteger):
                kind.append("bits")
            elif getattr(path[-1], "key", "") in ("scales", "act_step"):
                kind.append("const")
            else:
                kind.append("normal")
        # One RNG draw per kind, sliced per leaf: an RNG per leaf makes a huge HLO that compiles slowly.
        size = lambda want: sum(leaf.size for (_, leaf), k in zip(leaves, kind) if k == want)  # noqa: E731
        k_n, k_b = jax.random.split(key)
        pools = {"normal": 0.05 * jax.random.normal(k_n, (size("normal"),), jnp.float32),
                 "bits": jax.random.bits(k_b, (size("bits"),), jnp.uint32)}
        offset = {"normal": 0, "bits": 0}
        out = []
        for (_, leaf), k in zip(leaves, kind):
            if k in pools:
                flat = pools[k][offset[k]:offset[k] + leaf.size]
                offset[k] += leaf.size
                out.append(flat.reshape(leaf.shape).astype(leaf.dtype))
            else:
                out.append(jnp.full(leaf.shape, 1.0 if k == "one" else 0.05, leaf.dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    out = jax.jit(fill)(jax.random.key(seed))
    out.setdefault("masks", {})
    return jax.block_until_ready(out)


# --------------------------------------------------------------------------------------------------
# Where the time goes: device-trace breakdown of a compiled step (issue 9, analysis)
# --------------------------------------------------------------------------------------------------
_HLO_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S.*?\s([\w\-]+)\((.*)$")


def hlo_instruction_info(hlo_text: str) -> dict[str, dict]:
    """{instruction name: {opcode, kind, target, op_name}} of a compiled module's text (`compiled.as_text()`).

    op_name is the JAX source path XLA keeps as metadata (flax adds the module path, e.g.
    `jit(step_fn)/transpose(jvp(UNet))/output_blocks_3/attn/qkv/dot_general`).
    """
    info = {}
    for line in hlo_text.splitlines():
        m = _HLO_LINE.match(line)
        if not m:
            continue
        name, opcode, rest = m.group(1), m.group(2), m.group(3)
        kind = re.search(r"\bkind=(k\w+)", rest)
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        op_name = re.search(r'op_name="([^"]+)"', rest)
        info[name] = dict(opcode=opcode, kind=kind.group(1) if kind else "",
                          target=target.group(1) if target else "", op_name=op_name.group(1) if op_name else "")
    return info


def op_category(info: dict, kernel: str = "") -> str:
    """Coarse kind of an HLO instruction: conv, matmul, attention (fused), elementwise/reduce fusion, copy, ..."""
    target, opcode, op_name = info.get("target", "").lower(), info.get("opcode", ""), info.get("op_name", "")
    text = f"{target} {kernel.lower()}"
    if "lsq_flash" in text or "lsq_flash" in op_name or "pallas_call" in op_name:
        return "fused attention (flash_lsq)"
    if "fmha" in text or "flash" in text or "dot_product_attention" in op_name:
        return "fused attention"
    if "conv" in target or opcode == "convolution":
        return "convolution"
    if "gemm" in target or "matmul" in target or opcode == "dot" or "cublas" in text:
        return "matmul"
    if opcode == "fusion":
        kind = {"kLoop": "loop", "kInput": "reduce", "kOutput": "output", "kCustom": "custom"}.get(info.get("kind"), "")
        return f"fusion ({kind})" if kind else "fusion"
    if opcode in ("copy", "transpose", "copy-start", "copy-done"):
        return "copy/transpose"
    if opcode in ("all-reduce", "all-gather", "reduce-scatter", "all-reduce-start", "collective-permute"):
        return "collective"
    return opcode or "other"


def op_phase(op_name: str) -> str:
    """Which part of a train step an op belongs to, from its JAX source path.

    The student's loss is differentiated (`jvp(...)` forward, `transpose(jvp(...))` backward); the teacher's
    forward runs outside the gradient (a UNet path without jvp); the rest is the optimizer / EMA / bookkeeping.
    """
    if "transpose(jvp" in op_name:
        return "student backward"
    if "jvp(" in op_name:
        return "student forward"
    if "UNet" in op_name or "/input_blocks_" in op_name or "/output_blocks_" in op_name or "/middle_block" in op_name:
        return "teacher forward"
    return "optimizer/other"


def op_component(op_name: str) -> str:
    """The model part an op comes from (attention, quantizers, binarizer, norms, convs, LRM, ...)."""
    prim = op_name.rsplit("/", 1)[-1] if op_name else ""
    if "lrm" in op_name or "project" in op_name:
        return "LRM"
    if "_quant/" in op_name:  # q_quant, k_quant, v_quant, attn_quant (QAct modules)
        return "attention-operand quantizers (LSQ)"
    if "jit(_where)" in op_name:  # mask 0/1 select of quantize_input / binarize_kernel (progressive)
        return "progressive mask select"
    if any(k in op_name for k in ("/attn/", "/attn1/", "/attn2/")) and prim != "conv_general_dilated":
        if "/qkv/" in op_name or "/proj_out/" in op_name or "/to_" in op_name:
            return "attention projections"
        return "attention core"
    if prim in ("round", "clamp", "floor"):
        return "activation quantizer (LSQ)"
    if prim in ("sign", "abs") or "scales" in op_name:
        return "weight binarizer"
    if "norm" in op_name:
        return "normalization"
    if prim == "conv_general_dilated":
        return "convolution"
    if prim == "dot_general":
        return "dense"
    return "other"


def _load_trace(trace_dir: str) -> Any:
    """The newest jax.profiler trace (.xplane.pb) under trace_dir, as jax.profiler.ProfileData."""
    import glob

    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise BenchError(f"no .xplane.pb trace under {trace_dir}")
    return ProfileData.from_file(files[-1])


def op_times(events: list[tuple[float, float, str, str]], exclusive: bool = True
             ) -> tuple[dict[str, float], dict[str, str]]:
    """({op: total ns}, {op: first kernel name}) of one device's (start ns, duration ns, op, kernel) events.

    `exclusive` counts each kernel from the end of the kernels before it: on Hopper XLA launches kernels early
    (programmatic dependent launch), and a kernel's traced interval then includes its wait for the one before
    (seen: a weight reduction traced at 610 us, all but its last 6.5 us inside the convolution before it).
    Exclusive times add up to the device's busy time (the union of the intervals); inclusive ones count overlaps
    twice.
    """
    times: dict[str, float] = {}
    kernels: dict[str, str] = {}
    busy_until = float("-inf")
    for start, dur, op, name in sorted(events):
        end = start + dur
        times[op] = times.get(op, 0.0) + (max(0.0, end - max(start, busy_until)) if exclusive else dur)
        busy_until = max(busy_until, end)
        kernels.setdefault(op, name)
    return times, kernels


def trace_events(trace_dir: str) -> list[list[tuple[float, float, str, str]]]:
    """Per device, the (start ns, duration ns, HLO op, kernel name) events of a jax.profiler trace: device planes
    (GPU kernels carry the `hlo_op` that launched them), on CPU the host plane's thunks."""
    data = _load_trace(trace_dir)
    planes = [p for p in data.planes if p.name.startswith("/device:")] or [
        p for p in data.planes if p.name.startswith("/host:CPU")]
    return [[(float(ev.start_ns), float(ev.duration_ns), op, ev.name)
             for line in plane.lines for ev in line.events
             if (op := dict(ev.stats).get("hlo_op")) and not ev.name.startswith("end: ")] for plane in planes]


def trace_op_times(trace_dir: str | None = None, exclusive: bool = True,
                   events: list[list[tuple[float, float, str, str]]] | None = None
                   ) -> tuple[dict[str, float], dict[str, str]]:
    """`op_times` of a trace's devices (`trace_events`, or `events` already read), summed over devices."""
    times: dict[str, float] = {}
    kernels: dict[str, str] = {}
    for device_events in (events if events is not None else trace_events(trace_dir)):
        t, k = op_times(device_events, exclusive)
        for op, ns in t.items():
            times[op] = times.get(op, 0.0) + ns
        for op, name in k.items():
            kernels.setdefault(op, name)
    return times, kernels


def host_breakdown(trace_dir: str, steps: int, top: int = 40) -> dict:
    """Host-side events of a jax.profiler trace, per step: busy time of each host thread and the top event names.

    Times are inclusive (an event nested in another of a different name counts in both; in one of the same name,
    once), so they say where the host waits or works, not a partition of the step (issue 9: what a step's call
    costs the host per state leaf and per kernel).
    """
    data = _load_trace(trace_dir)
    threads: dict[str, float] = {}
    events: dict[tuple[str, str], list[float]] = {}
    for plane in data.planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            tname = f"{plane.name}/{line.name}"
            busy, end = 0.0, -1.0
            for ev in sorted(line.events, key=lambda e: e.start_ns):
                if "start_trace" in ev.name or "stop_trace" in ev.name:  # the profiler's own frames
                    continue
                dur, start = float(ev.duration_ns), float(ev.start_ns)
                # busy = union of the line's top-level intervals (nested events add nothing)
                if start >= end:
                    busy += dur
                    end = start + dur
                elif start + dur > end:
                    busy += start + dur - end
                    end = start + dur
                agg = events.setdefault((tname, ev.name), [0.0, 0, -1.0])
                agg[0] += max(0.0, start + dur - max(start, agg[2]))  # nested in a same-named event: no time
                agg[1] += 1
                agg[2] = max(agg[2], start + dur)
            if busy:
                threads[tname] = threads.get(tname, 0.0) + busy
    top_events = sorted(events.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(steps=steps,
                threads=[dict(thread=t, busy_ms_per_step=ns / steps / 1e6)
                         for t, ns in sorted(threads.items(), key=lambda kv: -kv[1])],
                top_events=[dict(thread=t, name=n[:200], ms_per_step=v[0] / steps / 1e6, count_per_step=v[1] / steps)
                            for (t, n), v in top_events])


def source_key(op_name: str) -> str:
    """An op's JAX source path with layer indices folded (`output_blocks_7` -> `output_blocks_*`), so the ops of
    one kind of layer add up: `by_source` says which code a category's time comes from (e.g. which reductions)."""
    return re.sub(r"_\d+(?=/|$)", "_*", op_name.removeprefix("jit(step_fn)/"))


def profile_breakdown(trace_dir: str, hlo_text: str, steps: int, top: int = 25, top_sources: int = 120) -> dict:
    """Device time per step of a traced compiled step, grouped by op category, step phase, model part and
    source path (`source_key`; the `top_sources` largest), with the `top` largest ops.

    Times are exclusive (`trace_op_times`): device_ms_per_step is the device's busy time;
    kernel_ms_per_step adds up the kernels' own intervals, overlaps counted twice (what rows before
    session 5 called device time)."""
    events = trace_events(trace_dir)
    times, kernels = trace_op_times(events=events)
    inclusive = sum(trace_op_times(events=events, exclusive=False)[0].values())
    info = hlo_instruction_info(hlo_text)
    total = sum(times.values())
    groups: dict[str, dict[str, float]] = {"category": {}, "phase": {}, "component": {}}
    rows = []
    sources: dict[tuple[str, str, str], list] = {}
    for op, ns in times.items():
        i = info.get(op, {})
        cat, phase, comp = op_category(i, kernels.get(op, "")), op_phase(i.get("op_name", "")), op_component(i.get("op_name", ""))
        for g, key in (("category", cat), ("phase", phase), ("component", comp)):
            groups[g][key] = groups[g].get(key, 0.0) + ns
        src = sources.setdefault((source_key(i.get("op_name", "")) or op, phase, cat), [0.0, 0])
        src[0] += ns
        src[1] += 1
        rows.append(dict(op=op, ms_per_step=ns / steps / 1e6, share=ns / total if total else 0.0, category=cat,
                         phase=phase, component=comp, op_name=i.get("op_name", ""), kernel=kernels.get(op, "")))
    rows.sort(key=lambda r: -r["ms_per_step"])

    def table(d: dict[str, float]) -> list[dict]:
        return [dict(name=k, ms_per_step=v / steps / 1e6, share=v / total if total else 0.0)
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])]

    return dict(steps=steps, device_ms_per_step=total / steps / 1e6, kernel_ms_per_step=inclusive / steps / 1e6,
                ops_traced=len(times),
                ops_matched_to_hlo=sum(op in info for op in times),
                by_category=table(groups["category"]), by_phase=table(groups["phase"]),
                by_component=table(groups["component"]), top_ops=rows[:top],
                by_source=[dict(source=k[0], phase=k[1], category=k[2], ops=n, ms_per_step=ns / steps / 1e6,
                                share=ns / total if total else 0.0)
                           for k, (ns, n) in sorted(sources.items(), key=lambda kv: -kv[1][0])[:top_sources]])
