"""Sharded training over a device mesh (issue 5): mesh and FSDP rules, the multi-host batch, topology-free
checkpoints, batch-sharded sampling, and `jax.distributed` start-up detection.

The 8-device checks run once, in a child process started with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (this file run as a script), so the rest of the suite
keeps its single CPU device. The child trains configs/tiny.py (FP, and BinaryDM QAT from a random tiny
teacher) for 3 steps on meshes 1 (one device), 8x1, 4x2 and 1x8 through `trainer.shard_training` (the code
path of `train`), saves the 4x2 run after 2 steps, restores it on a 2x2 mesh of 4 devices and continues,
and samples on 8 devices; this process restores the same checkpoint on its single device and continues.

Tolerances (float32; a different device split changes the order of the batch and FSDP reductions, so
results agree to the last bits, not bit for bit): loss and grad norm rtol 1e-5; params after 3 steps
(lr 1e-3, the update of step 0 is 0 by warm-up) atol 2e-6; samples atol 1e-5.
Time: ~100 s on a lightly loaded 2-core CPU (the child compiles 12 train steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(8, 1), (4, 2), (1, 8)]
METHODS = ["fp", "binarydm"]
STEPS, SAVE_AT = 3, 2
LOSS_RTOL, PARAM_ATOL, SAMPLE_ATOL = 1e-5, 2e-6, 1e-5


def _config(method: str, data: int = 1, fsdp: int = 1):
    from bdm_jax.config import validate
    from configs import tiny

    cfg = tiny.get_config()
    cfg.method = method
    # One resolution level, attention only in the middle block: half of tiny's layers, so that the child's
    # 11 train-step compiles stay cheap. Every kind of layer and state leaf is still there.
    cfg.model.channel_mult = (1,)
    cfg.model.attention_resolutions = ()
    cfg.mesh.data, cfg.mesh.fsdp = data, fsdp
    cfg.mesh.fsdp_min_size = 4096  # the UNet's 3x3 convs (9216 elements) are split, its norms and biases not
    cfg.train.lr = 1e-3
    cfg.train.ema_decay = 0.5  # so that EMA differences show up within 3 steps
    return validate(cfg)


def _batches(cfg, mesh, steps: int = STEPS) -> list:
    from bdm_jax import data as data_lib
    from bdm_jax import sharding

    source = data_lib.create_source(cfg.data)
    kw = dict(global_batch_size=cfg.train.batch_size, seed=cfg.seed, random_flip=False)
    return [sharding.global_batch(data_lib.get_batch(source, s, **kw), sharding.batch_sharding(mesh))
            for s in range(steps)]


def _teacher(setup, batch):
    """A random FP teacher of the tiny architecture (host numpy: QAT init must place it itself)."""
    import jax
    import jax.numpy as jnp

    params = setup.fp_model.init(jax.random.key(1), batch["image"][:1], jnp.zeros((1,), jnp.int32))["params"]
    return jax.tree.map(np.asarray, params)


def _flat(tree) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _train(sharded, state, batches, start: int) -> tuple[object, list[dict]]:
    import jax

    rows = []
    for s in range(start, len(batches)):
        state, metrics = sharded.step(state, batches[s])
        rows.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return state, rows


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) if a[k].size else 0.0 for k in a)


# ------------------------------------------------------------------------------------------------ rules
def test_param_spec_shards_the_largest_divisible_axis_of_large_arrays():
    from jax.sharding import PartitionSpec as P

    from bdm_jax.sharding import param_spec

    assert param_spec((3, 3, 32, 64), 2, 4096) == P(None, None, None, "fsdp")
    assert param_spec((3, 3, 64, 64), 2, 4096) == P(None, None, "fsdp", None)  # the first of equal axes
    assert param_spec((6, 4, 100), 4, 0) == P(None, None, "fsdp")
    assert param_spec((6, 4), 4, 0) == P(None, "fsdp")  # 6 does not divide: the next largest axis
    assert param_spec((3, 5), 2, 0) == P()  # nothing divides
    assert param_spec((3, 3, 32, 64), 2, 2**16) == P()  # below the size threshold
    assert param_spec((3, 3, 32, 64), 1, 0) == P()  # no fsdp axis
    assert param_spec((), 8, 0) == P()  # scalars (step, masks, Adam's count)


def test_create_mesh_sizes_and_one_line_errors():
    import jax

    from bdm_jax import sharding

    mesh = sharding.create_mesh({"data": -1, "fsdp": 1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    assert dict(sharding.create_mesh({"data": 1, "fsdp": -1}).shape) == {"data": 1, "fsdp": 1}
    bad = [({"data": 2, "fsdp": 1}, "2 x 1 must equal the 1 devices"), ({"data": -1, "fsdp": -1}, "at most one"),
           ({"data": 0, "fsdp": 1}, "config.mesh.data=0"), ({"data": -1, "fsdp": 2}, "config.mesh.fsdp=2 must divide"),
           ({"data": True, "fsdp": 1}, "config.mesh.data=True")]
    for cfg, msg in bad:
        with pytest.raises(ValueError, match=msg):
            sharding.create_mesh(cfg)
    assert sharding.fsdp_min_size({"data": 1}) == sharding.FSDP_MIN_SIZE  # configs saved before the field
    with pytest.raises(ValueError, match="config.mesh.fsdp_min_size=-1"):
        sharding.fsdp_min_size({"fsdp_min_size": -1})
    assert len(jax.devices()) == 1  # the 8-device checks must not leak into this process


def test_devices_are_grouped_by_process():
    """Multi-host: each host's devices must be contiguous along the batch axis (its block of the batch)."""
    from types import SimpleNamespace

    from bdm_jax.sharding import ordered_devices

    devs = [SimpleNamespace(id=i, process_index=p) for i, p in enumerate([1, 0, 1, 0, 2, 2])]
    assert [(d.process_index, d.id) for d in ordered_devices(devs)] == [(0, 1), (0, 3), (1, 0), (1, 2), (2, 4), (2, 5)]


