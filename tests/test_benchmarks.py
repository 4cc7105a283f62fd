"""The issue-9 benchmark scripts on CPU: driver, rows, failure handling, markdown.

~65 s on a busy 2-core machine, most of it in one fixture that runs the driver (two rows, two processes).
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import common, report, run_all, sampling, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QAT_ROW = train_step.row_name("ldm4", "binarydm", 8, "f32", 32)  # f32: compiles faster on CPU


def _load(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One quick driver run: the LDM-4 QAT row (W1A8 + LRM, the official setting) and CIFAR-10 sampling in FP,
    fake-quant and packed W1A4, each row in its own process, as on the GPU (peak.py: the failure test)."""
    out = str(tmp_path_factory.mktemp("bench"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", f"--out={out}", "--quick", "--budget_s=400",
                           f"--rows={QAT_ROW},sample-cifar10-b1", "--sample_act_bits=4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_driver_runs_rows_and_writes_summary(results):
    out, stdout = results
    summary = _load(f"{out}/summary.json")
    assert [r["name"] for r in summary["rows"]] == [QAT_ROW, "sample-cifar10-b1"]
    assert all(r["status"] == "ok" for r in summary["rows"]), summary["rows"]
    assert f"{QAT_ROW}: ok" in stdout  # progress lines reach the console
    assert os.path.exists(f"{out}/logs/{QAT_ROW}.log")


def test_train_row_measures_the_qat_step(results):
    out, _ = results
    r = _load(f"{out}/train/{QAT_ROW}.json")
    assert r["status"] == "ok" and r["quick"] and r["method"] == "binarydm" and r["act_bits"] == 8
    assert r["batch"] == 4 and r["model_passes"] == 4  # quick caps the batch; QAT + LRM = 4 UNet passes
    assert r["compile_s"] > 0 and r["timing"]["n"] >= 2
    assert r["step_ms"] == pytest.approx(1e3 * r["timing"]["median_s"])
    assert r["img_per_s"] == pytest.approx(r["batch"] / r["timing"]["median_s"])
    # XLA's count of the whole step and the model-FLOPs formula (4 UNet passes) agree roughly.
    assert r["flops_source"] == "compiled"
    assert 0.9 < r["flops_xla"] / r["flops_model"] < 1.25  # 3 or 5 passes would be out of range
    assert r["tflops_xla"] == pytest.approx(r["flops_xla"] / r["timing"]["median_s"] / 1e12)
    assert r["xla_memory"]["temp_size_in_bytes"] > 0 and r["state_bytes"] > 0
    assert all(v == v and v < 1e6 for v in (r["loss_after_warmup"], r["loss_final"]))  # finite
    # When each blocked step's call returned: measured inside the step, so never later than its end.
    disp = r["dispatch_timing"]
    assert disp["n"] == r["timing"]["n"] and 0 < disp["median_s"] <= r["timing"]["median_s"]
    assert r["state_leaves"] > 100 and r["overrides"] == {}


def test_sampling_rows_cover_fp_fakequant_packed(results):
    out, _ = results
    by_mode = {m: _load(f"{out}/sample/{sampling.row_name('cifar10', m, 32 if m == 'fp' else 4, 'bf16', 1)}.json")
               for m in sampling.MODES}
    for r in by_mode.values():
        assert r["status"] == "ok", r.get("error")
        assert r["extrapolated"] and r["steps"] == 100 and r["steps_measured"] == 2 and r["batch"] == 1
        assert r["sample_s"] == pytest.approx(100 * r["timing"]["median_s"] / 2)
        assert r["img_per_s"] == pytest.approx(1 / r["sample_s"])
    # The packed model really holds 1-bit words: far fewer weight bytes than the latent-float student.
    assert by_mode["packed"]["weight_bytes"] < 0.5 * by_mode["fakequant"]["weight_bytes"]
    assert by_mode["fakequant"]["act_bits"] == 4 and by_mode["fp"]["act_bits"] == 32


def test_markdown_from_the_run(results):
    out, _ = results
    md = open(f"{out}/BENCHMARKS.md").read()
    assert "Smoke run" in md and "Device: **cpu**" in md
    assert QAT_ROW in md and "sample-cifar10-packed_w1a4-bf16-b1" in md
    assert "NVIDIA H200" in md and "official" in md  # the PyTorch reference is named with its card
    assert "100 (from 2, extrapolated)" in md


def test_failing_rows_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """A crashing process, a hanging one and one over budget: recorded; the rows after them still run."""
    monkeypatch.setattr(run_all, "MIN_CAP_S", 1.0)  # a row is killed after max(4 x estimate, 1 s)
    rows = [
        run_all.Row("crash", "peak", ["--sizes", "abc"], 1, ["crash.json"], quick_est_s=10),
        # A bf16 8192^3 matmul (x30 repeats) runs for minutes on a CPU: killed at the 1 s cap whatever the
        # machine (a 64^3 one can finish within 1 s once JAX imports fast).
        run_all.Row("hang", "peak", ["--sizes", "8192"], 1, ["hang.json"], quick_est_s=0.1),
        run_all.Row("huge", "peak", [], 1, ["huge.json"], quick_est_s=1e6),
        run_all.Row("peak", "peak", ["--sizes", "64"], 1, ["peak.json"], quick_est_s=60),
    ]
    summary = run_all.run(str(tmp_path), quick=True, budget_s=200, rows=rows)
    status = {r["name"]: r["status"] for r in summary["rows"]}
    assert status == {"crash": "crashed", "hang": "timeout", "huge": "skipped", "peak": "ok"}
    crash = _load(f"{tmp_path}/crash.json")
    assert crash["status"] == "crashed" and "exited 1" in crash["error"] and "invalid literal" in crash["log_tail"]
    assert "killed after 1 s" in _load(f"{tmp_path}/hang.json")["error"]
    peak = _load(f"{tmp_path}/peak.json")
    assert peak["status"] == "ok" and peak["peak_bf16_tflops"] > 0 and peak["device"]["platform"] == "cpu"
    assert [r["size"] for r in peak["results"]] == [64, 64]  # bf16 and float32
    md = open(f"{tmp_path}/BENCHMARKS.md").read()
    assert "- crash: crashed" in md and "- huge: skipped" in md


def test_largest_batch_row_retries_smaller_in_fresh_processes(tmp_path):
    """An OOM of a largest-batch row is kept as its own row and the batch tried again at 3/4, each in a new
    process (an in-process retry could not place the smaller step's buffer on an H100), at most BMAX_RETRIES."""
    def row(name, limit):
        return run_all.Row(name, "tests.fake_bmax_row", ["--name", name, "--limit", str(limit)], 1,
                           [f"train/{name}.json"], quick_est_s=1, batch_from=lambda out: (200, "estimate"))

    summary = run_all.run(str(tmp_path), quick=True, budget_s=120, rows=[row("fits3", 120), row("never", 10)])
    entry = {r["name"]: r for r in summary["rows"]}
    fits = _load(f"{tmp_path}/train/fits3.json")
    assert entry["fits3"]["status"] == "ok" and fits["batch"] == 104  # 200 -> 144 -> 104 (3/4, multiples of 8)
    assert "144 ran out of memory (row fits3-b144-oom)" in fits["note"]
    ooms = [_load(f"{tmp_path}/train/fits3-b{b}-oom.json") for b in (200, 144)]
    assert [(r["status"], r["batch"], r["name"]) for r in ooms] == [("oom", 200, "fits3-b200-oom"),
                                                                    ("oom", 144, "fits3-b144-oom")]
    assert len({r["pid"] for r in ooms + [fits]}) == 3  # three processes
    # each with JAX's pool allocated up front (a growing pool fragmented on an H100); other rows grow on demand
    assert {r["preallocate"] for r in ooms + [fits]} == {"true"}
    assert run_all.child_env(quick=True)["XLA_PYTHON_CLIENT_PREALLOCATE"] == os.environ.get(
        "XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    assert entry["fits3"]["oom_rows"] == ["fits3-b200-oom", "fits3-b144-oom"]
    # never fits: BMAX_RETRIES retries, then the last OOM stays the row's result
    assert run_all.BMAX_RETRIES == 2 and entry["never"]["status"] == "oom"
    assert _load(f"{tmp_path}/train/never.json")["batch"] == 104
    assert not os.path.exists(f"{tmp_path}/train/never-b104-oom.json")


def test_row_error_is_written_not_raised(tmp_path):
    rec = train_step.run_row(out=str(tmp_path), model="cifar10", method="fp", act_bits=32, dtype="bf16", batch=0,
                             quick=True)
    assert rec["status"] == "error" and "--batch=0" in rec["error"]
    assert _load(f"{tmp_path}/train/{rec['name']}.json")["status"] == "error"


def test_config_overrides_parse_as_the_field_type_and_bad_ones_fail_the_row(tmp_path):
    cfg = common.model_config("ldm4", "binarydm", 8, "bf16", 32)
    common.set_config(cfg, "quant.lrm_precision", "float32")
    common.set_config(cfg, "quant.lrm_k", "8")
    common.set_config(cfg, "quant.progressive", "false")
    common.set_config(cfg, "model.channel_mult", "(1, 2)")
    assert (cfg.quant.lrm_precision, cfg.quant.lrm_k, cfg.quant.progressive) == ("float32", 8, False)
    assert cfg.model.channel_mult == (1, 2)
    with pytest.raises(common.BenchError, match=r"no field 'quant.nope'"):
        common.set_config(cfg, "quant.nope", "1")
    with pytest.raises(common.BenchError, match=r"quant.lrm_k='x': not a int"):
        common.set_config(cfg, "quant.lrm_k", "x")
    # A value the config rejects: the row records validate's message (field, value, choices), no compile.
    rec = train_step.run_row(out=str(tmp_path), model="ldm4", method="binarydm", act_bits=8, dtype="bf16", batch=2,
                             quick=True, overrides={"quant.lrm_precision": "bf16"})
    assert rec["status"] == "error" and "quant.lrm_precision='bf16'" in rec["error"]
    assert rec["overrides"] == {"quant.lrm_precision": "bf16"}
    ab = next(r for r in run_all.plan(str(tmp_path), quick=False, f32=False) if "lrm_precision" in r.name)
    assert ab.name == "train-ldm4-binarydm_w1a8-bf16-b32-lrm_precision_float32"
    assert ab.args[ab.args.index("--set") + 1] == "quant.lrm_precision=float32"


@pytest.mark.parametrize("model", common.MODELS)
@pytest.mark.parametrize("method,bits", [("fp", 32), ("binarydm", 32), ("binarydm", 8), ("binarydm", 4)])
def test_benchmark_configs(model, method, bits):
    cfg = common.model_config(model, method, bits, "bf16", 32)
    assert cfg.method == method and cfg.quant.act_bits == bits and cfg.model.dtype == "bfloat16"
    assert cfg.train.batch_size == 32 and cfg.autoencoder.kind == "none"
    size, width = {"cifar10": (32, 128), "ldm4": (64, 224)}[model]  # the paper models, not tiny ones
    assert (cfg.model.image_size, cfg.model.model_channels, cfg.model.in_channels) == (size, width, 3)
    assert common.model_config(model, method, bits, "f32", 2, quick=True).model.model_channels == 32


def test_max_batch_from_measured_peak(tmp_path):
    gib = 2**30
    common.write_json(f"{tmp_path}/train/src.json", dict(
        status="ok", batch=32, memory=dict(peak_bytes_in_use=20 * gib, bytes_limit=80 * gib),
        memory_after_init=dict(bytes_in_use=5 * gib)))
    b, note = run_all.max_batch_from(str(tmp_path), ["missing", "src"], 64, quick=False)("row")
    assert b == 136 and "src" in note  # (0.9 x 80 - 5) GiB / (15/32 GiB per sample) = 142.9 -> multiple of 8
    b, note = run_all.max_batch_from(str(tmp_path), ["missing"], 64, quick=False)("row")
    assert b == 64 and "fallback" in note


def test_plan_orders_headline_first_and_selects_by_pattern(tmp_path):
    rows = run_all.plan(str(tmp_path), quick=False, f32=True)
    names = [r.name for r in rows]
    assert names[:3] == ["peak", "train-ldm4-binarydm_w1a8-bf16-b32", "train-ldm4-fp-bf16-b32"]
    assert train_step.row_name("ldm4", "binarydm", 8, "bf16", 4) in names
    assert {"sample-cifar10-b1", "sample-cifar10-b256", "sample-ldm4-b1", "sample-ldm4-b256"} <= set(names)
    assert names[-1] == QAT_ROW
    assert len(set(names)) == len(names)
    picked = [r.name for r in run_all.select(rows, ["sample-ldm4-*", "peak"])]
    assert picked == ["sample-ldm4-b1", "sample-ldm4-b256", "peak"]
    assert "train-cifar10-fp-f32-b128" not in [r.name for r in run_all.plan(str(tmp_path), quick=False, f32=False)]


def test_report_ratios_mfu_and_official_comparison(tmp_path):
    gib = 2**30
    dev = dict(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", device_count=1, jax="x", python="3.12")
    common.write_json(f"{tmp_path}/peak.json", dict(kind="peak", device=dev, peak_bf16_tflops=500.0,
                                                    spec_bf16_tflops=989.4, status="ok"))
    base = dict(kind="train", model="ldm4", dtype="bf16", batch=32, status="ok", compile_s=60.0, device=dev,
                flops_source="compiled", memory=dict(peak_bytes_in_use=10 * gib))
    common.write_json(f"{tmp_path}/train/fp.json", dict(base, name="fp-row", method="fp", act_bits=32, step_ms=50.0,
                                                        img_per_s=640.0, tflops_xla=250.0, tflops_model=200.0))
    common.write_json(f"{tmp_path}/train/qat.json", dict(base, name="qat-row", method="binarydm", act_bits=8,
                                                         step_ms=100.0, img_per_s=320.0, tflops_xla=100.0,
                                                         tflops_model=90.0, compile_s=72.0,
                                                         memory=dict(peak_bytes_in_use=15 * gib)))
    # An A/B row (one config field set back): in the A/B table, kept out of the QAT/FP and official tables.
    common.write_json(f"{tmp_path}/train/ab.json", dict(base, name="qat-row-lrm_float32", method="binarydm",
                                                        act_bits=8, step_ms=104.0, img_per_s=307.7,
                                                        overrides={"quant.lrm_precision": "float32"}))
    common.write_json(f"{tmp_path}/train/oom.json", dict(kind="train", name="oom-row", model="ldm4", method="fp",
                                                         dtype="bf16", requested_batch=512, status="oom",
                                                         error="XlaRuntimeError: RESOURCE_EXHAUSTED"))
    bmax = next(r for r in run_all.plan(str(tmp_path), quick=False, f32=False) if r.name == "train-ldm4-fp-bf16-bmax")
    run_all._stub(f"{tmp_path}/{bmax.outputs[0]}", bmax, "skipped", "skipped: budget")  # what the driver writes
    common.write_json(f"{tmp_path}/qat_overhead.json", dict(profile_dir="P", steps=3, device_ms_per_step=90.0, groups=[
        dict(kind="LSQ step-size gradient (reduction)", phase="student backward", ops=130, ms_per_step=3.67)]))
    md = report.build_markdown(str(tmp_path))
    assert "| LSQ step-size gradient (reduction) | student backward | 130 | 3.67 |" in md
    assert "| train-ldm4-fp-bf16-bmax | ldm4 | FP | bf16 | max |" in md and "**skipped** (skipped: budget)" in md
    assert "NVIDIA H100 80GB HBM3" in md and "500.0 TFLOP/s" in md
    fp_line = next(ln for ln in md.splitlines() if ln.startswith("| fp-row"))
    assert "| 50.0% |" in fp_line and "| 40.0% |" in fp_line and "| 10.00 |" in fp_line  # MFU, model MFU, GiB
    assert "| 2.00x | 1.50x | 1.20x |" in md  # QAT/FP: time, peak memory, compile time
    assert "6.0x" in md and "**not met**" in md  # 320 img/s vs the official 53.3 img/s at batch 32
    assert "a different card" in md
    assert "**oom** (XlaRuntimeError: RESOURCE_EXHAUSTED)" in md
    assert ("| qat-row-lrm_float32 | `quant.lrm_precision=float32` | 104.0 | - | - | 10.00 | 100.0 | - | - | 15.00 |"
            in md)
    assert "2.08x" not in md and "5.8x" not in md  # the A/B row is no QAT/FP ratio, no official comparison


def test_cost_flops_across_jax_versions():
    assert common.cost_flops({"flops": 10.0, "bytes accessed": 3.0}) == 10.0
    assert common.cost_flops([{"flops": 10.0}, {"flops": 5.0}]) == 15.0  # older JAX: one dict per module
    assert common.cost_flops(None) is None and common.cost_flops([{}]) is None
    assert common.pick_flops(100.0, 120.0) == (100.0, "compiled")
    assert common.pick_flops(10.0, 120.0)[0] == 120.0  # compiled count misses the convolutions


def test_op_times_count_early_launched_kernels_from_the_end_of_the_one_before():
    """A kernel launched before its predecessor ends (Hopper's programmatic dependent launch) is charged only
    for the time after it: the exclusive times add up to the union of the intervals."""
    events = [(0.0, 600.0, "conv", "wgrad"), (100.0, 510.0, "reduce", "r"), (700.0, 50.0, "reduce", "r"),
              (720.0, 10.0, "nested", "n")]
    times, kernels = common.op_times(events)
    assert times == {"conv": 600.0, "reduce": 10.0 + 50.0, "nested": 0.0}
    assert sum(times.values()) == 660.0  # [0, 610] and [700, 750]
    inclusive, _ = common.op_times(events, exclusive=False)
    assert inclusive == {"conv": 600.0, "reduce": 560.0, "nested": 10.0}
    assert kernels == {"conv": "wgrad", "reduce": "r", "nested": "n"}


def test_profile_breakdown_of_a_traced_step(tmp_path):
    """A real jax.profiler trace of a small jitted function: every traced op is matched to the compiled HLO,
    the groups add up to the total, and the phase/component rules read flax's op_name paths."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum() + jnp.sin(a).mean())
    a = jnp.ones((128, 128)) * 0.01
    compiled = f.lower(a, a).compile()
    compiled(a, a).block_until_ready()
    jax.profiler.start_trace(str(tmp_path))
    for _ in range(2):
        compiled(a, a).block_until_ready()
    jax.profiler.stop_trace()
    prof = common.profile_breakdown(str(tmp_path), compiled.as_text(), steps=2)
    assert prof["ops_traced"] > 0 and prof["ops_matched_to_hlo"] == prof["ops_traced"]
    assert 0 < prof["device_ms_per_step"] <= prof["kernel_ms_per_step"] * (1 + 1e-9)
    for group in ("by_category", "by_phase", "by_component"):
        assert sum(r["share"] for r in prof[group]) == pytest.approx(1.0)
    assert sum(r["ms_per_step"] for r in prof["by_category"]) == pytest.approx(prof["device_ms_per_step"])
    # every op lands in one source group (none cut off at this size)
    assert sum(r["ops"] for r in prof["by_source"]) == prof["ops_traced"]
    assert sum(r["share"] for r in prof["by_source"]) == pytest.approx(1.0)
    assert common.source_key("jit(step_fn)/transpose(jvp(UNet))/output_blocks_7/res_0/GroupNorm_1/reduce_sum") == (
        "transpose(jvp(UNet))/output_blocks_*/res_*/GroupNorm_*/reduce_sum")
    assert common.source_key("jit(step_fn)/UNet/conv_in/conv_general_dilated") == "UNet/conv_in/conv_general_dilated"
    md = "\n".join(report.profile_section([dict(name="r", status="ok", step_ms=1.0, profile=prof)]))
    top = prof["by_source"][0]
    assert "sources (ops of one source path" in md and f"| {top['ops']} | {top['ms_per_step']:.2f} |" in md
    host = common.host_breakdown(str(tmp_path), steps=2)
    assert host["threads"] and all(t["busy_ms_per_step"] > 0 for t in host["threads"])
    assert host["top_events"] and host["top_events"] == sorted(host["top_events"], key=lambda e: -e["ms_per_step"])
    busy = {t["thread"]: t["busy_ms_per_step"] for t in host["threads"]}
    top = host["top_events"][0]  # a top-level event lies inside its thread's busy time
    assert 0 < top["ms_per_step"] <= busy[top["thread"]] * (1 + 1e-6)

    info = common.hlo_instruction_info(compiled.as_text())
    assert any(i["opcode"] == "fusion" for i in info.values())
    assert common.op_phase("jit(step_fn)/transpose(jvp(UNet))/output_blocks_3/attn/qkv/dot_general") == "student backward"
    assert common.op_phase("jit(step_fn)/jvp(UNet)/input_blocks_1/res/in_conv/conv_general_dilated") == "student forward"
    assert common.op_phase("jit(step_fn)/UNet/middle_block/res_0/in_conv/conv_general_dilated") == "teacher forward"
    assert common.op_phase("jit(step_fn)/add") == "optimizer/other"
    assert common.op_component("jit(s)/jvp(UNet)/output_blocks_1/attn/attn_quant/round") == \
        "attention-operand quantizers (LSQ)"
    assert common.op_component("jit(s)/UNet/output_blocks_1/attn/einsum/dot_general") == "attention core"
    assert common.op_component("jit(s)/UNet/input_blocks_1/res/in_conv/conv_general_dilated") == "convolution"
    assert common.op_category({"opcode": "custom-call", "target": "__cudnn$fmhaSoftmax"}) == "fused attention"
    assert common.op_category({"opcode": "custom-call", "target": "__cudnn$convForward"}) == "convolution"


def test_attention_core_benchmark_checks_the_kernel_and_reports(tmp_path):
    """benchmarks.attention_core (CPU: the kernel interpreted): both variants run, the kernel is as close to the
    float32 function as the explicit core, and the report shows the table."""
    from benchmarks import attention_core

    rec = attention_core.run(str(tmp_path), quick=True, bits=8, steps=3)
    rows = {r["variant"]: r for r in rec["rows"]}
    assert set(rows) == {"explicit", "kernel_q64_k64_b64_w4_s3"} and all(r["status"] == "ok" for r in rows.values())
    ker, exp = rows["kernel_q64_k64_b64_w4_s3"], rows["explicit"]
    assert 0 < ker["rel_err_out_vs_f32"] <= 1.2 * exp["rel_err_out_vs_f32"] < 2e-2  # bf16-level, not exact
    assert all(ker["rel_err_grads_vs_f32"][n] <= 1.2 * exp["rel_err_grads_vs_f32"][n] for n in "qkv")
    md = report.build_markdown(str(tmp_path))
    assert "| 8x8 | (2, 64, 2, 16) | kernel_q64_k64_b64_w4_s3 |" in md


def test_attention_core_filters_variants_and_refuses_unknown_levels(tmp_path, capsys):
    from benchmarks import attention_core

    rec = attention_core.run(str(tmp_path), quick=True, bits=8, steps=2, variants="expl*")
    assert [r["variant"] for r in rec["rows"]] == ["explicit"]
    assert attention_core.run(str(tmp_path), quick=True, bits=8, steps=2, shapes="32x32")["rows"] == []
    with pytest.raises(SystemExit):
        attention_core.main(["--out", str(tmp_path), "--shapes", "4x4"])
    assert "--shapes: unknown level(s) 4x4; choose from 32x32, 16x16, 8x8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        attention_core.main(["--out", str(tmp_path), "--variants", "kernel_q64*,nope*"])
    assert "--variants: nope* match(es) no variant; variants: explicit, kernel_q64" in capsys.readouterr().err


def test_qat_overhead_finds_the_quantizers_and_the_lrm_in_a_profiled_qat_step(tmp_path, capsys):
    """benchmarks.qat_overhead on a real profile of a (tiny, CPU) W1A8 QAT step: the LSQ quantizers' fusions
    (forward fake-quantization, backward step-size reduction) and the LRM's loss-level ops are found, the
    teacher forward holds no LSQ work, and the groups are a part of the traced time."""
    from benchmarks import qat_overhead

    rec = train_step.run_row(out=str(tmp_path), model="cifar10", method="binarydm", act_bits=8, dtype="f32", batch=2,
                             quick=True, steps=2, max_time_s=1, profile_steps=1)
    assert rec["status"] == "ok", rec.get("error")
    prof_dir = f"{tmp_path}/traces/{rec['name']}"
    out = f"{tmp_path}/qat.json"
    assert qat_overhead.main(["--profile_dir", prof_dir, "--steps", "1", "--out", out]) == 0
    groups = {(g["kind"], g["phase"]): g for g in _load(out)["groups"]}
    kinds = {k for k, _ in groups}
    assert {"LSQ fake-quantization and mask select", "LSQ step-size gradient (reduction)"} <= kinds
    assert any(k.startswith("LRM") for k in kinds)
    assert not any(p == "teacher forward" and k.startswith("LSQ") for k, p in groups)
    assert 0 < sum(g["ms_per_step"] for g in groups.values()) < rec["profile"]["device_ms_per_step"]
    assert "QAT-only groups" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a directory without the compiled HLO: the flag is named
        qat_overhead.main(["--profile_dir", str(tmp_path), "--steps", "1"])
    assert "--hlo: no file" in capsys.readouterr().err
