"""Export a BinaryDM checkpoint as real 1-bit weights, and load / sample the packed model (SPEC §2, §9).

    python -m bdm_jax.export --workdir=workdirs/digits --out=workdirs/digits/packed
    python sample.py --packed=workdirs/digits/packed --num=64

A packed checkpoint is a directory with two files, written together or not at all (tmp dir + rename):

* ``weights.safetensors`` — safetensors-format tensors (8-byte little-endian header length, JSON header,
  raw little-endian data), named by param path (``input_blocks_1/res/in_conv/kernel_bits``). Binarized
  layers store ``kernel_bits`` (sign bits per basis in uint32 or uint8 words, layout in bdm_jax.pack)
  and ``scales`` (bases, C_out) float32; their ``bias`` and LSQ ``act_step`` stay float32, as do all FP
  layers and norms (SPEC §3). EMA params of the checkpoint.
* ``manifest.json`` — format version, the run's config, the source checkpoint, the bit layout, and per
  layer: kernel shape, bases, bits per weight, bytes; per tensor: dtype, shape; size and sha256 of the
  weights file.

Bases: a layer exports as many bases as it uses at the checkpoint — a multi-basis layer whose EBB mask
``masks/extra_bases`` is 0 exports one. A checkpoint whose ``masks/binarize`` are not all 1 (progressive
schedule unfinished) or an FP run is refused. The packed model is the same UNet with a packed plan
(`QuantPlan(packed=True)`): it unpacks every kernel inside jit, so weights stay packed in device memory,
and its samples equal the fake-quantized training model's (same seed) bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from bdm_jax import pack, rules
from bdm_jax.config import ConfigError, architecture_dict, validate
from bdm_jax.layers import LayerSpec, QuantPlan
from bdm_jax.unet import UNet

FORMAT = "bdm-jax-packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
BIT_LAYOUT = (
    "kernel_bits[j, w, o]: bit b (LSB = 0) is the sign of basis j at fan-in index f = w * word_bits + b of "
    "output channel o (1 = +1, 0 = -1; padding bits 0); fan-in = row-major flatten of all kernel axes but "
    "the last (conv HWIO: f = (i * kw + j) * C_in + c; dense: f = c); kernel = sum_j scales[j] * sign_j"
)

_ST_DTYPES = {"F32": np.float32, "U32": np.uint32, "U8": np.uint8, "I32": np.int32}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class ExportError(ValueError):
    """A checkpoint that cannot be exported or a packed checkpoint that cannot be loaded (one line)."""


# --------------------------------------------------------------------------------------------------
# safetensors-format file I/O (own ~50 lines: no extra dependency, and the checks we need)
# --------------------------------------------------------------------------------------------------


def _write_tensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in sorted(tensors):
        a = tensors[name]
        if a.dtype not in _ST_NAMES:
            raise ExportError(f"tensor {name} has dtype {a.dtype}, not one of {sorted(map(str, _ST_NAMES))}")
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors recommends
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name], tensors[name].dtype.newbyteorder("<")).tobytes())
        f.flush()
        os.fsync(f.fileno())


def _read_tensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read()
    if size < 8:
        raise ExportError(f"{path} is truncated ({size} bytes): not a packed weights file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > size - 8:
        raise ExportError(f"{path} is truncated: header says {n} bytes, the file has {size - 8} after the length")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        raise ExportError(f"{path}: header is not JSON (not a packed weights file, or corrupted)") from None
    buf = memoryview(data)[8 + n :]
    meta = header.pop("__metadata__", {}) or {}
    out, end = {}, 0
    for name, e in header.items():
        dtype = np.dtype(_ST_DTYPES.get(e.get("dtype"), np.void))
        if dtype == np.void:
            raise ExportError(f"{path}: tensor {name} has unsupported dtype {e.get('dtype')!r}")
        b, en = e["data_offsets"]
        want = math.prod(e["shape"]) * dtype.itemsize
        if en - b != want or en > len(buf):
            raise ExportError(
                f"{path} is truncated or corrupted: tensor {name} needs bytes {b}..{en} "
                f"of a {len(buf)}-byte data section"
            )
        out[name] = np.frombuffer(buf[b:en], dtype.newbyteorder("<")).astype(dtype).reshape(e["shape"])
        end = max(end, en)
    if end != len(buf):
        raise ExportError(f"{path}: data section has {len(buf)} bytes but the tensors cover {end}")
    return out, meta


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flat(tree: Any) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def _unflat(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


# --------------------------------------------------------------------------------------------------
# Packing a student
# --------------------------------------------------------------------------------------------------


def packed_plan(plan: QuantPlan, bases: Mapping[str, int], word_bits: int) -> QuantPlan:
    """The inference plan: `plan` with each binarized layer's exported bases, `packed=True`."""
    pack.word_dtype(word_bits)  # validates word_bits
    entries = {
        p: LayerSpec(bases=bases[p], act_bits=s.act_bits) if s.bases else s for p, s in plan.as_dict().items()
    }
    return QuantPlan(tuple(sorted(entries.items())), packed=True, word_bits=word_bits, act_scale=plan.act_scale)


