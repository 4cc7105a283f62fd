"""DDIM sampling throughput: FP, fake-quant binary and packed binary UNets (issue 9, item 3).

    python -m benchmarks.sampling --out=benchmarks/results/h100 --model=cifar10 --batch=256
    python -m benchmarks.sampling --out=benchmarks/results/h100 --model=ldm4 --batch=256 --measure_steps=10
    python -m benchmarks.sampling --out=/tmp/bench --model=cifar10 --batch=1 --quick

Modes (one process runs them in turn for one model and batch; weights random, of the right shapes):
  fp         the FP UNet
  fakequant  the BinaryDM student as trained (latent float kernels binarized inside jit, masks 1)
  packed     the exported model: `bdm_jax.export.export_params` writes the packed checkpoint of the
             student, `load_packed` reads it back; its UNet unpacks the sign bits inside jit
The sampler is the library's `trainer.make_sample_fn` (DDIM via lax.scan, jitted). LDM-4 samples latents
only (autoencoder.kind=none: no VQ decode). Each mode: the first call (compile + one run), then timed calls
-> median. The scan runs `--measure_steps` DDIM steps (default all `--steps`); fewer steps are scaled to
`--steps` and the row says `extrapolated: true`. The compile time is first call minus a timed call
(make_sample_fn hides its jitted function). Device memory: the process counters after the mode, cumulative
over the modes run before it in this process (`peak_is_cumulative`). Writes <out>/sample/<name>.json per mode.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Any

from benchmarks import common

MODES = ("fp", "fakequant", "packed")


def row_name(model: str, mode: str, act_bits: int, dtype: str, batch: int) -> str:
    variant = "fp" if mode == "fp" else f"{mode}_w1a{act_bits}"
    return f"sample-{model}-{variant}-{dtype}-b{batch}"


def packed_available() -> str:
    """'' when bdm_jax.export offers export_params + load_packed (the packed apply path), else why not."""
    try:
        from bdm_jax import export
    except Exception as e:  # noqa: BLE001 - reported in the row
        return f"bdm_jax.export cannot be imported ({common.short_error(e)})"
    missing = [n for n in ("export_params", "load_packed") if not hasattr(export, n)]
    return f"bdm_jax.export lacks {', '.join(missing)}" if missing else ""


def _model_and_weights(mode: str, cfg: Any) -> tuple[Any, Any, Any]:
    """(trainer.Setup, params, masks) of a mode with random weights."""
    from bdm_jax.trainer import Setup

    setup = Setup.from_config(cfg)
    var = common.random_variables(setup.model, cfg.model)
    if mode != "packed":
        return setup, var["params"], var["masks"] if setup.quant else {}
    from bdm_jax.export import export_params, load_packed

    with tempfile.TemporaryDirectory(prefix="bdm_bench_packed_") as tmp:
        export_params(cfg, var["params"], var["masks"], f"{tmp}/packed")
        pm = load_packed(f"{tmp}/packed")
    return pm.setup(), pm.params, {}


def measure(mode: str, cfg: Any, *, steps: int, measure_steps: int, repeats: int, max_time_s: float) -> dict:
    import jax

    from bdm_jax.trainer import make_sample_fn

    b = cfg.sample.batch_size
    out: dict = {}
    t0 = time.perf_counter()
    setup, params, masks = _model_and_weights(mode, cfg)
    out["weights_s"] = time.perf_counter() - t0
    out["weight_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(params)))
    sample = make_sample_fn(setup, b)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    jax.block_until_ready(sample(params, masks, key))
    out["first_call_s"] = time.perf_counter() - t0
    times = common.time_calls(lambda: jax.block_until_ready(sample(params, masks, key)),
                              min_n=1, max_n=repeats, max_s=max_time_s)
    t = common.summarize(times)
    out["timing"], out["times_s"] = t, times
    out["compile_s"] = max(out["first_call_s"] - t["median_s"], 0.0)
    out["compile_s_method"] = "first call minus median timed call"
    per_step = t["median_s"] / measure_steps
    out["step_ms"] = 1e3 * per_step
    out["sample_s"] = per_step * steps  # seconds for `steps` DDIM steps of the batch
    out["img_per_s"] = b / out["sample_s"]
    out["flops_model_per_step"] = common.forward_flops_per_sample(cfg.model) * b
    out["tflops_model"] = out["flops_model_per_step"] / per_step / 1e12
    out["memory"] = common.memory_now()
    return out


def run(*, out: str, model: str, batch: int, modes: list[str], act_bits: int, dtype: str, steps: int,
        measure_steps: int, quick: bool, repeats: int = 3, max_time_s: float = 20.0) -> list[dict]:
    """Measure every mode; write <out>/sample/<name>.json each; never raises for a failing mode."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise common.BenchError(f"--modes={','.join(modes)}: {bad[0]!r} is not one of {', '.join(MODES)}")
    measure_steps = min(measure_steps or steps, steps)
    recs = []
    info = None
    for mode in modes:
        bits = 32 if mode == "fp" else act_bits
        name = row_name(model, mode, bits, dtype, batch)
        rec: dict = dict(kind="sample", name=name, model=model, mode=mode, act_bits=bits, dtype=dtype, batch=batch,
                         sampler="ddim", steps=steps, steps_measured=measure_steps,
                         extrapolated=measure_steps != steps, quick=quick, peak_is_cumulative=bool(recs),
                         latents_only=model == "ldm4")
        try:
            info = info or common.device_info()
            rec["device"] = info
            why = packed_available() if mode == "packed" else ""
            if why:
                rec.update(status="not_available", error=why)
            else:
                common.log(f"{name}: DDIM {measure_steps} steps{' (quick: tiny model)' if quick else ''} ...")
                cfg = common.model_config(model, "fp" if mode == "fp" else "binarydm", bits, dtype, batch, quick)
                with cfg.unlocked():
                    cfg.sample.steps, cfg.sample.num, cfg.sample.batch_size = measure_steps, batch, batch
                rec.update(measure(mode, cfg, steps=steps, measure_steps=measure_steps, repeats=repeats,
                                   max_time_s=max_time_s))
                rec["status"] = "ok"
                extra = " (extrapolated)" if rec["extrapolated"] else ""
                common.log(f"{name}: {rec['sample_s']:.3f} s per {steps} steps{extra} = {rec['img_per_s']:.2f} img/s, "
                           f"{rec['step_ms']:.2f} ms/step, compile ~{rec['compile_s']:.1f} s")
        except Exception as e:
            rec.update(common.error_fields(e))
            common.log(f"{name}: {rec['status'].upper()} {rec['error']}")
        common.write_json(f"{out}/sample/{name}.json", rec)
        recs.append(rec)
    return recs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results directory (writes sample/<name>.json)")
    p.add_argument("--model", required=True, choices=common.MODELS)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: fp, fakequant, packed")
    p.add_argument("--act_bits", type=int, default=32, choices=(4, 8, 32), help="activation bits of the binary modes")
    p.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    p.add_argument("--steps", type=int, default=100, help="DDIM steps reported")
    p.add_argument("--measure_steps", type=int, default=0, help="DDIM steps actually run (0 = --steps)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    p.add_argument("--max_time_s", type=float, default=20.0, help="stop timing after this long (>= 1 call)")
    p.add_argument("--quick", action="store_true", help="tiny model of the same family (CPU smoke run)")
    a = p.parse_args(argv)
    recs = run(out=a.out, model=a.model, batch=a.batch, modes=[m for m in a.modes.split(",") if m],
               act_bits=a.act_bits, dtype=a.dtype, steps=a.steps, measure_steps=a.measure_steps, quick=a.quick,
               repeats=a.repeats, max_time_s=a.max_time_s)
    return 0 if all(r["status"] in ("ok", "not_available") for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
