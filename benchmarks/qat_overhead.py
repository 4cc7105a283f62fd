"""Device time of the QAT-only work in a profiled train step, by what each fused kernel computes (issue 9).

    python -m benchmarks.qat_overhead --profile_dir=DIR/traces/<row> --steps=3

DIR/traces/<row> is what `benchmarks.train_step --profile_steps=N` leaves: a jax.profiler trace and the compiled
HLO (`compiled_hlo.txt.gz`). The op metadata groups ops by layer (common.profile_breakdown); this groups them by
the contents of each fusion instead, because XLA fuses a quantizer into the layer around it: a fusion that rounds
and reduces is an LSQ step-size gradient, one that rounds without reducing an LSQ fake-quantization (with its mask
select), one that reduces a 0/1 sign mask of a kernel's shape the binarizer's scale gradient; ops at the loss
level (outside the UNet) are the LRM. Prints the groups (ms per step) and writes them as JSON with --out.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sys

from benchmarks import common

_COMPUTATION = re.compile(r"^%([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)^\}", re.M | re.S)
_FUSION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = .*?\bfusion\(.*?calls=%([\w.\-]+)")
# a 0/1 mask of a convolution kernel's shape, HWIO or OHWI (its gradient's layout): a 3x3 or 1x1 window next to
# two channel axes (activations are NHWC with a spatial size above 3; GroupNorm's statistics are not masks).
# Dense kernels' masks (2-D) are not matched: their reductions are small and their shapes ambiguous.
_KERNEL_MASK = re.compile(r"pred\[(?:\d+,[13],[13],\d+|[13],[13],\d+,\d+)\]")


def qat_kind(op_name: str, fused_body: str) -> str:
    """Which QAT-only work a fused kernel does ('' = none of these: convs, norms, attention, the optimizer, ...)."""
    path = op_name.removeprefix("jit(step_fn)/")
    rounds, reduces = "round-nearest-even(" in fused_body, "reduce(" in fused_body
    if rounds and reduces:
        return "LSQ step-size gradient (reduction)"
    if rounds:
        return "LSQ fake-quantization and mask select"
    if reduces and _KERNEL_MASK.search(fused_body):
        return "binarizer scale gradient (reduction over a kernel)"
    if path.startswith(("jvp()/", "transpose(jvp())/")):  # the loss level, outside the UNet: the LRM terms
        return "LRM (feature difference, projection, its gradient)"
    return ""


def overhead(times: dict[str, float], hlo_text: str, steps: int) -> list[dict]:
    """[{kind, phase, ops, ms_per_step}] of the QAT-only groups, largest first."""
    bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}
    calls = {m.group(1): m.group(2) for m in map(_FUSION.match, hlo_text.splitlines()) if m}
    info = common.hlo_instruction_info(hlo_text)
    groups: dict[tuple[str, str], list] = {}
    for op, ns in times.items():
        op_name = info.get(op, {}).get("op_name", "")
        kind = qat_kind(op_name, bodies.get(calls.get(op, ""), ""))
        if kind:
            g = groups.setdefault((kind, common.op_phase(op_name)), [0.0, 0])
            g[0] += ns
            g[1] += 1
    return [dict(kind=k, phase=p, ops=n, ms_per_step=ns / steps / 1e6)
            for (k, p), (ns, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile_dir", required=True, help="a train_step profile directory (trace + compiled_hlo.txt.gz)")
    p.add_argument("--steps", type=int, required=True, help="steps the trace holds (the row's --profile_steps)")
    p.add_argument("--hlo", default="",
                   help="compiled HLO text, .txt or .txt.gz (default <profile_dir>/compiled_hlo.txt.gz)")
    p.add_argument("--out", default="", help="also write the groups to this JSON file")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps={a.steps}: must be >= 1")
    hlo_path = a.hlo or os.path.join(a.profile_dir, "compiled_hlo.txt.gz")
    if not os.path.exists(hlo_path):
        p.error(f"--hlo: no file {hlo_path} (train_step --profile_steps writes compiled_hlo.txt.gz in its profile dir)")
    with (gzip.open(hlo_path, "rt") if hlo_path.endswith(".gz") else open(hlo_path)) as f:
        hlo_text = f.read()
    try:
        times, _ = common.trace_op_times(a.profile_dir)
    except common.BenchError as e:
        p.error(f"--profile_dir: {e}")
    rows = overhead(times, hlo_text, a.steps)
    total = sum(times.values()) / a.steps / 1e6
    print(f"device time {total:.2f} ms per step; QAT-only groups:")
    for r in rows:
        print(f"  {r['ms_per_step']:7.2f} ms  {r['ops']:5d} ops  {r['phase']:17s} {r['kind']}")
    if a.out:
        common.write_json(a.out, dict(profile_dir=a.profile_dir, steps=a.steps, device_ms_per_step=total, groups=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