def exported_bases(masks: Any, plan: QuantPlan, where: str) -> dict[str, int]:
    """Bases to export per binarized layer; refuses masks that are not all binarized (unfinished run)."""
    flat = _flat(masks)
    quantized = {p for p, s in plan.as_dict().items()}
    missing = sorted(p for p in quantized if f"{p}/binarize" not in flat)
    if missing:
        raise ExportError(f"{where}: no binarize mask for {len(missing)} quantized layers (e.g. {missing[0]}): "
                          "not a BinaryDM checkpoint of this config")
    off = sorted(p for p in quantized if float(np.asarray(flat[f"{p}/binarize"])) != 1.0)
    if off:
        raise ExportError(
            f"{where} is unfinished: {len(off)} of {len(quantized)} quantized layers are not binarized yet "
            f"(masks/binarize = 0, e.g. {off[0]}; the progressive schedule has not completed); train further"
        )
    out = {}
    for p, s in plan.as_dict().items():
        if s.bases == 0:
            continue
        keep = flat.get(f"{p}/extra_bases", 1.0)
        out[p] = s.bases if s.bases == 1 or float(np.asarray(keep)) > 0 else 1
    return out


def pack_params(params: Any, bases: Mapping[str, int], word_bits: int) -> dict[str, np.ndarray]:
    """Flat {name: numpy array} of the packed model: kernels -> kernel_bits, scales cut to exported bases."""
    flat = {k: np.asarray(v) for k, v in _flat(params).items()}
    kernels = {p: flat[f"{p}/kernel"] for p in bases}
    scales = {p: flat[f"{p}/scales"][:k].astype(np.float32) for p, k in bases.items()}
    # One jit for all layers: one compilation instead of one per kernel shape.
    words = jax.jit(lambda ks, ss: {p: pack.pack_kernel(ks[p], ss[p], word_bits) for p in ks})(kernels, scales)
    out = {k: v for k, v in flat.items() if k.rsplit("/", 1)[0] not in bases or not k.endswith(("/kernel", "/scales"))}
    for p in bases:
        out[f"{p}/kernel_bits"] = np.asarray(words[p])
        out[f"{p}/scales"] = scales[p]
    return out


def _abstract_params(model: UNet, model_cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
    s, c = model_cfg.image_size, model_cfg.in_channels
    y = jnp.zeros((1,), jnp.int32) if model_cfg.num_classes else None
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, c)), jnp.zeros((1,), jnp.int32), y)
    return _flat(shapes["params"])


def _match(tree: Mapping[str, Any], want: Mapping[str, Any], what: str, expected: str) -> None:
    """One-line error unless `tree` has exactly `want`'s names, shapes and dtypes."""
    extra, missing = sorted(set(tree) - set(want)), sorted(set(want) - set(tree))
    if missing:
        raise ExportError(f"{what} lacks {len(missing)} arrays that {expected} has (e.g. {missing[0]})")
    if extra:
        raise ExportError(f"{what} has {len(extra)} arrays that {expected} does not (e.g. {extra[0]})")
    for name, w in want.items():
        a = tree[name]
        if tuple(a.shape) != tuple(w.shape) or np.dtype(a.dtype) != np.dtype(w.dtype):
            raise ExportError(
                f"{what}: {name} is {np.dtype(a.dtype)}{list(a.shape)} but {expected} expects "
                f"{np.dtype(w.dtype)}{list(w.shape)}"
            )


def _layer_records(layers: list, plan: QuantPlan, pplan: QuantPlan, tensors: Mapping[str, np.ndarray]) -> list[dict]:
    recs = []
    for li in layers:
        if li.kind == "act":
            continue
        s, ps = plan.get(li.path), pplan.get(li.path)
        names = [n for n in tensors if n.rsplit("/", 1)[0] == li.path]
        rec = dict(
            path=li.path, kind=li.kind, shape=list(li.shape), fan_in=math.prod(li.shape[:-1]), c_out=li.shape[-1],
            trained_bases=s.bases, bases=ps.bases, bits_per_weight=ps.bases if ps.bases else 32,
            act_bits=s.act_bits, bytes=int(sum(tensors[n].nbytes for n in names)),
        )
        if ps.bases:
            rec["bits_bytes"] = int(tensors[f"{li.path}/kernel_bits"].nbytes)
        recs.append(rec)
    return recs


