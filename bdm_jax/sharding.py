"""Device mesh from config and the shardings of the train state and the batch.

Axes `data` and `fsdp`; the batch is split over both. Parameters are replicated, except that with
fsdp > 1 each array above `min_size` elements is split over `fsdp` along its largest divisible axis.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

FSDP_MIN_SIZE = 2**16


def create_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    data, fsdp = int(mesh_cfg.data), int(mesh_cfg.fsdp)
    if data == -1 and fsdp == -1:
        raise ValueError("config.mesh: at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        if fsdp < 1 or n % fsdp:
            raise ValueError(f"config.mesh.fsdp={fsdp} must be >= 1 and divide the {n} devices")
        data = n // fsdp
    if fsdp == -1:
        if data < 1 or n % data:
            raise ValueError(f"config.mesh.data={data} must be >= 1 and divide the {n} devices")
        fsdp = n // data
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(f"config.mesh data x fsdp = {data} x {fsdp} must equal the {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """FSDP rule: shard the largest axis divisible by `fsdp` of arrays with >= min_size elements."""
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Shardings for every leaf of an abstract train state (by the rule above)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)), abstract_state)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble the global batch from this host's slice (multi-host safe)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
