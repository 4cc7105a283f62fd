"""Device mesh from config, and the shardings of the train state, the batch and the samples (issue 5).

Mesh axes `data` and `fsdp` (config.mesh; one of them may be -1 = all remaining devices). The batch is
split over both axes. Every leaf of the train state follows one rule by shape (`param_spec`): replicated,
except that with fsdp > 1 an array of at least `config.mesh.fsdp_min_size` elements is split over `fsdp`
along its largest divisible axis. Params, EMA, the optax moments (same shapes as the params, so the same
spec), the teacher, the LRM projections and the masks all go through that rule; scalars (step, masks,
Adam's count) and the rng key data are below any threshold and therefore replicated.

Multi-host: the devices of the mesh are ordered process by process, so process p's devices hold the
contiguous rows `data.host_slice(B, p, P)` of the global batch, exactly the rows that process reads
(`data.get_batch(..., process_index=p)`); `global_batch` checks this and assembles the global array from
per-device pieces with `jax.make_array_from_single_device_arrays`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

FSDP_MIN_SIZE = 2**16  # elements; smaller arrays are replicated even with fsdp > 1 (not worth a gather)
BATCH_AXES = ("data", "fsdp")


def _axis_size(mesh_cfg: Any, name: str) -> int:
    value = mesh_cfg[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (value < 1 and value != -1):
        raise ValueError(f"config.mesh.{name}={value!r} is not allowed: a positive integer or -1 (all remaining devices)")
    return int(value)


def fsdp_min_size(mesh_cfg: Any) -> int:
    """config.mesh.fsdp_min_size (absent in configs saved before it existed: the default)."""
    value = mesh_cfg.get("fsdp_min_size", FSDP_MIN_SIZE)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"config.mesh.fsdp_min_size={value!r} is not allowed: an integer >= 0 (elements)")
    return int(value)


def ordered_devices(devices: list | None = None) -> list:
    """`devices` (default: all) grouped by process, in-process order kept, so each host's devices are
    contiguous along the flattened (data, fsdp) axes and hold that host's block of the batch."""
    devices = list(devices if devices is not None else jax.devices())
    return sorted(devices, key=lambda d: d.process_index)  # stable


def create_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
    """Mesh ("data", "fsdp") of `devices` (default: all devices of all processes) sized by config.mesh."""
    devices = ordered_devices(devices)
    n = len(devices)
    data, fsdp = _axis_size(mesh_cfg, "data"), _axis_size(mesh_cfg, "fsdp")
    if data == -1 and fsdp == -1:
        raise ValueError("config.mesh: at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        if n % fsdp:
            raise ValueError(f"config.mesh.fsdp={fsdp} must divide the {n} devices")
        data = n // fsdp
    if fsdp == -1:
        if n % data:
            raise ValueError(f"config.mesh.data={data} must divide the {n} devices")
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"config.mesh data x fsdp = {data} x {fsdp} must equal the {n} devices")
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """FSDP rule: shard the largest axis divisible by `fsdp` of arrays with >= min_size elements."""
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):  # stable: the first of equal axes
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
    """A NamedSharding for every leaf of an abstract train state (or any pytree of arrays), by `param_spec`."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp, min_size)), abstract_state)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`: the restore target that makes a checkpoint topology-free."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def on_mesh(tree: Any, mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> Any:
    """`tree` (host or device arrays, e.g. params loaded for sampling) on the devices of `mesh`: leaves
    already spread over exactly those devices stay as they are, the others are placed by the state rule."""
    devices = set(mesh.devices.flat)
    fsdp = mesh.shape["fsdp"]

    def place(x: Any) -> Any:
        if isinstance(x, jax.Array) and x.sharding.device_set == devices:
            return x
        return jax.device_put(x, NamedSharding(mesh, param_spec(tuple(np.shape(x)), fsdp, min_size)))

    return jax.tree.map(place, tree)


def _rows(index: tuple, n: int) -> tuple[int, int]:
    s = index[0] if index else slice(None)
    return (s.start or 0, n if s.stop is None else s.stop)


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """The global batch from this host's block of it (`data.get_batch(..., process_index, process_count)`).

    Each addressable device gets its rows of the host block (`jax.make_array_from_single_device_arrays`),
    so global row i is example i of the step's global batch whatever the topology. Raises if a device of
    this process holds rows outside the process's block (a mesh not ordered by process).
    """
    pc, pi = jax.process_count(), jax.process_index()

    def one(x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        n = x.shape[0]
        gshape = (n * pc,) + x.shape[1:]
        start = pi * n
        devices, pieces = [], []
        for device, index in sharding.addressable_devices_indices_map(gshape).items():
            r0, r1 = _rows(index, gshape[0])
            if r0 < start or r1 > start + n:
                raise ValueError(
                    f"device {device} of process {pi} holds batch rows {r0}:{r1} but this process reads rows "
                    f"{start}:{start + n}; build the mesh with sharding.create_mesh (devices grouped by process)")
            devices.append(device)
            pieces.append(x[(slice(r0 - start, r1 - start),) + tuple(index[1:])])
        arrays = jax.device_put(pieces, devices)
        return jax.make_array_from_single_device_arrays(gshape, sharding, arrays)

    return {k: one(v) for k, v in local.items()}


def sample_sharding(mesh: Mesh | None, batch: int) -> NamedSharding | None:
    """Batch sharding for `batch` samples if it splits evenly over the mesh, else replicated (None: no mesh)."""
    if mesh is None:
        return None
    return batch_sharding(mesh) if batch % mesh.size == 0 else replicated(mesh)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-host sharded) array as numpy on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
