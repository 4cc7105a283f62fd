"""Quantized attention core alone: the explicit einsum path against the flash_lsq kernel (issue 9, change 2).

    python -m benchmarks.attention_core --out=benchmarks/results/<device>            # LDM-4 shapes, bf16
    python -m benchmarks.attention_core --out=/tmp/a --quick                        # CPU smoke run (interpreted)

For each shape (the LDM-4 Bedrooms attention levels at batch 32: 32x32 tokens x 14 heads, 16x16 x 21,
8x8 x 28, head size 32) and each variant (explicit core; kernel tile choices), it checks the output and the
q/k/v/step gradients against the float32 explicit function (relative error, like tests/test_flash_lsq.py)
and times forward+backward (`jax.jit` of value-and-grad, median of blocking calls after warm-up). Writes
<out>/attention_core.json.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
import time

from benchmarks import common

SHAPES = {"32x32": (32, 1024, 14, 32), "16x16": (32, 256, 21, 32), "8x8": (32, 64, 28, 32)}
QUICK_SHAPES = {"8x8": (2, 64, 2, 16)}
VARIANTS = {  # name -> KernelConfig fields (None: the explicit core)
    "explicit": None,
    "kernel_q64_k64_b64_w4_s3": dict(block_q=64, block_k=64, block_b=64, num_warps=4, num_stages=3),  # default
    "kernel_q128_k64_b64_w4_s3": dict(block_q=128, block_k=64, block_b=64, num_warps=4, num_stages=3),  # 5 to 6
    "kernel_q128_k64_b64_w8_s3": dict(block_q=128, block_k=64, block_b=64, num_warps=8, num_stages=3),
    "kernel_q128_k128_b64_w8_s3": dict(block_q=128, block_k=128, block_b=64, num_warps=8, num_stages=3),
    "kernel_q128_k64_b32_w4_s3": dict(block_q=128, block_k=64, block_b=32, num_warps=4, num_stages=3),
    "kernel_q128_k64_b128_w8_s3": dict(block_q=128, block_k=64, block_b=128, num_warps=8, num_stages=3),
    # change 6's before: the backward's row sums from a third sweep over the keys (until 6, the default)
    "kernel_q128_k64_b64_w4_s3_rows_sweep": dict(block_q=128, block_k=64, block_b=64, num_warps=4, num_stages=3,
                                                 d_from_forward=False),
    # the forward carries two more accumulators since change 6: smaller query tiles hold fewer registers
    "kernel_q64_k64_b64_w4_s3_rows_sweep": dict(block_q=64, block_k=64, block_b=64, num_warps=4, num_stages=3,
                                                d_from_forward=False),
    # dQ added atomically from the dK/dV sweep instead of a second key sweep in the backward (slower, session 5)
    "kernel_q64_k64_b64_w4_s3_dq_atomic": dict(block_q=64, block_k=64, block_b=64, num_warps=4, num_stages=3,
                                               dq_atomic=True),
    "kernel_q64_k64_b128_w8_s3_dq_atomic": dict(block_q=64, block_k=64, block_b=128, num_warps=8, num_stages=3,
                                                dq_atomic=True),
}
DEFAULT_VARIANT = "kernel_q64_k64_b64_w4_s3"  # flash_lsq.KernelConfig's defaults


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run(out: str, quick: bool, bits: int, steps: int, variants: str = "", shapes: str = "") -> dict:
    """Time every variant (or those matching the comma-separated fnmatch patterns `variants`) at every shape
    (or the named `shapes`); writes <out>/attention_core.json."""
    import jax
    import jax.numpy as jnp

    from bdm_jax import flash_lsq
    from bdm_jax.quant import lsq_quantize

    dtype = jnp.bfloat16

    def explicit(q, k, v, step):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
        w = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
        w = lsq_quantize(w.astype(jnp.float32), step, bits).astype(q.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", w, v)

    rec: dict = dict(kind="attention_core", device=common.device_info(), bits=bits, dtype="bfloat16", rows=[])
    patterns = [v for v in variants.split(",") if v]
    names = [v for v in shapes.split(",") if v]
    for sname, shape in (QUICK_SHAPES if quick else SHAPES).items():
        if names and sname not in names:
            continue
        ks = jax.random.split(jax.random.key(0), 4)
        q, k, v = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in ks[:3])
        do = jax.random.normal(ks[3], shape, jnp.float32).astype(dtype)
        step = jnp.float32(2.0 / shape[1] / math.sqrt(2 ** (bits - 1) - 1))  # lsq_init_step of mean|P| = 1/S

        def vg(f):
            return jax.jit(jax.value_and_grad(lambda q, k, v, s: jnp.sum(f(q, k, v, s).astype(jnp.float32)
                                                                        * do.astype(jnp.float32)),
                                              argnums=(0, 1, 2, 3)))

        up = lambda q, k, v, s: explicit(*(a.astype(jnp.float32) for a in (q, k, v)), s)  # noqa: E731
        ref_val, ref_grads = vg(up)(q, k, v, step)
        ref_out = jax.jit(up)(q, k, v, step)
        for vname, fields in VARIANTS.items():
            if (quick and vname not in ("explicit", DEFAULT_VARIANT)) or (
                    patterns and not any(fnmatch.fnmatch(vname, p) for p in patterns)):
                continue
            row = dict(shape=sname, dims=list(shape), variant=vname)
            try:
                if fields is None:
                    f = explicit
                else:
                    cfg = flash_lsq.KernelConfig(bits=bits, **fields)
                    f = lambda q, k, v, s, cfg=cfg: flash_lsq.lsq_flash_attention(q, k, v, s, 1.0, bits=bits,  # noqa: E731
                                                                                cfg=cfg)
                fn = vg(f)
                t0 = time.perf_counter()
                val, grads = fn(q, k, v, step)
                jax.block_until_ready(grads)
                row["compile_and_first_s"] = time.perf_counter() - t0
                row["rel_err_out_vs_f32"] = _rel(jax.jit(f)(q, k, v, step), ref_out)
                row["rel_err_grads_vs_f32"] = {n: _rel(g, r) for n, g, r in zip("qkvs", grads, ref_grads)}
                times = common.time_calls(lambda: jax.block_until_ready(fn(q, k, v, step)), min_n=3, max_n=steps,
                                          max_s=5.0)
                row["timing"] = common.summarize(times)
                row["fwd_bwd_ms"] = 1e3 * row["timing"]["median_s"]
                row["status"] = "ok"
                common.log(f"{sname} {vname}: {row['fwd_bwd_ms']:.3f} ms fwd+bwd, err out "
                           f"{row['rel_err_out_vs_f32']:.2e}, grads "
                           + " ".join(f"{n} {e:.1e}" for n, e in row["rel_err_grads_vs_f32"].items()))
            except Exception as e:  # a variant that does not compile is a finding, not a crash
                row.update(common.error_fields(e))
                common.log(f"{sname} {vname}: {row['status'].upper()} {row['error']}")
            rec["rows"].append(row)
    common.write_json(f"{out}/attention_core.json", rec)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results directory (writes attention_core.json)")
    p.add_argument("--quick", action="store_true", help="one tiny shape, two variants (CPU: interpreted kernel)")
    p.add_argument("--bits", type=int, default=8, choices=(4, 8), help="LSQ bits of the softmax output")
    p.add_argument("--steps", type=int, default=30, help="at most this many timed calls per variant")
    p.add_argument("--variants", default="", help="comma-separated fnmatch patterns of variant names (default: all: "
                   + ", ".join(VARIANTS) + ")")
    p.add_argument("--shapes", default="", help="comma-separated levels (default: all: " + ", ".join(SHAPES) + ")")
    a = p.parse_args(argv)
    bad = [n for n in a.shapes.split(",") if n and n not in {**SHAPES, **QUICK_SHAPES}]
    if bad:
        p.error(f"--shapes: unknown level(s) {', '.join(bad)}; choose from {', '.join(SHAPES)}")
    unmatched = [v for v in a.variants.split(",") if v and not fnmatch.filter(VARIANTS, v)]
    if unmatched:
        p.error(f"--variants: {', '.join(unmatched)} match(es) no variant; variants: {', '.join(VARIANTS)}")
    rec = run(a.out, a.quick, a.bits, a.steps, a.variants, a.shapes)
    return 0 if all(r.get("status") == "ok" for r in rec["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
