"""Peak device memory and speed of DDIM sampling with FP, fake-quant and packed 1-bit weights (issue 8).

    python benchmarks/sample_memory.py --config=configs/ldm4_bedrooms.py --out_dir=benchmarks/results/memory
    python benchmarks/sample_memory.py --config=configs/digits.py --out_dir=/tmp/mem --batch=16 --steps=10

Each mode runs in its own process (device peak counters are per process), with random weights of the right
shapes (values do not change memory or speed):
  fp         the FP UNet (float32 kernels)
  fakequant  the BinaryDM student as trained: float32 latent kernels binarized on the fly (masks 1)
  packed     the exported model: uint32 sign-bit words + scales, unpacked inside jit
Per mode: bytes of the weights on the device, `memory_stats()` peak after sampling (GPU/TPU; CPU has none),
XLA's compiled memory analysis (arguments, temporaries: shows whether the unpacked kernels are all live at
once), compile time and seconds per sampler step. Writes <out_dir>/sample_memory.json.

The device peak also counts compilation (GPU autotuning workspaces, ~25 GiB for LDM-4 on an H200), so the
peak right after compiling is recorded too, and `--cache_dir=DIR` runs each mode twice: the first process
compiles into that persistent compilation cache, the second loads the executable from it (no autotuning)
and is the one reported, so its peak is the sampler's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/ldm4_bedrooms.py"), "Model config.")
_OUT = flags.DEFINE_string("out_dir", None, "Directory for sample_memory.json.")
_MODES = flags.DEFINE_list("modes", ["fp", "fakequant", "packed"], "Which weights to sample with.")
_BATCH = flags.DEFINE_integer("batch", 8, "Samples per batch.")
_STEPS = flags.DEFINE_integer("steps", 20, "DDIM steps.")
_ACT = flags.DEFINE_integer("act_bits", 32, "Activation bits of the BinaryDM modes (32, 8, 4).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs after the first (compiling) one.")
_CACHE = flags.DEFINE_string("cache_dir", None, "Persistent compilation cache: compile in a first process, "
                             "measure in a second that loads the executable (keeps autotuning out of the peak).")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one mode and print its JSON.")


def _random_params(model, model_cfg, seed=0):
    """Host numpy params of `model` from its abstract init: floats ~N(0, 0.05), uint words random bits."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    s, c = model_cfg.image_size, model_cfg.in_channels
    y = jnp.zeros((1,), jnp.int32) if model_cfg.num_classes else None
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, c)), jnp.zeros((1,), jnp.int32), y)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if np.issubdtype(leaf.dtype, np.unsignedinteger):
            return rng.integers(0, np.iinfo(leaf.dtype).max, leaf.shape, dtype=leaf.dtype, endpoint=True)
        if name in ("scales", "act_step"):
            return np.full(leaf.shape, 0.05, leaf.dtype)
        return (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fill, shapes["params"])
    masks = jax.tree.map(lambda m: np.ones(m.shape, m.dtype), shapes.get("masks", {}))
    return params, masks


