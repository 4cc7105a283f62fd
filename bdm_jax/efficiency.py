"""Efficiency accounting (SPEC §9): model size (FP32, fake-quant, packed) and BOPs / FLOPs / OPs.

    python -m bdm_jax.efficiency --config=configs/ldm4_bedrooms.py --out=/tmp/ldm4_eff.json
    python -m bdm_jax.efficiency --config=configs/digits.py --packed=workdirs/digits/packed

Conventions (chosen to match the paper's table; docs/EFFICIENCY.md compares):
* MB = 2^20 bytes (the paper's 1045.4 MB for LDM-4 is 274,056,163 float32 params / 2^20).
* Costs are per UNet forward of one sample. A conv/dense layer costs ``MACs = output positions x fan-in x
  C_out``; FLOPs of FP layers are these MACs, as the paper counts (its FP LDM-4 96.0 G = our conv+dense MACs).
* ``BOPs = MACs x bases x act_bits`` per binarized layer, ``OPs = BOPs / 64 + FLOPs``.
* The two attention matmuls (q·k, softmax·v) have no weights; like the paper we leave them out of OPs and
  report them separately (``attention_macs``).
* Sizes: ``fp32`` = the FP model's params x 4 bytes; ``fake_quant`` = a training checkpoint's student
  params (latent FP kernels + scales + LSQ steps) x 4 bytes, what other binarization projects ship;
  ``packed`` = the payload bdm_jax.export writes (sign bits in words incl. padding + float32 scales, biases,
  LSQ steps, FP layers, norms); ``ideal_1bit`` = the paper's count (bits without word padding).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from bdm_jax import pack, rules
from bdm_jax.config import validate
from bdm_jax.layers import QAct, QConv, QDense, QuantPlan
from bdm_jax.unet import UNet

MB = 2**20
ACT_SETTINGS = (32, 8, 4)


@dataclasses.dataclass(frozen=True)
class LayerShape:
    path: str
    kind: str  # conv | dense | attention
    kernel: tuple[int, ...]  # () for attention
    macs: int  # per sample


def layer_shapes(model_cfg: Any) -> list[LayerShape]:
    """MACs of every conv/dense and attention matmul pair of one forward (batch 1), from an abstract trace."""
    # The explicit attention core runs the q/k/v quantizers (identities here), which is where the two
    # attention matmuls are seen; the fused core computes the same function without them.
    model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    model_cfg.attention_impl = "explicit"
    net = UNet.from_config(model_cfg)
    seen: dict[str, LayerShape] = {}
    queries: dict[str, tuple[int, int, int]] = {}

    def record(next_fn, args, kwargs, ctx):
        out = next_fn(*args, **kwargs)
        m = ctx.module
        if ctx.method_name != "__call__" or not isinstance(m, (QConv, QDense, QAct)):
            return out
        path = "/".join(m.path)
        x = args[0]
        if isinstance(m, QAct):
            p, name = path.rsplit("/", 1)
            if name == "q_quant":  # (B, T_q, heads, ch)
                queries[p] = x.shape[1:]
            elif name == "k_quant":  # q·k and weights·v: T_q*T_k*heads*ch each (T_k = T_q but in cross-attention)
                t_q, h, ch = queries[p]
                seen[p] = LayerShape(p, "attention", (), 2 * t_q * x.shape[1] * h * ch)
            return out
        kernel = (*m.kernel_size, x.shape[-1], m.features) if isinstance(m, QConv) else (x.shape[-1], m.features)
        positions = math.prod(out.shape[1:-1])
        seen[path] = LayerShape(path, "conv" if isinstance(m, QConv) else "dense", kernel,
                                positions * math.prod(kernel[:-1]) * kernel[-1])
        return out

    s, c = model_cfg.image_size, model_cfg.in_channels
    y = jnp.zeros((1,), jnp.int32) if model_cfg.num_classes else None
    with nn.intercept_methods(record):
        jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, s, s, c)), jnp.zeros((1,), jnp.int32), y)
    return list(seen.values())


def _param_bytes_by_layer(model: UNet, model_cfg: Any) -> dict[str, int]:
    s, c = model_cfg.image_size, model_cfg.in_channels
    y = jnp.zeros((1,), jnp.int32) if model_cfg.num_classes else None
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, c)), jnp.zeros((1,), jnp.int32), y)
    out: dict[str, int] = {}
    for key, leaf in traverse_util.flatten_dict(shapes["params"]).items():
        path = "/".join(key[:-1])
        out[path] = out.get(path, 0) + math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
    return out


def method_config(cfg: ml_collections.ConfigDict, act_bits: int) -> ml_collections.ConfigDict:
    """`cfg` as a quantized run (BinaryDM if it is FP) with `act_bits`."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    with c.unlocked():
        if c.method == "fp":
            c.method = "binarydm"
            c.quant.multi_basis = c.quant.lrm = c.quant.progressive = None  # take the binarydm preset
        c.quant.act_bits = act_bits
    return validate(c)


