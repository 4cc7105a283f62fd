"""Turn a benchmark results directory into docs/BENCHMARKS.md (issue 9).

    python -m benchmarks.report --results=benchmarks/results/h100                 # -> docs/BENCHMARKS.md
    python -m benchmarks.report --results=/tmp/bench --out=/tmp/bench/BENCHMARKS.md

Reads peak.json, train/*.json, sample/*.json and summary.json (any may be missing). MFU = the step's
achieved FLOP/s (XLA cost analysis of the compiled step / median step time) over the measured bf16 matmul
peak of the same device (benchmarks.peak); "model MFU" uses model FLOPs (2 x MACs of the UNet passes)
instead of XLA's count. Peak memory is the device's peak_bytes_in_use of the row's process; where the
backend has no counters (CPU) it is XLA's estimate for the step (arguments + outputs + temporaries -
donated aliases), marked "~".
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from benchmarks import common

GIB = 2**30


def _load_dir(results: str) -> dict:
    def load(path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    return dict(
        peak=load(f"{results}/peak.json"),
        summary=load(f"{results}/summary.json"),
        train=sorted((r for r in (load(p) for p in glob.glob(f"{results}/train/*.json")) if r), key=_order),
        sample=sorted((r for r in (load(p) for p in glob.glob(f"{results}/sample/*.json")) if r), key=_order),
        attention_core=load(f"{results}/attention_core.json"),
        qat_overhead=load(f"{results}/qat_overhead.json"),
    )


def attention_core_table(rec: dict | None) -> list[str]:
    """benchmarks.attention_core: fwd+bwd of one quantized attention core, explicit vs flash_lsq tile choices."""
    if not rec:
        return []
    out = [f"`python -m benchmarks.attention_core` (LSQ {rec.get('bits')}-bit softmax output, bf16, forward + backward "
           "of one attention core; errors are relative L2 against the float32 explicit function):", "",
           "| level | (B, T, H, d) | variant | fwd+bwd ms | err out | err dq | err dk | err dv | status |",
           "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rec.get("rows", []):
        ok = r.get("status") == "ok"
        e = r.get("rel_err_grads_vs_f32") or {}
        out.append(f"| {r['shape']} | {tuple(r['dims'])} | {r['variant']} | "
                   f"{_f(r.get('fwd_bwd_ms'), '.3f') if ok else '-'} | {_f(r.get('rel_err_out_vs_f32'), '.1e')} | "
                   f"{_f(e.get('q'), '.1e')} | {_f(e.get('k'), '.1e')} | {_f(e.get('v'), '.1e')} | "
                   f"{_status(r) + (' (' + r['error'] + ')' if not ok and r.get('error') else '')} |")
    return out + [""]


def _f(x, fmt: str = ".1f", none: str = "-") -> str:
    if x is None:
        return none
    if fmt == ".1f" and 0 < abs(x) < 0.1:  # CPU smoke runs: keep small numbers readable
        return format(x, ".2g")
    return format(x, fmt)


_MODE_ORDER = {"fp": 0, "baseline": 1, "binarydm": 2, "fakequant": 3, "packed": 4}


def _order(rec: dict) -> tuple:
    """Tables group by model, dtype, batch; FP first within a group."""
    batch = rec.get("batch") or rec.get("requested_batch")
    return (rec.get("model", ""), rec.get("dtype", ""), batch if isinstance(batch, int) else 1 << 30,
            _MODE_ORDER.get(rec.get("method", rec.get("mode")), 9), -(rec.get("act_bits") or 0), rec.get("name", ""))


def peak_gib(rec: dict) -> tuple[float | None, bool]:
    """(GiB, estimated?) of a train row: device counter, else XLA's memory analysis of the step."""
    peak = (rec.get("memory") or {}).get("peak_bytes_in_use")
    if peak:
        return peak / GIB, False
    xm = rec.get("xla_memory") or {}
    if "temp_size_in_bytes" in xm:
        est = (xm.get("argument_size_in_bytes", 0) + xm.get("output_size_in_bytes", 0)
               + xm["temp_size_in_bytes"] - xm.get("alias_size_in_bytes", 0))
        return est / GIB, True
    return None, False


def _compiled_flops(rec: dict) -> bool:
    """Whether a row's XLA FLOPs come from the compiled step (else from the unoptimized HLO)."""
    return str(rec.get("flops_source", "compiled")) == "compiled"


