"""Config rules → per-layer quantization plan (SPEC §3), and the table that shows it.

The plan is decided once from the model config and `config.quant`; the UNet never branches on names.
Default (SPEC §3): time-embedding MLP, conv_in, conv_out (and a class embedding: label_emb or the
ClassEmbedder's class_embedder, tables that are never quantizable layers) stay FP; every layer of a block
whose resolution is >= head_tail_min_ratio x the input gets `num_bases` bases; every other conv/dense
(attention qkv/proj, embedding dense, skip, up/down convs or up/down ResBlocks, and a SpatialTransformer's
proj_in/proj_out, to_q/to_k/to_v/to_out of both attentions, GEGLU ff) one basis. Activation bits apply
to the inputs of every binarized layer and, with quantize_attention, to the attention operands.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bdm_jax.layers import FP, LayerSpec, QuantPlan
from bdm_jax.unet import UNet, block_infos


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    path: str  # module path, "/"-joined
    kind: str  # conv | dense | act
    shape: tuple[int, ...]  # kernel shape (act: ())
    block: str | None  # block name (SPEC §3) or None for layers outside blocks
    block_index: int  # -1 outside blocks
    resolution: int  # -1 outside blocks


def block_of(path: str) -> str | None:
    """Block name of a module path: conv_in is block input_blocks_0; time embedding / conv_out are in none."""
    head = path.split("/", 1)[0]
    if head == "conv_in":
        return "input_blocks_0"
    if head.startswith(("input_blocks_", "output_blocks_")) or head == "middle_block":
        return head
    return None


def enumerate_layers(model_cfg: Any) -> list[LayerInfo]:
    """Every quantizable layer of the UNet, found from an abstract init with a probe plan (no FLOPs)."""
    net = UNet.from_config(model_cfg, plan=QuantPlan(probe=True))
    s, c = model_cfg.image_size, model_cfg.in_channels
    y = jnp.zeros((1,), jnp.int32) if model_cfg.num_classes else None
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, s, s, c)), jnp.zeros((1,), jnp.int32), y)
    flat = traverse_util.flatten_dict(shapes["params"])
    blocks = {b.name: b for b in block_infos(model_cfg)}
    layers: dict[str, LayerInfo] = {}
    for key, leaf in flat.items():
        if key[-1] not in ("kernel", "act_step"):
            continue
        path = "/".join(key[:-1])
        if path in layers and key[-1] == "act_step":
            continue
        if key[-1] == "kernel":
            kind = "conv" if len(leaf.shape) == 4 else "dense"
            shape = tuple(leaf.shape)
        else:
            kind, shape = "act", ()
        name = block_of(path)
        b = blocks.get(name) if name else None
        layers[path] = LayerInfo(path, kind, shape, name, b.index if b else -1, b.resolution if b else -1)
    order = lambda li: (li.block_index if li.block_index >= 0 else (10**6 if "out" in li.path else -1), li.path)  # noqa: E731
    return sorted(layers.values(), key=order)


def _parse_rule(rule: str) -> tuple[re.Pattern, int]:
    if "=" not in rule:
        raise ValueError(f"quant.rules entry {rule!r} must look like 'regex=fp', 'regex=1' or 'regex=2'")
    pattern, treatment = rule.rsplit("=", 1)
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"quant.rules entry {rule!r}: bad regex ({e})") from None
    if treatment == "fp":
        return regex, 0
    if treatment.isdigit() and int(treatment) >= 1:
        return regex, int(treatment)
    raise ValueError(f"quant.rules entry {rule!r}: treatment {treatment!r} must be 'fp' or a number of bases >= 1")


def build_plan(model_cfg: Any, quant_cfg: Any, layers: list[LayerInfo] | None = None) -> QuantPlan:
    """Decide FP / one basis / k bases and activation bits for every layer (SPEC §3, §4).

    quant_cfg must be resolved (bdm_jax.config.resolve_method) so that no switch is None.
    """
    layers = layers if layers is not None else enumerate_layers(model_cfg)
    blocks = block_infos(model_cfg)
    n_blocks = len(blocks)
    fp_re = re.compile(quant_cfg.fp_layers) if quant_cfg.fp_layers else None
    min_res = model_cfg.image_size * quant_cfg.head_tail_min_ratio

    def multi(li: LayerInfo) -> bool:
        if not quant_cfg.multi_basis or li.block_index < 0:
            return False
        if quant_cfg.head_tail_blocks < 0:
            return li.resolution >= min_res
        n = quant_cfg.head_tail_blocks
        return li.block_index < n or li.block_index >= n_blocks - n

    bases: dict[str, int] = {}
    for li in layers:
        if li.kind == "act":
            continue
        if fp_re is not None and fp_re.search(li.path):
            bases[li.path] = 0
        else:
            bases[li.path] = quant_cfg.num_bases if multi(li) else 1
    for rule in quant_cfg.rules:
        regex, k = _parse_rule(rule)
        hit = [p for p in bases if regex.search(p)]
        if not hit:
            raise ValueError(f"quant.rules entry {rule!r} matches no layer of the model")
        for p in hit:
            bases[p] = k

    act_bits = quant_cfg.act_bits
    plan: dict[str, LayerSpec] = {}
    for li in layers:
        if li.kind == "act":
            if act_bits < 32 and quant_cfg.quantize_attention:
                plan[li.path] = LayerSpec(bases=0, act_bits=act_bits)
            continue
        k = bases[li.path]
        if k > 0:
            plan[li.path] = LayerSpec(bases=k, act_bits=act_bits)
    return QuantPlan(tuple(sorted(plan.items())), act_scale=quant_cfg.get("act_scale", "learned"))


def plan_table(layers: list[LayerInfo], plan: QuantPlan) -> str:
    """A printable table: layer, shape, block, resolution, treatment, weight bits, act bits."""
    rows = [("layer", "shape", "block", "res", "treatment", "W bits", "A bits")]
    for li in layers:
        spec = plan.get(li.path)
        if li.kind == "act":
            if spec.act_bits >= 32:
                continue
            rows.append((li.path, "-", li.block or "-", str(li.resolution), "act quant", "-", str(spec.act_bits)))
            continue
        if spec.bases == 0:
            treat, wbits = "FP", "32"
        else:
            treat, wbits = ("1 basis" if spec.bases == 1 else f"{spec.bases} bases"), str(spec.bases)
        rows.append((li.path, "x".join(map(str, li.shape)), li.block or "-", str(li.resolution), treat, wbits,
                     str(spec.act_bits)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = {}
    for li in layers:
        if li.kind != "act":
            key = plan.get(li.path).bases
            counts[key] = counts.get(key, 0) + int(np.prod(li.shape))
    total = sum(counts.values())
    summary = ", ".join(
        f"{'FP' if k == 0 else f'{k}-basis'}: {v:,} weights ({100 * v / total:.1f}%)" for k, v in sorted(counts.items())
    )
    return "\n".join(lines + ["", summary])


def fp_layer_paths(layers: list[LayerInfo], plan: QuantPlan) -> list[str]:
    return [li.path for li in layers if li.kind != "act" and plan.get(li.path) == FP]
