"""Measured matmul peak of the device: the denominator of MFU (issue 9).

    python -m benchmarks.peak --out=benchmarks/results/h100
    python -m benchmarks.peak --out=/tmp/bench --quick          # CPU smoke run, seconds

Square bf16 matmuls (float32 ones too, for context), each call a chain of `reps` dependent matmuls inside
one jit so dispatch overhead is amortised; median of the timed calls after warm-up. `peak_bf16_tflops` is
the best median rate over the sizes. Writes <out>/peak.json.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import common


def matmul_rate(n: int, dtype: str, reps: int, max_s: float) -> dict:
    """TFLOP/s of an n x n x n matmul in `dtype` (median of timed calls)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
    # Scaled so the repeated product stays O(1) (inf/NaN would not change the speed, but keep it clean).
    b = (jax.random.normal(kb, (n, n), jnp.float32) / n**0.5).astype(dt)

    def chain(a, b):
        return jax.lax.fori_loop(0, reps, lambda _, c: jnp.dot(c, b), a)

    compiled = jax.jit(chain).lower(a, b).compile()
    for _ in range(2):
        compiled(a, b).block_until_ready()
    times = common.time_calls(lambda: compiled(a, b).block_until_ready(), min_n=3, max_n=30, max_s=max_s)
    s = common.summarize(times)
    flops = 2.0 * n**3 * reps
    return dict(size=n, dtype=dtype, reps=reps, flops=flops, **s, tflops=flops / s["median_s"] / 1e12)


def run(out: str, quick: bool, sizes: list[int] | None = None) -> dict:
    info = common.device_info()
    sizes = sizes or ([256, 512] if quick else [4096, 8192, 16384])
    reps = 2 if quick else 10
    rows, errors = [], []
    for dtype in ("bfloat16", "float32"):
        for n in sizes:
            try:
                r = matmul_rate(n, dtype, reps, 1.0 if quick else 3.0)
                rows.append(r)
                common.log(f"peak: {dtype} {n}^3 x{reps}: {r['tflops']:.4g} TFLOP/s (median of {r['n']})")
            except Exception as e:  # e.g. OOM at the largest size: keep the others
                errors.append(dict(size=n, dtype=dtype, **common.error_fields(e)))
                common.log(f"peak: {dtype} {n}^3 failed: {common.short_error(e)}")
    best = lambda dt: max((r["tflops"] for r in rows if r["dtype"] == dt), default=None)  # noqa: E731
    spec = next((v for k, v in common.SPEC_BF16_TFLOPS.items() if k in info["device_kind"]), None)
    result = dict(kind="peak", name="peak", quick=quick, device=info, results=rows, errors=errors,
                  peak_bf16_tflops=best("bfloat16"), peak_f32_tflops=best("float32"), spec_bf16_tflops=spec,
                  status="ok" if best("bfloat16") else "error")
    common.write_json(f"{out}/peak.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results directory (peak.json)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    p.add_argument("--sizes", default="", help="comma-separated n (default 4096,8192,16384; quick 256,512)")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",") if s] or None
    r = run(a.out, a.quick, sizes)
    common.log(f"peak bf16 {r['peak_bf16_tflops'] or 0:.4g} TFLOP/s on {r['device']['device_kind']}")
    return 0 if r["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