def test_global_batch_on_one_device():
    from bdm_jax import sharding

    mesh = sharding.create_mesh({"data": -1, "fsdp": 1})
    local = {"image": np.arange(4 * 2 * 2 * 1, dtype=np.float32).reshape(4, 2, 2, 1), "label": np.arange(4)}
    out = sharding.global_batch(local, sharding.batch_sharding(mesh))
    for k in local:
        np.testing.assert_array_equal(np.asarray(out[k]), local[k])
        assert out[k].sharding == sharding.batch_sharding(mesh)


def test_distributed_detection():
    from bdm_jax import distributed

    assert distributed.detect({}) == (None, {})
    assert distributed.detect({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "4",
                               "JAX_PROCESS_ID": "2"}) == ("JAX_COORDINATOR_ADDRESS", {"num_processes": 4, "process_id": 2})
    assert distributed.detect({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "16"})[0] == "SLURM (16 tasks)"
    assert distributed.detect({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "1"})[0] is None
    assert distributed.detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})[0] is None  # sbatch script, no srun
    assert distributed.detect({"OMPI_COMM_WORLD_SIZE": "2"})[0] == "Open MPI (2 ranks)"
    assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b,c,d"})[0] == "TPU slice (4 workers)"
    assert distributed.detect({"TPU_WORKER_HOSTNAMES": "localhost"})[0] is None
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='x'"):
        distributed.detect({"JAX_COORDINATOR_ADDRESS": "h0:1", "JAX_NUM_PROCESSES": "x"})
    assert distributed.initialize("auto", env={}) is False  # one process: nothing to do
    assert distributed.initialize("off", env={"OMPI_COMM_WORLD_SIZE": "2"}) is False
    with pytest.raises(ValueError, match="--distributed='yes'"):
        distributed.initialize("yes")