def _check_quant_run(cfg: ml_collections.ConfigDict, where: str) -> None:
    if cfg.method == "fp":
        raise ExportError(
            f"{where} is an FP checkpoint (method=fp): nothing is binarized; export a BinaryDM or baseline run"
        )


def export_params(cfg: ml_collections.ConfigDict, params: Any, masks: Any, out_dir: str, *, source: dict | None = None,
                  word_bits: int = 32, overwrite: bool = False) -> dict:
    """Write the packed checkpoint of a student (`params`, `masks` as in the TrainState) to `out_dir`.

    Returns the manifest. Nothing is written unless everything checks out; `out_dir` appears complete
    or not at all (tmp dir + rename). An existing `out_dir` is replaced only with `overwrite=True`.
    """
    where = (source or {}).get("checkpoint", "checkpoint")
    cfg = validate(cfg)
    _check_quant_run(cfg, where)
    pack.word_dtype(word_bits)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ExportError(f"--out={out_dir} already exists; choose another path or pass --overwrite")
    layers = rules.enumerate_layers(cfg.model)
    plan = rules.build_plan(cfg.model, cfg.quant, layers)
    student = UNet.from_config(cfg.model, plan)
    flat_params = _flat(params)
    want = {k: v for k, v in _abstract_params(student, cfg.model).items()}
    _match(flat_params, want, f"{where} params", "its config's BinaryDM model")
    bases = exported_bases(masks, plan, where)
    tensors = pack_params(params, bases, word_bits)
    pplan = packed_plan(plan, bases, word_bits)
    packed_model = UNet.from_config(cfg.model, pplan)
    _match(tensors, _abstract_params(packed_model, cfg.model), "packed arrays", "the packed model")

    manifest = dict(
        format=FORMAT, format_version=FORMAT_VERSION, weights_file=WEIGHTS_FILE, word_bits=word_bits,
        bit_layout=BIT_LAYOUT, source=source or {}, config=cfg.to_dict(),
        tensors={n: dict(dtype=str(a.dtype), shape=list(a.shape), bytes=int(a.nbytes))
                 for n, a in sorted(tensors.items())},
        layers=_layer_records(layers, plan, pplan, tensors),
        payload_bytes=int(sum(a.nbytes for a in tensors.values())),
    )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary directory
        wpath = os.path.join(tmp, WEIGHTS_FILE)
        _write_tensors(wpath, tensors, {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        manifest["weights_bytes"] = os.path.getsize(wpath)
        manifest["weights_sha256"] = _sha256(wpath)
        with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "x"))
        os.rename(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def export_workdir(workdir: str, out_dir: str, *, word_bits: int = 32, overwrite: bool = False) -> dict:
    """Export the EMA params of the newest checkpoint of a BinaryDM `workdir` (see export_params)."""
    from bdm_jax.sampling import load_for_sampling

    cfg, params, masks, step = load_for_sampling(workdir)
    where = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
    _check_quant_run(cfg, where)
    source = dict(workdir=os.path.abspath(workdir), step=int(step), params="ema_params", checkpoint=where)
    return export_params(cfg, params, masks, out_dir, source=source, word_bits=word_bits, overwrite=overwrite)


# --------------------------------------------------------------------------------------------------
# Loading and sampling
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PackedModel:
    """A loaded packed checkpoint: `model.apply({"params": params}, x, t)` runs the 1-bit UNet."""

    path: str
    cfg: ml_collections.ConfigDict
    plan: QuantPlan
    model: UNet
    params: Any  # device arrays; kernel_bits stay uint words
    manifest: dict

    def setup(self):
        """A trainer.Setup whose model is the packed one (for trainer.generate / make_sample_fn)."""
        from bdm_jax.trainer import Setup

        return dataclasses.replace(Setup.from_config(self.cfg), model=self.model, plan=self.plan)


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(mpath):
        raise ExportError(f"--packed={path} has no {MANIFEST_FILE}: not a packed checkpoint (python -m bdm_jax.export)")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except ValueError as e:
        raise ExportError(f"{mpath} is not valid JSON ({e}); re-export the checkpoint") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{mpath} has format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this bdm-jax reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    for key in ("config", "tensors", "layers", "word_bits", "weights_bytes", "weights_sha256"):
        if key not in manifest:
            raise ExportError(f"{mpath} lacks the field {key!r}; re-export the checkpoint")
    return manifest


def load_packed(path: str, config: ml_collections.ConfigDict | None = None) -> PackedModel:
    """Read and check a packed checkpoint; `config` (optional) must describe the same model."""
    path = os.path.abspath(path)
    manifest = read_manifest(path)
    wpath = os.path.join(path, manifest.get("weights_file", WEIGHTS_FILE))
    if not os.path.isfile(wpath):
        raise ExportError(f"--packed={path} has no {os.path.basename(wpath)}")
    size = os.path.getsize(wpath)
    if size != manifest["weights_bytes"]:
        raise ExportError(
            f"{wpath} has {size} bytes but its manifest says {manifest['weights_bytes']}: "
            "truncated or from another export"
        )
    if _sha256(wpath) != manifest["weights_sha256"]:
        raise ExportError(f"{wpath} does not match the sha256 in its manifest: corrupted or from another export")
    tensors, meta = _read_tensors(wpath)
    if meta.get("format") != FORMAT:
        raise ExportError(f"{wpath} is not a {FORMAT} weights file")
    listed = {n: jax.ShapeDtypeStruct(tuple(e["shape"]), np.dtype(e["dtype"])) for n, e in manifest["tensors"].items()}
    _match(tensors, listed, f"{wpath}", "its manifest")

    try:
        cfg = validate(ml_collections.ConfigDict(manifest["config"]))
    except ConfigError as e:
        raise ExportError(f"{path}/{MANIFEST_FILE}: config is not valid ({e})") from None
    if config is not None:
        want, have = architecture_dict(validate(config)), architecture_dict(cfg)
        for key, value in want.items():
            if have[key] != value:
                raise ExportError(
                    f"--packed={path} was exported from a model with model.{key}={have[key]!r} "
                    f"but the config says {value!r}"
                )
    plan = rules.build_plan(cfg.model, cfg.quant)
    trained = plan.as_dict()
    by_layer = {r["path"]: r for r in manifest["layers"]}
    bases = {}
    for p, s in trained.items():
        if s.bases == 0:
            continue
        r = by_layer.get(p)
        if r is None or not 1 <= int(r.get("bases", 0)) <= s.bases:
            got = None if r is None else r.get("bases")
            raise ExportError(
                f"{path}/{MANIFEST_FILE}: layer {p} has bases={got!r}; its config trains it with 1..{s.bases}"
            )
        bases[p] = int(r["bases"])
    for p, r in by_layer.items():
        if r.get("bases", 0) and p not in bases:
            raise ExportError(f"{path}/{MANIFEST_FILE}: layer {p} is packed but its config keeps it FP")
    pplan = packed_plan(plan, bases, int(manifest["word_bits"]))
    model = UNet.from_config(cfg.model, pplan)
    _match(tensors, _abstract_params(model, cfg.model), f"{wpath}", f"the model of its manifest config")
    params = jax.device_put(_unflat(tensors))
    return PackedModel(path, cfg, pplan, model, params, manifest)


def sample_packed(path: str, out_dir: str, *, num: int, batch_size: int, sampler: str = "ddim", steps: int = 100,
                  eta: float = 0.0, seed: int = 0, progress: bool = False,
                  guidance_scale: float | None = None) -> dict:
    """Like sampling.sample_workdir, from a packed checkpoint: grid PNG (first 64) + uint8 .npz."""
    from bdm_jax import images
    from bdm_jax.sampling import sampler_tag, with_sampler
    from bdm_jax.trainer import generate

    pm = load_packed(path)
    pm.cfg = with_sampler(pm.cfg, sampler, steps, eta, guidance_scale)
    imgs = generate(pm.setup(), pm.params, {}, num, batch_size, seed, progress=progress)
    os.makedirs(out_dir, exist_ok=True)
    step = pm.manifest.get("source", {}).get("step", 0)
    tag = f"packed_{sampler_tag(pm.cfg)}_seed{seed}_step{step}"
    grid, npz = os.path.join(out_dir, f"sample_{tag}.png"), os.path.join(out_dir, f"sample_{tag}.npz")
    images.save_grid(imgs[:64], grid)
    images.save_npz(imgs, npz)
    return {"grid": grid, "npz": npz, "images": imgs, "step": step, "config": pm.cfg}


def main(argv: list[str]) -> int:
    from absl import app, flags

    from bdm_jax.cli import run_main

    flags.DEFINE_string("workdir", None, "BinaryDM training workdir (newest checkpoint, EMA params).")
    flags.DEFINE_string("out", None, "Output directory of the packed checkpoint (default <workdir>/packed).")
    flags.DEFINE_enum("word_bits", "32", ["8", "32"], "Bits per packed word (uint8 or uint32).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
    flags.mark_flags_as_required(["workdir"])
    FLAGS = flags.FLAGS

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        out = FLAGS.out or os.path.join(FLAGS.workdir, "packed")
        m = export_workdir(FLAGS.workdir, out, word_bits=int(FLAGS.word_bits), overwrite=FLAGS.overwrite)
        n_bin = sum(1 for r in m["layers"] if r["bases"])
        print(f"wrote {out}: {m['weights_bytes']:,} bytes, {n_bin} binarized layers, step {m['source'].get('step')}")

    return run_main(_main)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
