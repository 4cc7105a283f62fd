"""FID Inception weights: PyTorch state dict (pytorch-fid layout) -> Flax variables, and ``.npz`` I/O.

The standard FID weights are ``pt_inception-2015-12-05-6726825d.pth`` (see
:data:`bdm_jax.inception.FID_WEIGHTS_URL`): a torchvision ``Inception3`` state dict with 1008 classes, no
auxiliary classifier, and pytorch-fid's FID blocks. Convert once (needs torch; afterwards JAX alone
reads the ``.npz``):

    python -m bdm_jax.convert_inception --src=pt_inception-2015-12-05-6726825d.pth --dst=fid_inception.npz

Mapping (module names are shared, so it is a rename + transpose):
``<m>.conv.weight`` [O, I, kh, kw] -> params ``<m>/conv/kernel`` [kh, kw, I, O];
``<m>.bn.weight/bias`` -> params ``<m>/bn/scale/bias``; ``<m>.bn.running_mean/var`` -> batch_stats
``<m>/bn/mean/var``; ``fc.weight`` [1008, 2048] -> params ``fc/kernel`` [2048, 1008]; ``fc.bias`` as is.
``num_batches_tracked`` counters are dropped.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bdm_jax.inception import FID_WEIGHTS_FILE, FIDInceptionV3, MissingWeightsError, NUM_CLASSES

__all__ = ["torch_to_flax", "load_torch_state_dict", "load_variables", "save_variables", "expected_shapes"]

_BN_RENAME = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def expected_shapes() -> Dict[tuple, tuple]:
    """{(collection, *module path, name): shape} of every FIDInceptionV3 variable (abstract init, no FLOPs)."""
    shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 299, 299, 3), jnp.float32))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def _flax_key(torch_key: str) -> tuple | None:
    """Flax (collection, *path, name) of a torch key; None for keys that carry no weights."""
    parts = torch_key.split(".")
    *mod, leaf = parts
    if leaf == "num_batches_tracked":
        return None
    if mod == ["fc"]:
        return ("params", "fc", {"weight": "kernel", "bias": "bias"}.get(leaf, leaf))
    if mod and mod[-1] == "conv":
        return ("params", *mod, {"weight": "kernel"}.get(leaf, leaf))
    if mod and mod[-1] == "bn" and leaf in _BN_RENAME:
        coll = "batch_stats" if leaf.startswith("running_") else "params"
        return (coll, *mod, _BN_RENAME[leaf])
    return ("?", torch_key)  # unknown: reported below


def torch_to_flax(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Converts a pytorch-fid FID Inception state dict (values: torch tensors or arrays) to Flax
    variables ``{"params": ..., "batch_stats": ...}`` of :class:`FIDInceptionV3` (float32 numpy).
    Raises ValueError naming the offending keys if the dict is not that network's."""
    want = expected_shapes()
    out: Dict[tuple, np.ndarray] = {}
    unknown = []
    for tkey, value in state_dict.items():
        fkey = _flax_key(tkey)
        if fkey is None:
            continue
        if fkey not in want:
            unknown.append(tkey)
            continue
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float32)
        if fkey[-1] == "kernel":
            arr = arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr.T
        if arr.shape != want[fkey]:
            hint = ""
            if tkey == "fc.weight" and arr.shape[1] != NUM_CLASSES:
                hint = (f" (the FID Inception has {NUM_CLASSES} classes; {arr.shape[1]} looks like torchvision's "
                        f"ImageNet Inception-v3, not {FID_WEIGHTS_FILE})")
            raise ValueError(f"state dict entry {tkey!r} has shape {tuple(np.shape(value))}, expected the "
                             f"FID Inception's {want[fkey]} after transposition{hint}")
        out[fkey] = arr
    missing = sorted("/".join(k) for k in want if k not in out)
    if unknown or missing:
        aux = any(k.startswith("AuxLogits") for k in unknown)
        raise ValueError(
            "state dict is not the FID Inception-v3's ("
            + (f"unexpected keys: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; " if unknown else "")
            + (f"missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "")
            + (f"; AuxLogits means torchvision's ImageNet weights, use {FID_WEIGHTS_FILE}" if aux else "")
            + ")"
        )
    return traverse_util.unflatten_dict(out)


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Reads a ``.pth`` state dict with torch (tensors only, ``weights_only=True``) as numpy arrays."""
    try:
        import torch
    except ImportError:
        raise MissingWeightsError(
            f"reading {path!r} needs torch (pip install torch), or convert it on a machine with torch: "
            f"python -m bdm_jax.convert_inception --src={path} --dst=fid_inception.npz"
        ) from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - reported with the path
        raise MissingWeightsError(f"{path!r} is not a readable PyTorch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(sd, Mapping):
        raise MissingWeightsError(f"{path!r} holds a {type(sd).__name__}, not a state dict")
    return {k: v.detach().cpu().numpy() for k, v in sd.items() if hasattr(v, "detach")}


def save_variables(variables: Mapping[str, Any], path: str) -> None:
    """Writes Flax variables to ``path`` (.npz, "/"-joined keys), atomically."""
    flat = traverse_util.flatten_dict(jax.device_get(dict(variables)), sep="/")
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
    os.replace(tmp, path)


def load_variables(path: str) -> Dict[str, Any]:
    """Flax variables of FIDInceptionV3 from a converted ``.npz`` or an original ``.pth`` (needs torch)."""
    if not os.path.isfile(path):
        from bdm_jax.inception import missing_weights_message

        raise MissingWeightsError(missing_weights_message(path))
    if path.endswith(".npz"):
        try:
            with np.load(path) as f:
                flat = {tuple(k.split("/")): f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise MissingWeightsError(f"{path!r} is not a readable .npz ({e})") from None
        want = expected_shapes()
        bad = [("/".join(k), flat[k].shape, want.get(k)) for k in flat if want.get(k) != flat[k].shape]
        missing = ["/".join(k) for k in want if k not in flat]
        if bad or missing:
            raise MissingWeightsError(f"{path!r} does not hold FID Inception variables (mismatched: {bad[:3]}, "
                                      f"missing: {missing[:3]}); re-create it with python -m bdm_jax.convert_inception")
        return traverse_util.unflatten_dict(flat)
    return torch_to_flax(load_torch_state_dict(path))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help=f"PyTorch state dict, e.g. {FID_WEIGHTS_FILE}")
    parser.add_argument("--dst", required=True, help="output .npz")
    args = parser.parse_args(argv)
    try:
        variables = load_variables(args.src)
        dst = args.dst if args.dst.endswith(".npz") else args.dst + ".npz"
        save_variables(variables, dst)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(int(np.prod(s)) for k, s in expected_shapes().items() if k[0] == "params")
    print(f"wrote {dst} ({n:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