# ------------------------------------------------------------------------------------- 8 fake devices
def _run_child(out: str) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               # 8 fake devices; low LLVM effort: these tiny steps are compile-bound (about 3x less CPU).
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), out], env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def eight(request, tmp_path_factory) -> tuple[str, dict]:
    """(output dir, results) of the 8-device child, run once per test session even under pytest-xdist
    (its workers share one directory named by the run's uid, and a file lock)."""
    import fcntl

    worker = getattr(request.config, "workerinput", None)
    if worker is None:
        out = str(tmp_path_factory.mktemp("eight_devices"))
        _run_child(out)
    else:
        out = str(tmp_path_factory.getbasetemp().parent / f"eight_devices_{worker['testrunuid']}")
        os.makedirs(out, exist_ok=True)
        with open(out + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(os.path.join(out, "results.json")):
                _run_child(out)
    with open(os.path.join(out, "results.json")) as f:
        return out, json.load(f)


def _assert_rows_close(rows, ref_rows):
    assert len(rows) == len(ref_rows)
    for got, want in zip(rows, ref_rows):
        for key in ("loss", "mse", "grad_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=LOSS_RTOL, err_msg=key)
        if "lrm" in want:
            np.testing.assert_allclose(got["lrm"], want["lrm"], rtol=1e-4, atol=1e-9, err_msg="lrm")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_mesh_gives_the_loss_and_params_of_one_device(eight, method, shape):
    _, res = eight
    ref, run = res["runs"][f"{method}/1x1"], res["runs"][f"{method}/{shape[0]}x{shape[1]}"]
    _assert_rows_close(run["rows"], ref["rows"])
    assert ref["rows"][-1]["lr"] > 0 and ref["rows"][0]["loss"] != ref["rows"][-1]["loss"]
    assert run["param_diff"] <= PARAM_ATOL and run["ema_diff"] <= PARAM_ATOL


def test_fsdp_shards_kernels_and_everything_shaped_like_them(eight):
    _, res = eight
    for method in METHODS:
        specs = res["specs"][method]
        kernel = ".params['input_blocks_1']['res']['in_conv']['kernel']"  # 3x3x32x32
        assert specs[kernel]["spec"] == [None, None, "fsdp", None], specs[kernel]
        assert specs[kernel]["shape"] == [3, 3, 32, 32] and specs[kernel]["shard"] == [3, 3, 16, 32]
        assert specs[kernel]["devices"] == 8
        twins = [k for k in specs if k.endswith("['input_blocks_1']['res']['in_conv']['kernel']")]
        expected = {".params", ".ema_params", ".opt_state[1][0].mu", ".opt_state[1][0].nu"}
        if method == "binarydm":
            expected.add(".teacher_params")
        assert {k.split("['input_blocks_1']")[0] for k in twins} == expected
        assert all(specs[k]["spec"] == specs[kernel]["spec"] for k in twins)
        for key, v in specs.items():
            big = int(np.prod(v["shape"])) >= 4096
            assert ("fsdp" in v["spec"]) == (big and any(d % 2 == 0 for d in v["shape"])), (key, v)
        small = [k for k in specs if k in (".step", ".rng") or k.startswith((".masks", ".lrm_proj"))]
        assert {".step", ".rng"} <= set(small)
        if method == "binarydm":
            assert any(k.startswith(".masks") for k in small) and any(k.startswith(".lrm_proj") for k in small)


def test_checkpoint_from_8_devices_restores_on_4_and_continues(eight):
    _, res = eight
    run, ref = res["runs"]["binarydm/restored_on_4"], res["runs"]["binarydm/4x2"]
    assert run["devices"] == [4]
    _assert_rows_close(run["rows"], ref["rows"][SAVE_AT:])
    assert run["param_diff"] <= PARAM_ATOL


def test_checkpoint_from_8_devices_restores_on_this_1_device_process(eight):
    import jax

    from bdm_jax import checkpoint as ckpt_lib
    from bdm_jax import sharding
    from bdm_jax.sampling import load_for_sampling
    from bdm_jax.train_state import make_optimizer
    from bdm_jax.trainer import Setup, shard_training

    out, res = eight
    assert jax.device_count() == 1
    cfg = _config("binarydm")
    workdir = os.path.join(out, "binarydm")
    # Target-less loaders (teacher, sample.py) take the 8-device checkpoint too.
    teacher, step = ckpt_lib.load_params(workdir, cfg)
    assert step == SAVE_AT and {len(x.sharding.device_set) for x in jax.tree.leaves(teacher)} == {1}
    _, ema, masks, _ = load_for_sampling(workdir)
    assert jax.tree.structure(ema) == jax.tree.structure(teacher) and masks

    setup, tx = Setup.from_config(cfg), make_optimizer(cfg.train)
    mesh = sharding.create_mesh(cfg.mesh)
    batches = _batches(cfg, mesh)
    sharded = shard_training(setup, tx, mesh, batches[0])
    mngr = ckpt_lib.manager(workdir, create=False)
    state = ckpt_lib.restore_state(mngr, SAVE_AT, sharded.abstract)
    mngr.close()
    assert int(state.step) == SAVE_AT
    state, rows = _train(sharded, state, batches, SAVE_AT)
    _assert_rows_close(rows, res["runs"]["binarydm/4x2"]["rows"][SAVE_AT:])
    assert _max_diff(_flat(state.params), dict(np.load(os.path.join(out, "binarydm_params.npz")))) <= PARAM_ATOL


def test_sampling_is_split_over_the_batch(eight):
    _, res = eight
    s = res["sampling"]
    assert s["out_devices"] == 8 and s["shard_rows"] == 1 and s["out_spec"] == [["data", "fsdp"]]
    assert s["max_diff_uint8"] == 0 and s["std"] > 0


# ------------------------------------------------------------------------------------------------ child
def _child(out_dir: str) -> None:
    """Runs with 8 fake CPU devices; writes results.json, <method>_params.npz and checkpoints to `out_dir`."""
    import jax

    from bdm_jax import checkpoint as ckpt_lib
    from bdm_jax import sharding
    from bdm_jax.train_state import make_optimizer
    from bdm_jax.trainer import Setup, generate, make_sample_fn, shard_training

    assert jax.device_count() == 8, jax.devices()
    devices = jax.devices()
    res: dict = {"timings": {}, "runs": {}, "specs": {}}
    for method in METHODS:
        cfg = _config(method)
        setup, tx = Setup.from_config(cfg), make_optimizer(cfg.train)
        teacher, ref = None, None
        for shape in [(1, 1)] + MESHES:
            t0 = time.time()
            name = f"{method}/{shape[0]}x{shape[1]}"
            mesh = sharding.create_mesh({"data": shape[0], "fsdp": shape[1]}, devices[: shape[0] * shape[1]])
            batches = _batches(cfg, mesh)
            if teacher is None:
                teacher = _teacher(setup, batches[0]) if setup.quant else {}
            sharded = shard_training(setup, tx, mesh, batches[0])
            state = sharded.init(teacher, batches[0])
            if shape == (4, 2):  # FSDP: what the rule did to every leaf
                res["specs"][method] = {k: dict(spec=_spec(v.sharding.spec), shape=list(v.shape),
                                                shard=list(v.addressable_shards[0].data.shape),
                                                devices=len(v.sharding.device_set))
                                        for k, v in _flat_arrays(state).items()}
                # Save after SAVE_AT steps and go on: the uninterrupted reference for the restores.
                state, rows = _train(sharded, state, batches[:SAVE_AT], 0)
                mngr = ckpt_lib.manager(os.path.join(out_dir, method))
                ckpt_lib.save(mngr, SAVE_AT, state, cfg)
                mngr.wait_until_finished()
                mngr.close()
                state, more = _train(sharded, state, batches, SAVE_AT)
                rows += more
                np.savez(os.path.join(out_dir, f"{method}_params.npz"), **_flat(state.params))
            else:
                state, rows = _train(sharded, state, batches, 0)
            params, ema = _flat(state.params), _flat(state.ema_params)
            run = {"rows": rows}
            if ref is None:
                ref = dict(params=params, ema=ema, sharded=sharded, mesh=mesh, state=state)
            else:
                run.update(param_diff=_max_diff(params, ref["params"]), ema_diff=_max_diff(ema, ref["ema"]))
            res["runs"][name] = run
            res["timings"][name] = time.time() - t0

    # The BinaryDM checkpoint written on 8 devices (4x2), restored on a 2x2 mesh of 4 devices, continued.
    t0 = time.time()
    cfg = _config("binarydm")
    setup, tx = Setup.from_config(cfg), make_optimizer(cfg.train)
    mesh4 = sharding.create_mesh({"data": 2, "fsdp": 2}, devices[:4])
    batches4 = _batches(cfg, mesh4)
    sharded4 = shard_training(setup, tx, mesh4, batches4[0])
    mngr = ckpt_lib.manager(os.path.join(out_dir, "binarydm"), create=False)
    restored = ckpt_lib.restore_state(mngr, SAVE_AT, sharded4.abstract)
    mngr.close()
    on = sorted({len(x.sharding.device_set) for x in jax.tree.leaves(restored)})
    restored, rows4 = _train(sharded4, restored, batches4, SAVE_AT)
    ref_params = dict(np.load(os.path.join(out_dir, "binarydm_params.npz")))
    res["runs"]["binarydm/restored_on_4"] = {"rows": rows4, "devices": on,
                                             "param_diff": _max_diff(_flat(restored.params), ref_params)}
    res["timings"]["binarydm/restore_on_4"] = time.time() - t0

    # Sampling split over the batch: 8 samples on 8 devices are the samples of one device.
    t0 = time.time()
    with cfg.unlocked():
        cfg.sample.steps = 2
    setup = Setup.from_config(cfg)
    params, masks = ref["state"].params, ref["state"].masks  # BinaryDM, on one device
    mesh8 = sharding.create_mesh({"data": -1, "fsdp": 1})
    one = generate(setup, params, masks, 8, 8, seed=3, mesh=ref["mesh"])
    eight = generate(setup, params, masks, 8, 8, seed=3)  # default: all devices
    out = make_sample_fn(setup, 8, mesh8)(sharding.on_mesh(params, mesh8), sharding.on_mesh(masks, mesh8),
                                          jax.random.key(3))
    res["sampling"] = {"max_diff_uint8": int(np.max(np.abs(one.astype(int) - eight.astype(int)))),
                       "std": float(one.std()), "out_devices": len(out.sharding.device_set),
                       "out_spec": _spec(out.sharding.spec), "shard_rows": int(out.addressable_shards[0].data.shape[0])}
    res["timings"]["sampling"] = time.time() - t0
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1)


def _spec(spec) -> list:
    """A PartitionSpec as JSON: one entry per axis, None, an axis name or a list of names."""
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def _flat_arrays(state) -> dict:
    import jax

    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(state)}


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _child(sys.argv[1])