def _setting_bytes(plan: QuantPlan, bases: dict[str, int], shapes: dict[str, LayerShape], fp_bytes: dict[str, int],
                   word_bits: int) -> tuple[dict[str, int], dict[str, int]]:
    """Per-layer bytes of the fake-quant student and of the packed model, from the layers' param lists.

    Binarized layer: fake-quant adds `scales` (trained bases x C_out) and an LSQ `act_step` to kernel + bias;
    packed replaces the kernel by its words and keeps the exported bases' scales. Attention rows carry the
    act_steps of their quantized q/k/v/softmax. tests/test_efficiency.py checks the totals against
    jax.eval_shape of both models and against the bytes the exporter writes.
    """
    fq, pk = dict(fp_bytes), dict(fp_bytes)
    for path, li in shapes.items():
        spec = plan.get(path)
        if li.kind == "attention":
            quantizers = ("q_quant", "k_quant", "v_quant", "attn_quant")
            steps = 4 * sum(plan.get(f"{path}/{n}").act_bits < 32 for n in quantizers)
            fq[path] = pk[path] = steps
        elif spec.bases:
            step = 4 if spec.act_bits < 32 else 0
            c_out, k = li.kernel[-1], bases[path]
            fq[path] = fp_bytes[path] + 4 * spec.bases * c_out + step
            pk[path] = fp_bytes[path] - 4 * math.prod(li.kernel) + pack.packed_nbytes(li.kernel, k, word_bits) \
                + 4 * k * c_out + step
    return fq, pk


def setting_report(cfg: ml_collections.ConfigDict, shapes: list[LayerShape], fp_bytes: dict[str, int], *,
                   act_bits: int, pure_w1: bool, word_bits: int = 32, layers: list | None = None) -> dict:
    """Sizes and OPs of one setting (BinaryDM with `act_bits`; pure_w1 exports one basis per layer)."""
    c = method_config(cfg, act_bits)
    plan = rules.build_plan(c.model, c.quant, layers)
    bases = {p: (1 if pure_w1 else s.bases) for p, s in plan.as_dict().items() if s.bases}
    by_path = {li.path: li for li in shapes}
    fq_bytes, pk_bytes = _setting_bytes(plan, bases, by_path, fp_bytes, word_bits)
    rows, bops, flops, attn_macs, attn_ops, ideal = [], 0, 0, 0, 0.0, 0
    for path in sorted(set(fp_bytes) | set(by_path)):
        li = by_path.get(path)
        spec = plan.get(path)
        k = bases.get(path, 0)
        row = dict(path=path, kind=li.kind if li else "norm/embed", kernel=list(li.kernel) if li else [],
                   w_bits=k if k else 32, a_bits=spec.act_bits if k else 32, macs=li.macs if li else 0,
                   fp32_bytes=fp_bytes.get(path, 0), fake_quant_bytes=fq_bytes.get(path, 0),
                   packed_bytes=pk_bytes.get(path, 0), bops=0, flops=0)
        if li and li.kind == "attention":
            attn_macs += li.macs
            row["a_bits"] = plan.get(path + "/q_quant").act_bits
            # not in OPs (paper convention); ops_with_attention counts them as a_bits x a_bits BOPs or FLOPs
            attn_ops += li.macs * row["a_bits"] ** 2 / 64 if row["a_bits"] < 32 else li.macs
        elif k:
            row["bops"] = li.macs * k * spec.act_bits
            # the paper's size count: 1 bit per weight and basis, float32 for everything else
            n_w = math.prod(li.kernel)
            row["ideal_bytes"] = k * n_w / 8 + (pk_bytes[path] - pack.packed_nbytes(li.kernel, k, word_bits))
        elif li:
            row["flops"] = li.macs
        row.setdefault("ideal_bytes", row["packed_bytes"])
        bops += row["bops"]
        flops += row["flops"]
        ideal += row["ideal_bytes"]
        rows.append(row)
    n_bin = sum(math.prod(by_path[p].kernel) for p in bases)
    kmax = max(bases.values(), default=1)
    wname = "W1" if kmax == 1 else ("W1.1" if kmax == 2 else f"W1.1(k={kmax})")  # paper: W1.1 = LMB, 2 bases
    return dict(
        name=f"BinaryDM {wname}A{act_bits}", w_bits=wname,
        a_bits=act_bits, binarized_layers=len(bases), binarized_weights=n_bin,
        multi_basis_weights=sum(math.prod(by_path[p].kernel) for p, k in bases.items() if k > 1),
        fp32_bytes=sum(fp_bytes.values()), fake_quant_bytes=sum(fq_bytes.values()), packed_bytes=sum(pk_bytes.values()),
        ideal_bytes=ideal, bops=bops, flops=flops, ops=bops / 64 + flops, attention_macs=attn_macs,
        ops_with_attention=bops / 64 + flops + attn_ops, layers=rows,
    )