def mfu(tflops: float | None, peak_tflops: float | None) -> float | None:
    return tflops / peak_tflops if tflops and peak_tflops else None


def _variant(rec: dict) -> str:
    if rec.get("method") == "fp" or rec.get("mode") == "fp":
        return "FP"
    bits = rec.get("act_bits", 32)
    label = rec.get("method", rec.get("mode", "?"))
    return f"{label} W1A{bits}"


def _attn(rec: dict) -> str:
    """model.attention_impl of a train row (rows written before the option existed: the explicit path)."""
    model = (rec.get("config") or {}).get("model") or {}
    return model.get("attention_impl", "explicit")


def _overrides(rec: dict) -> dict:
    """Config overrides of an A/B row (train_step --set); {} for a default-config row."""
    return rec.get("overrides") or {}


def _status(rec: dict) -> str:
    s = rec.get("status", "?")
    return s if s == "ok" else f"**{s}**"


def train_table(rows: list[dict], peak_tflops: float | None) -> list[str]:
    out = ["| row | model | method | dtype | batch | step ms | img/s | pipelined ms | pipelined img/s | "
           "call returns ms | XLA TFLOP/s | MFU | model TFLOP/s | model MFU | peak GiB | compile s | status |",
           "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ok = r.get("status") == "ok"
        gib, est = peak_gib(r) if ok else (None, False)
        out.append("| " + " | ".join([
            r.get("name", "?"), r.get("model", "-"), _variant(r), r.get("dtype", "-"),
            str(r.get("batch", r.get("requested_batch", "-"))),
            _f(r.get("step_ms")) if ok else "-", _f(r.get("img_per_s")) if ok else "-",
            _f(1e3 * r["pipelined_step_s"]) if ok and r.get("pipelined_step_s") else "-",
            _f(r.get("img_per_s_pipelined")) if ok else "-",
            _f(1e3 * r["dispatch_timing"]["median_s"]) if ok and r.get("dispatch_timing") else "-",
            (_f(r.get("tflops_xla")) + ("" if _compiled_flops(r) else "†")) if ok else "-",
            _f(mfu(r.get("tflops_xla"), peak_tflops), ".1%") if ok else "-",
            _f(r.get("tflops_model")) if ok else "-", _f(mfu(r.get("tflops_model"), peak_tflops), ".1%") if ok else "-",
            ("~" if est else "") + _f(gib, ".2f"), _f(r.get("compile_s")) if ok else "-",
            _status(r) + (f" ({r['error']})" if not ok and r.get("error") else ""),
        ]) + " |")
    return out


def ratio_table(rows: list[dict]) -> list[str]:
    """QAT / FP step time, peak memory and compile time at the same model, dtype and batch."""
    ok = [r for r in rows if r.get("status") == "ok" and not _overrides(r)]
    fp = {(r["model"], r["dtype"], r["batch"], _attn(r)): r for r in ok if r.get("method") == "fp"}
    out = ["| model | dtype | batch | attention | QAT | FP ms | QAT ms | QAT / FP time | QAT / FP peak memory | "
           "QAT / FP compile |",
           "|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    n = 0
    for r in ok:
        f = fp.get((r["model"], r["dtype"], r["batch"], _attn(r)))
        if r.get("method") == "fp" or f is None:
            continue
        n += 1
        (gq, _), (gf, _) = peak_gib(r), peak_gib(f)
        mem = f"{gq / gf:.2f}x" if gq and gf else "-"
        comp = f"{r['compile_s'] / f['compile_s']:.2f}x" if r.get("compile_s") and f.get("compile_s") else "-"
        out.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {_attn(r)} | {_variant(r)} | {f['step_ms']:.1f} | "
                   f"{r['step_ms']:.1f} | {r['step_ms'] / f['step_ms']:.2f}x | {mem} | {comp} |")
    return out if n else ["(no FP and QAT rows at the same model, dtype, batch and attention core finished)"]


def attention_table(rows: list[dict]) -> list[str]:
    """The fused attention core (model.attention_impl=auto) against the explicit einsum path, same row otherwise."""
    ok = [r for r in rows if r.get("status") == "ok" and not _overrides(r)]
    key = lambda r: (r["model"], r.get("method"), r.get("act_bits"), r["dtype"], r["batch"])  # noqa: E731
    explicit = {key(r): r for r in ok if _attn(r) == "explicit" and r["name"].endswith("-attn_explicit")}
    out = ["| model | method | dtype | batch | explicit ms | auto (fused where unquantized) ms | speed-up | "
           "explicit peak GiB | auto peak GiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    n = 0
    for r in ok:
        e = explicit.get(key(r))
        if e is None or _attn(r) == "explicit":
            continue
        n += 1
        out.append(f"| {r['model']} | {_variant(r)} | {r['dtype']} | {r['batch']} | {e['step_ms']:.1f} | "
                   f"{r['step_ms']:.1f} | {e['step_ms'] / r['step_ms']:.2f}x | {_f(peak_gib(e)[0], '.2f')} | "
                   f"{_f(peak_gib(r)[0], '.2f')} |")
    return out if n else ["(no explicit / auto attention pair measured)"]


def override_table(rows: list[dict]) -> list[str]:
    """A/B rows (train_step --set KEY=VALUE) against the default-config row of the same model, method, batch."""
    ok = [r for r in rows if r.get("status") == "ok"]
    key = lambda r: (r["model"], r.get("method"), r.get("act_bits"), r["dtype"], r["batch"], _attn(r))  # noqa: E731
    base = {key(r): r for r in ok if not _overrides(r)}
    dev = lambda r: _f((r.get("profile") or {}).get("device_ms_per_step"))  # noqa: E731
    out = ["| row | override | override: step ms | pipelined ms | device ms | peak GiB | default: step ms | "
           "pipelined ms | device ms | peak GiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    n = 0
    for r in ok:
        b = base.get(key(r))
        if not _overrides(r) or b is None:
            continue
        n += 1
        pipe = lambda x: _f(1e3 * x["pipelined_step_s"]) if x.get("pipelined_step_s") else "-"  # noqa: E731
        ov = ", ".join(f"`{k}={v}`" for k, v in _overrides(r).items())
        out.append(f"| {r['name']} | {ov} | {r['step_ms']:.1f} | {pipe(r)} | {dev(r)} | {_f(peak_gib(r)[0], '.2f')} | "
                   f"{b['step_ms']:.1f} | {pipe(b)} | {dev(b)} | {_f(peak_gib(b)[0], '.2f')} |")
    return out if n else []


def profile_section(rows: list[dict], top: int = 10) -> list[str]:
    """Where the time goes: the device-trace breakdown of every profiled train row (train_step --profile_steps)."""
    out: list[str] = []
    for r in rows:
        p = r.get("profile")
        if r.get("status") != "ok" or not p:
            continue
        kernel = p.get("kernel_ms_per_step")  # profiles since session 5: exclusive times
        out += [f"#### {r['name']}", "",
                f"Device time {p['device_ms_per_step']:.1f} ms per step"
                + (f" (busy time; the kernels' own intervals add up to {kernel:.1f} ms, as kernels launched early "
                   f"wait inside them)" if kernel else " (kernel intervals added up)")
                + f" (trace of {p['steps']} steps; step time {r['step_ms']:.1f} ms; "
                f"{p['ops_matched_to_hlo']}/{p['ops_traced']} ops matched to the HLO).", ""]
        for title, group in (("step phase", "by_phase"), ("op kind", "by_category"), ("model part", "by_component")):
            out += [f"| {title} | ms / step | share |", "|---|---:|---:|"]
            out += [f"| {g['name']} | {g['ms_per_step']:.2f} | {g['share']:.1%} |" for g in p[group]] + [""]
        out += [f"Top {top} ops:", "", "| op | kind | phase | part | ms / step | share | source (op_name) |",
                "|---|---|---|---|---:|---:|---|"]
        for o in p["top_ops"][:top]:
            src = o["op_name"].replace("|", "/")
            src = src if len(src) <= 90 else "..." + src[-87:]
            out.append(f"| {o['op']} | {o['category']} | {o['phase']} | {o['component']} | {o['ms_per_step']:.2f} | "
                       f"{o['share']:.1%} | `{src}` |")
        out.append("")
        if p.get("by_source"):  # rows profiled since session 5
            out += [f"Top {top} sources (ops of one source path over all layers, indices folded):", "",
                    "| source | kind | phase | ops | ms / step | share |", "|---|---|---|---:|---:|---:|"]
            out += [f"| `{g['source'][-90:].replace('|', '/')}` | {g['category']} | {g['phase']} | {g['ops']} | "
                    f"{g['ms_per_step']:.2f} | {g['share']:.1%} |" for g in p["by_source"][:top]] + [""]
        host = p.get("host")
        if host:
            out += ["Host threads (busy ms per step) and the top host events (inclusive ms per step; "
                    + ("the timed executable" if not p.get("command_buffers_disabled")
                       else "the executable recompiled without XLA's command buffers") + "):", "",
                    "| thread | busy ms / step |", "|---|---:|"]
            out += [f"| {t['thread']} | {t['busy_ms_per_step']:.2f} |" for t in host["threads"][:8]] + [""]
            out += ["| host event | thread | ms / step | count / step |", "|---|---|---:|---:|"]
            out += [f"| `{e['name'][:80].replace('|', '/')}` | {e['thread'].split('/')[-1][:30]} | "
                    f"{e['ms_per_step']:.2f} | {e['count_per_step']:.0f} |" for e in host["top_events"][:15]] + [""]
    return out


def official_table(rows: list[dict], device: str) -> list[str]:
    ref = common.OFFICIAL_REFERENCE
    ok = [r for r in rows if r.get("status") == "ok" and r.get("model") == "ldm4" and not _overrides(r)]
    out = [f"| setting | official PyTorch ({ref['card']}, fp32): ms | img/s | peak GiB | bdm-jax ({device}) row | "
           "ms | img/s | pipelined img/s | peak GiB | speed-up (img/s) | speed-up (pipelined) |",
           "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for o in ref["rows"]:
        qat = o["what"].startswith("QAT")
        want = ("binarydm", 8) if qat else ("fp", 32)
        mine = [r for r in ok if r["batch"] == o["batch"] and (r.get("method"), r.get("act_bits")) == want]
        mine.sort(key=lambda r: r.get("dtype") != "bf16")  # bf16 first, then f32
        if not mine:
            out.append(f"| {o['what']}, batch {o['batch']} | {o['step_ms']:.0f} | {o['img_s']:.1f} | "
                       f"{_f(o['peak_gib'])} | (not measured) | - | - | - | - | - | - |")
        for r in mine:
            gib, est = peak_gib(r)
            out.append(f"| {o['what']}, batch {o['batch']} | {o['step_ms']:.0f} | {o['img_s']:.1f} | "
                       f"{_f(o['peak_gib'])} | {r['name']} | {r['step_ms']:.1f} | {r['img_per_s']:.1f} | "
                       f"{_f(r.get('img_per_s_pipelined'))} | "
                       f"{'~' if est else ''}{_f(gib, '.2f')} | {r['img_per_s'] / o['img_s']:.1f}x | "
                       + (f"{r['img_per_s_pipelined'] / o['img_s']:.1f}x |" if r.get("img_per_s_pipelined") else "- |"))
    return out


def sample_table(rows: list[dict]) -> list[str]:
    out = ["| row | model | weights | dtype | batch | DDIM steps | s per batch | img/s | ms/step | model TFLOP/s | "
           "weights MiB | compile s | status |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ok = r.get("status") == "ok"
        steps = str(r.get("steps", "-"))
        if ok and r.get("extrapolated"):
            steps += f" (from {r['steps_measured']}, extrapolated)"
        out.append("| " + " | ".join([
            r.get("name", "?"), r.get("model", "-"), _variant(r), r.get("dtype", "-"), str(r.get("batch", "-")), steps,
            _f(r.get("sample_s"), ".3f") if ok else "-", _f(r.get("img_per_s"), ".2f") if ok else "-",
            _f(r.get("step_ms"), ".2f") if ok else "-", _f(r.get("tflops_model")) if ok else "-",
            _f(r["weight_bytes"] / 2**20) if ok and r.get("weight_bytes") else "-",
            _f(r.get("compile_s")) if ok else "-",
            _status(r) + (f" ({r['error']})" if not ok and r.get("error") else ""),
        ]) + " |")
    # Speed of the binary modes relative to FP at the same model and batch.
    ok = [r for r in rows if r.get("status") == "ok"]
    fp = {(r["model"], r["batch"], r.get("dtype")): r for r in ok if r.get("mode") == "fp"}
    lines = []
    for r in ok:
        f = fp.get((r["model"], r["batch"], r.get("dtype")))
        if r.get("mode") != "fp" and f:
            lines.append(f"- {r['model']} batch {r['batch']}: {_variant(r)} takes {r['step_ms'] / f['step_ms']:.2f}x "
                         f"the FP time per step, with {r['weight_bytes'] / f['weight_bytes']:.2f}x its weight bytes")
    return out + ([""] + lines if lines else [])


def device_line(data: dict) -> tuple[str, dict]:
    recs = [data["peak"]] + data["train"] + data["sample"]
    info = next((r["device"] for r in recs if r and isinstance(r.get("device"), dict)), {})
    return (info.get("device_kind", "unknown device"), info)


def build_markdown(results: str) -> str:
    data = _load_dir(results)
    device, info = device_line(data)
    peak = data["peak"] or {}
    peak_tf = peak.get("peak_bf16_tflops")
    summary = data["summary"] or {}
    quick = any(r.get("quick") for r in data["train"] + data["sample"]) or summary.get("quick")
    L = ["# bdm-jax benchmarks", ""]
    if quick:
        L += ["> **Smoke run (`--quick`)**: tiny models and batches; the numbers say nothing about performance.", ""]
    L += [f"Device: **{device}** ({info.get('platform', '?')}, {info.get('device_count', '?')} device(s)), "
          f"JAX {info.get('jax', '?')}, Python {info.get('python', '?')}.",
          f"Measured bf16 matmul peak: **{_f(peak_tf)} TFLOP/s**"
          + (f" (datasheet dense bf16: {peak['spec_bf16_tflops']} TFLOP/s)" if peak.get("spec_bf16_tflops") else "")
          + (f"; float32 matmul: {_f(peak.get('peak_f32_tflops'))} TFLOP/s" if peak.get("peak_f32_tflops") else "")
          + ". MFU below is relative to the measured bf16 peak (float32 rows too).", ""]
    if summary:
        L += ["Command:", "", f"    {summary.get('command', 'python -m benchmarks.run_all')}", "",
              f"Started {summary.get('started', '?')}, budget {summary.get('budget_s', '?')} s, "
              f"took {summary.get('elapsed_s', '?')} s."
              + (" Rows shared a persistent compilation/autotuning cache (`--compile_cache`): compile times after "
                 "the first rows are not cold compiles." if summary.get("compile_cache") else ""), ""]
    L += ["Report: `python -m benchmarks.report --results=<dir>`. Method: each row in its own process; the step is "
          "the library's (`trainer.make_train_step` under `jax.jit(donate_argnums=0)`, state from `make_init_fn`), "
          "on a fixed random batch (CIFAR-10: 32x32x3 images; LDM-4: 64x64x3 latents, no autoencoder); compile = "
          "`.lower().compile()`; step time = median of blocking steps after 2 warm-up steps; FLOPs = XLA cost "
          "analysis of the compiled step; model FLOPs = 2 x UNet MACs x batch x passes (FP 3, QAT with LRM 4: "
          "teacher forward + student forward + backward); peak = the process's `peak_bytes_in_use` (init + steps); "
          "pipelined = steps dispatched back to back, as a training loop runs them; call returns = median time "
          "until a blocked step's call returns: the host's work (argument checks, donation, one launch per kernel) "
          "plus any wait for the GPU's launch queue.",
          ""]
    L += ["## Training step", ""] + train_table(data["train"], peak_tf) + [""]
    if any(not _compiled_flops(r) for r in data["train"] if r.get("status") == "ok"):
        L += ["† the compiled step's cost analysis missed most FLOPs (library calls); these use the unoptimized "
              "HLO's count.", ""]
    L += ["### QAT / FP", ""] + ratio_table(data["train"]) + [""]
    ab = override_table(data["train"])
    if ab:
        L += ["### A/B rows: one config field changed", "",
              "Each row below is a default-config row with one field set back (`train_step --set KEY=VALUE`), to "
              "measure a change on the same card in the same run; device ms = the profiled kernel time per step where "
              "the row was traced.", ""] + ab + [""]
    L += ["### Attention core: fused (auto) vs explicit", "",
          "`model.attention_impl=auto` runs unquantized attention (FP model, teacher forward, W1A32 students) through "
          "`jax.nn.dot_product_attention` (cuDNN flash attention on GPU in bf16); attention whose softmax output is "
          "LSQ-quantized (W1A8/W1A4 students) runs the `bdm_jax.flash_lsq` Pallas kernel (quantizes each tile of "
          "probabilities on chip). Explicit = the einsum-softmax-einsum core with every tensor in memory. Same "
          "function (tests/test_attention.py, tests/test_flash_lsq.py). Rows measured before the fused quantized "
          "path existed are labelled by their `attention_impl` only; see docs/PERF_NOTES.md for which code each ran.",
          ""]
    L += attention_table(data["train"]) + [""] + attention_core_table(data.get("attention_core"))
    prof = profile_section(data["train"])
    if prof:
        L += ["### Where the time goes (device trace)", "",
              "`train_step --profile_steps=N`: a jax.profiler trace of N steps after the timing; kernel time per HLO "
              "op, grouped by XLA's op metadata (flax module paths): phase = teacher forward / student forward / "
              "student backward / optimizer; part = attention core, LSQ quantizers, progressive mask selects, "
              "binarizer, norms, convolutions, ...", ""] + prof
    qo = data.get("qat_overhead")
    if qo and qo.get("groups"):
        L += ["#### QAT-only work by fused kernel", "",
              f"`python -m benchmarks.qat_overhead --profile_dir={qo['profile_dir']} --steps={qo['steps']}`: the "
              "fused kernels that contain QAT-only work, by what they compute (their whole time: XLA fuses a quantizer "
              "into the layer work around it, so a group bounds that work's cost from above). Device time "
              f"{qo['device_ms_per_step']:.1f} ms per step.", "",
              "| fused kernels that contain | phase | ops | ms / step |", "|---|---|---:|---:|"]
        L += [f"| {g['kind']} | {g['phase']} | {g['ops']} | {g['ms_per_step']:.2f} |" for g in qo["groups"]] + [""]
    L += ["### Against the official PyTorch BinaryDM QAT step", "",
          f"Reference: {common.OFFICIAL_REFERENCE['source']}, measured on an **{common.OFFICIAL_REFERENCE['card']}** "
          f"with random 64x64x3 latents. Ours on **{device}**"
          + (" (a different card: compare the ratios with care)." if "H200" not in device else ".")
          + f" Goal: {common.OFFICIAL_REFERENCE['goal']}.", ""] + official_table(data["train"], device) + [""]
    goal = [r for r in data["train"] if r.get("status") == "ok" and r.get("model") == "ldm4" and r.get("batch") == 32
            and r.get("method") == "binarydm" and r.get("act_bits") == 8 and not _overrides(r)]
    if goal:
        best = max(goal, key=lambda r: r["img_per_s"])
        factor = best["img_per_s"] / 53.3
        met = "met" if factor >= common.OFFICIAL_REFERENCE["goal_factor"] else "not met"
        L += [f"Batch-32 QAT: {best['img_per_s']:.1f} img/s ({best['dtype']}) = **{factor:.1f}x** the official "
              f"53.3 img/s; goal 8x: **{met}** on {device}."
              + (f" Pipelined (steps dispatched back to back, as a training loop runs them): "
                 f"{best['img_per_s_pipelined']:.1f} img/s = {best['img_per_s_pipelined'] / 53.3:.1f}x."
                 if best.get("img_per_s_pipelined") else ""), ""]
    L += ["## Sampling (DDIM)", ""] + sample_table(data["sample"]) + [""]
    if any(r.get("latents_only") for r in data["sample"]):
        L += ["LDM-4 rows sample latents only (no VQ-f4 decode).", ""]
    missing = [r for r in summary.get("rows", []) if r.get("status") not in ("ok", "kept")]
    if missing:
        L += ["## Rows not measured or failed", ""]
        L += [f"- {r['name']}: {r.get('status')}" + (f" — {r['note']}" if r.get("note") else "") for r in missing]
        L += [""]
    return "\n".join(L)


def write(results: str, out: str) -> str:
    text = build_markdown(results)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", required=True, help="results directory of benchmarks.run_all")
    p.add_argument("--out", default=os.path.join(common.ROOT, "docs", "BENCHMARKS.md"), help="markdown file to write")
    a = p.parse_args(argv)
    if not os.path.isdir(a.results):
        print(f"--results={a.results} is not a directory", file=sys.stderr)
        return 2
    print(f"wrote {write(a.results, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