def run_mode(mode: str) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections

    from bdm_jax import diffusion, rules
    from bdm_jax.config import validate
    from bdm_jax.export import packed_plan
    from bdm_jax.unet import UNet

    cfg = ml_collections.ConfigDict(_CONFIG.value.to_dict())
    with cfg.unlocked():
        if mode != "fp":
            if cfg.method == "fp":
                cfg.method = "binarydm"
                cfg.quant.multi_basis = cfg.quant.lrm = cfg.quant.progressive = None
            cfg.quant.act_bits = _ACT.value
    cfg = validate(cfg)
    plan = None
    if mode != "fp":
        plan = rules.build_plan(cfg.model, cfg.quant)
        if mode == "packed":
            plan = packed_plan(plan, {p: s.bases for p, s in plan.as_dict().items() if s.bases}, 32)
    model = UNet.from_config(cfg.model, plan)
    params, masks = _random_params(model, cfg.model)
    dev = jax.devices()[0]
    stats = lambda: dev.memory_stats() or {}  # noqa: E731
    before = stats().get("bytes_in_use", 0)
    params = jax.device_put(params, dev)
    masks = jax.device_put(masks, dev)
    jax.block_until_ready(params)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    after_weights = stats().get("bytes_in_use", 0)

    sched = diffusion.make_schedule(cfg.diffusion.beta_schedule, cfg.diffusion.timesteps, cfg.diffusion.beta_start,
                                    cfg.diffusion.beta_end)
    shape = (_BATCH.value, cfg.model.image_size, cfg.model.image_size, cfg.model.out_channels)
    labels = jnp.arange(shape[0], dtype=jnp.int32) % cfg.model.num_classes if cfg.model.num_classes else None

    def sample(params, masks, rng):
        variables = {"params": params, "masks": masks} if mode == "fakequant" else {"params": params}
        fn = lambda x, t: model.apply(variables, x, t, labels)  # noqa: E731
        return diffusion.sample(fn, sched, shape, rng, sampler="ddim", steps=_STEPS.value, eta=0.0)

    t0 = time.perf_counter()
    compiled = jax.jit(sample).lower(params, masks, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    peak_after_compile = stats().get("peak_bytes_in_use", 0)
    ma = compiled.memory_analysis()
    analysis = {k: int(getattr(ma, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                 "temp_size_in_bytes", "generated_code_size_in_bytes")
                if ma is not None and hasattr(ma, k)}
    jax.block_until_ready(compiled(params, masks, jax.random.key(1)))
    times = []
    for i in range(_REPEATS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, masks, jax.random.key(2 + i)))
        times.append(time.perf_counter() - t0)
    st = stats()
    return dict(
        mode=mode, device=str(dev.device_kind), platform=dev.platform, jax=jax.__version__,
        weight_bytes_on_device=int(weight_bytes), bytes_in_use_before=int(before),
        bytes_in_use_with_weights=int(after_weights), peak_bytes_in_use=int(st.get("peak_bytes_in_use", 0)),
        peak_bytes_after_compile=int(peak_after_compile), compilation_cache=bool(_CACHE.value),
        memory_stats_available=bool(st), compiled=analysis, compile_s=compile_s,
        seconds_per_run=min(times) if times else None, seconds_per_step=min(times) / _STEPS.value if times else None,
        batch=_BATCH.value, steps=_STEPS.value, act_bits=_ACT.value if mode != "fp" else 32,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CHILD.value:
        print("RESULT " + json.dumps(run_mode(_CHILD.value)))
        return
    if not _OUT.value:
        raise app.UsageError("--out_dir is required")
    bad = [m for m in _MODES.value if m not in ("fp", "fakequant", "packed")]
    if bad:
        raise app.UsageError(f"--modes: {bad} not in fp, fakequant, packed")
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if _CACHE.value:
        env.update(JAX_COMPILATION_CACHE_DIR=os.path.abspath(_CACHE.value),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    results = []
    for mode in _MODES.value:
        args = [sys.executable, os.path.abspath(__file__), f"--child={mode}"] + [a for a in sys.argv[1:]
                                                                              if not a.startswith("--child")]
        for _ in range(2 if _CACHE.value else 1):  # with a cache: fill it, then measure from it
            proc = subprocess.run(args, env=env, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"mode {mode} failed (exit {proc.returncode})")
        r = json.loads(line[-1][7:])
        results.append(r)
        c = r["compiled"]
        print(f"{mode:10s} weights {r['weight_bytes_on_device'] / 2**20:9.2f} MB  peak "
              f"{r['peak_bytes_in_use'] / 2**20:9.2f} MB  "
              f"XLA args {c.get('argument_size_in_bytes', 0) / 2**20:9.2f} MB "
              f"temp {c.get('temp_size_in_bytes', 0) / 2**20:9.2f} MB  {r['seconds_per_step'] * 1e3:8.2f} ms/step "
              f"(compile {r['compile_s']:.1f} s)")
    os.makedirs(_OUT.value, exist_ok=True)
    path = os.path.join(_OUT.value, "sample_memory.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(config=_CONFIG.value.to_dict(), results=results), f, indent=2, default=str)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