def efficiency_report(cfg: ml_collections.ConfigDict, word_bits: int = 32) -> dict:
    """FP row plus BinaryDM W1.x (multi-basis as configured) and pure W1 rows for A32/A8/A4 (SPEC §9)."""
    cfg = validate(cfg)
    shapes = layer_shapes(cfg.model)
    fp_bytes = _param_bytes_by_layer(UNet.from_config(cfg.model), cfg.model)
    macs = sum(li.macs for li in shapes if li.kind != "attention")
    attn = sum(li.macs for li in shapes if li.kind == "attention")
    total = sum(fp_bytes.values())
    fp = dict(name="FP", w_bits="32", a_bits=32, fp32_bytes=total, fake_quant_bytes=total, packed_bytes=total,
              ideal_bytes=total, bops=0, flops=macs, ops=macs, attention_macs=attn, ops_with_attention=macs + attn,
              params=total // 4)
    settings = [fp]
    q = method_config(cfg, 32).quant
    multi = q.multi_basis and q.num_bases > 1
    layers = rules.enumerate_layers(cfg.model)
    for pure in ((False, True) if multi else (True,)):
        for a in ACT_SETTINGS:
            settings.append(setting_report(cfg, shapes, fp_bytes, act_bits=a, pure_w1=pure, word_bits=word_bits,
                                           layers=layers))
    return dict(model=dict(cfg.model.to_dict()), word_bits=word_bits, mb=MB, settings=settings)


def format_table(report: dict) -> str:
    """The summary table (one row per setting); sizes in MB = 2^20 bytes, operations in G."""
    head = ("setting", "FP32 MB", "fake-quant MB", "packed MB", "1-bit ideal MB", "BOPs G", "FLOPs G", "OPs G",
            "size x", "OPs x", "OPs+attn G")
    rows = [head]
    fp = report["settings"][0]
    for s in report["settings"]:
        rows.append((
            s["name"], f"{s['fp32_bytes'] / MB:.1f}", f"{s['fake_quant_bytes'] / MB:.1f}",
            f"{s['packed_bytes'] / MB:.2f}", f"{s['ideal_bytes'] / MB:.2f}",
            f"{s['bops'] / 1e9:.4g}", f"{s['flops'] / 1e9:.4g}", f"{s['ops'] / 1e9:.4g}",
            f"{fp['fp32_bytes'] / s['packed_bytes']:.1f}", f"{fp['ops'] / s['ops']:.1f}",
            f"{s['ops_with_attention'] / 1e9:.4g}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"MB = 2^20 bytes; per forward of one sample; attention matmuls "
                 f"({fp['attention_macs'] / 1e9:.2f} GMACs) are not in OPs (paper convention), OPs+attn counts them "
                 "(a x a BOPs when quantized)")
    return "\n".join(lines)


def format_layers(setting: dict) -> str:
    rows = [("layer", "kernel", "W", "A", "MMACs", "FP32 KB", "packed KB", "BOPs M", "FLOPs M")]
    for r in setting["layers"]:
        rows.append((r["path"], "x".join(map(str, r["kernel"])) or "-", str(r["w_bits"]), str(r["a_bits"]),
                     f"{r['macs'] / 1e6:.2f}", f"{r['fp32_bytes'] / 1024:.1f}", f"{r['packed_bytes'] / 1024:.1f}",
                     f"{r['bops'] / 1e6:.1f}", f"{r['flops'] / 1e6:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: list[str]) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    from bdm_jax.checkpoint import write_json
    from bdm_jax.cli import run_main

    config = config_flags.DEFINE_config_file("config", None, "Model config (configs/*.py).", lock_config=True)
    out = flags.DEFINE_string("out", None, "Write the report as JSON here.")
    word_bits = flags.DEFINE_enum("word_bits", "32", ["8", "32"], "Packed word width.")
    per_layer = flags.DEFINE_string("per_layer", None, "Also print the per-layer table of this setting name "
                                    "(e.g. 'BinaryDM W1A4').")
    packed = flags.DEFINE_string("packed", None, "A packed checkpoint of this config: report its real file size.")
    flags.mark_flags_as_required(["config"])

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        report = efficiency_report(config.value, int(word_bits.value))
        print(format_table(report))
        if packed.value:
            from bdm_jax.export import read_manifest

            m = read_manifest(packed.value)
            size = os.path.getsize(os.path.join(packed.value, m["weights_file"]))
            report["packed_file"] = dict(path=os.path.abspath(packed.value), bytes=size,
                                         payload_bytes=m["payload_bytes"])
            print(f"packed checkpoint {packed.value}: {size:,} bytes on disk ({size / MB:.3f} MB), "
                  f"payload {m['payload_bytes']:,} bytes, header {size - m['payload_bytes']:,} bytes")
        if per_layer.value:
            names = [s["name"] for s in report["settings"][1:]]
            if per_layer.value not in names:
                raise ValueError(f"--per_layer={per_layer.value!r} is not one of {names}")
            print(format_layers(next(s for s in report["settings"] if s["name"] == per_layer.value)))
        if out.value:
            os.makedirs(os.path.dirname(os.path.abspath(out.value)), exist_ok=True)
            write_json(out.value, report)
            print(f"wrote {out.value}")

    return run_main(_main)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
