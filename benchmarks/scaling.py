"""Data-parallel scaling of the FP and BinaryDM train steps: 1 device, then all local devices (issue 5).

    python -m benchmarks.scaling --out=benchmarks/results/scaling_h100x2           # 2 GPUs: FP + BinaryDM
    python -m benchmarks.scaling --out=DIR --batch=256 --weak --dtype=bf16           # + weak scaling rows
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
        python -m benchmarks.scaling --out=/tmp/scaling --quick                      # CPU smoke run, fake devices

Model: the DDPM CIFAR-10 UNet of configs/ddpm_cifar10.py (35.7M params; `fp` and `binarydm_w1a32`
rows; `--quick`: a one-level UNet of the same family). Data: fixed random 32x32x3 images in [-1, 1]
(values do not change the speed); the step draws its own t and noise.

For each method the same global batch (strong scaling) runs through `trainer.shard_training`, the code of
train.py (state sharded by the rule of `bdm_jax.sharding`, init under jit with out_shardings, the step
jitted with in/out shardings and the state donated), first on a mesh of one device, then on a
data-parallel mesh of all local devices (`--fsdp` > 1: data x fsdp). Both start from the same state (seed;
QAT: the same random FP teacher), so the first `--check_steps` losses and grad norms must agree within
`--rtol` (default 1e-5 on CPU; 2e-3 on GPU/TPU, where TF32/bf16 convolutions pick algorithms by the
per-device batch); a mismatch is reported and the exit status is 1. Then `--steps` steps are dispatched
without blocking in between (as the training loop runs), `--repeats` times; seconds per step = the median.
`--weak`: also all devices at devices x batch (the same per-device batch as the 1-device row; no loss check).

Writes <out>/scaling.json (device facts, each row, losses) and <out>/scaling.md (the table for docs/).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `configs` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

METHODS = ("fp", "binarydm")


def _batches(cfg: Any, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    m, b = cfg.model, cfg.train.batch_size
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        batch = {"image": rng.uniform(-1.0, 1.0, (b, m.image_size, m.image_size, m.in_channels)).astype(np.float32),
                 "label": rng.integers(0, max(m.num_classes, 1), (b,)).astype(np.int32)}
        out.append(batch)
    return out


def run_mesh(cfg: Any, setup: Any, tx: Any, teacher: Any, devices: list, fsdp: int, *, check_steps: int,
             steps: int, repeats: int) -> dict:
    """Init, `check_steps` recorded steps, then the timed steps of `cfg` on a mesh of `devices`."""
    import jax

    from bdm_jax import sharding
    from bdm_jax.trainer import shard_training

    mesh = sharding.create_mesh({"data": -1, "fsdp": fsdp}, devices)
    b_sh = sharding.batch_sharding(mesh)
    host = _batches(cfg, max(check_steps, 2))
    batches = [sharding.global_batch(b, b_sh) for b in host]
    row: dict = {"devices": len(devices), "mesh": dict(mesh.shape), "global_batch": cfg.train.batch_size,
                 "per_device_batch": cfg.train.batch_size // len(devices)}

    t0 = time.perf_counter()
    sharded = shard_training(setup, tx, mesh, batches[0])
    state = sharded.init(sharding.on_mesh(teacher, mesh, sharding.fsdp_min_size(cfg.mesh)), batches[0])
    jax.block_until_ready(state)
    row["init_s"] = time.perf_counter() - t0
    row["state_bytes_per_device"] = int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state)))

    losses, grad_norms = [], []
    for i in range(check_steps):
        t0 = time.perf_counter()
        state, metrics = sharded.step(state, batches[i])
        metrics = jax.device_get(metrics)
        if i == 0:
            row["first_step_s"] = time.perf_counter() - t0  # compile + one step
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    row["losses"], row["grad_norms"] = losses, grad_norms

    per_step = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = sharded.step(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        per_step.append((time.perf_counter() - t0) / steps)
    row["step_s_runs"] = per_step
    row["step_s"] = statistics.median(per_step)
    row["img_per_s"] = cfg.train.batch_size / row["step_s"]
    row["memory_device0"] = common.memory_now()
    del state, sharded, batches
    gc.collect()
    jax.clear_caches()
    return row


def _rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def measure_method(method: str, args: argparse.Namespace, devices: list) -> dict:
    import jax

    from bdm_jax.train_state import make_optimizer
    from bdm_jax.trainer import Setup

    n = len(devices)
    cfg = common.model_config("cifar10", method, 32, args.dtype, args.batch, quick=args.quick)
    setup, tx = Setup.from_config(cfg), make_optimizer(cfg.train)
    teacher: Any = {}
    if setup.quant:  # a random FP teacher of the same architecture, on the host: every mesh gets the same one
        teacher = jax.tree.map(np.asarray, common.random_variables(setup.fp_model, cfg.model, seed=1)["params"])
    out: dict = {"method": method, "rows": []}
    kw = dict(check_steps=args.check_steps, steps=args.steps, repeats=args.repeats)
    common.log(f"{method}: 1 device, batch {args.batch}")
    one = run_mesh(cfg, setup, tx, teacher, devices[:1], 1, **kw)
    out["rows"].append(dict(one, kind="baseline"))
    common.log(f"{method}: {one['step_s'] * 1e3:.1f} ms/step, {one['img_per_s']:.0f} img/s; "
               f"{n} devices, batch {args.batch}")
    strong = run_mesh(cfg, setup, tx, teacher, devices, args.fsdp, **kw)
    strong.update(kind="strong", speedup=one["step_s"] / strong["step_s"],
                  efficiency=one["step_s"] / strong["step_s"] / n,
                  loss_rel_diff=_rel_diff(strong["losses"], one["losses"]),
                  grad_norm_rel_diff=_rel_diff(strong["grad_norms"], one["grad_norms"]))
    strong["losses_match"] = bool(strong["loss_rel_diff"] <= args.rtol and strong["grad_norm_rel_diff"] <= args.rtol)
    out["rows"].append(strong)
    common.log(f"{method}: {strong['step_s'] * 1e3:.1f} ms/step, {strong['img_per_s']:.0f} img/s, speedup "
               f"{strong['speedup']:.2f}x; loss rel diff {strong['loss_rel_diff']:.2e} "
               f"({'ok' if strong['losses_match'] else 'MISMATCH'})")
    if args.weak and n > 1:
        wcfg = common.model_config("cifar10", method, 32, args.dtype, args.batch * n, quick=args.quick)
        wsetup, wtx = Setup.from_config(wcfg), make_optimizer(wcfg.train)
        common.log(f"{method}: {n} devices, batch {args.batch * n} (weak scaling)")
        weak = run_mesh(wcfg, wsetup, wtx, teacher, devices, args.fsdp, **kw)
        weak.update(kind="weak", speedup=weak["img_per_s"] / one["img_per_s"],
                    efficiency=weak["img_per_s"] / one["img_per_s"] / n)
        out["rows"].append(weak)
        common.log(f"{method}: {weak['img_per_s']:.0f} img/s, {weak['efficiency'] * 100:.0f}% efficiency")
    return out


def markdown(result: dict) -> str:
    d = result["device"]
    lines = [f"Train-step scaling, {d['device_kind']} x {result['local_devices']} ({d['platform']}, jax {d['jax']}), "
             f"{result['model']}, {result['dtype']}, `python -m benchmarks.scaling` "
             f"(median of {result['args']['repeats']} x {result['args']['steps']} pipelined steps).", "",
             "| method | devices | mesh | global batch | per-device batch | ms/step | img/s | speedup | efficiency "
             "| loss rel. diff vs 1 device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["methods"]:
        for r in m["rows"]:
            mesh = "x".join(str(v) for v in r["mesh"].values())
            sp = "-" if "speedup" not in r else f"{r['speedup']:.2f}x"
            eff = "-" if "efficiency" not in r else f"{100 * r['efficiency']:.0f}%"
            diff = "-" if "loss_rel_diff" not in r else f"{r['loss_rel_diff']:.1e}" + ("" if r["losses_match"] else " (!)")
            lines.append(f"| {m['method']} | {r['devices']} | {mesh} | {r['global_batch']} | {r['per_device_batch']} | "
                         f"{r['step_s'] * 1e3:.1f} | {r['img_per_s']:.0f} | {sp} | {eff} | {diff} |")
    lines += ["", f"Loss check: the first {result['args']['check_steps']} losses and grad norms of the same global "
              f"batch on N devices vs 1 device, rtol {result['args']['rtol']:g}: "
              + ("all match." if result["losses_match"] else "MISMATCH."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory for scaling.json and scaling.md")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: fp, binarydm")
    p.add_argument("--batch", type=int, default=128, help="global batch of the 1-device and strong-scaling rows")
    p.add_argument("--dtype", default="f32", choices=sorted(common.DTYPES), help="compute dtype (params stay f32)")
    p.add_argument("--fsdp", type=int, default=1, help="fsdp axis of the N-device mesh (1 = pure data parallel)")
    p.add_argument("--check_steps", type=int, default=3, help="steps whose losses must match 1 device")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rtol", type=float, default=None, help="loss/grad-norm tolerance (default: 1e-5 CPU, 2e-3 else)")
    p.add_argument("--weak", action="store_true", help="also N devices at N x batch")
    p.add_argument("--quick", action="store_true", help="a one-level UNet (CPU smoke run)")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise common.BenchError(f"--methods: {m!r} is not one of {', '.join(METHODS)}")

    import jax

    devices = jax.local_devices()
    n = len(devices)
    if args.batch % n:
        raise common.BenchError(f"--batch={args.batch} must be divisible by the {n} local devices")
    if n % args.fsdp:
        raise common.BenchError(f"--fsdp={args.fsdp} must divide the {n} local devices")
    if args.rtol is None:
        args.rtol = 1e-5 if devices[0].platform == "cpu" else 2e-3
    if n == 1:
        common.log("only one local device: the N-device rows repeat the 1-device row")
    result: dict = {"device": common.device_info(), "local_devices": n, "model": "ddpm_cifar10" + (" (quick)" if args.quick else ""),
                    "dtype": args.dtype, "args": vars(args), "methods": []}
    for method in methods:
        result["methods"].append(measure_method(method, args, devices))
        result["losses_match"] = all(r.get("losses_match", True) for m in result["methods"] for r in m["rows"])
        common.write_json(os.path.join(args.out, "scaling.json"), result)  # after each method: a crash keeps it
    table = markdown(result)
    with open(os.path.join(args.out, "scaling.md"), "w") as f:
        f.write(table)
    print(table)
    return 0 if result["losses_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
