"""Progressive binarization and EBB masks as a pure function of the step (SPEC §2 EBB, §6).

Each binarized module has a `masks/binarize` scalar (and multi-basis ones `masks/extra_bases`). A
module's ring is its block's distance from the middle block (grouping "block") or the rank of its
block's resolution counted from the middle (grouping "level": middle, then the lowest resolution, ...).
At step s a module is binarized iff ring * interval <= s. Rings are static Python ints; only the
comparison with the traced step happens in the jitted step, so the schedule never recompiles.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from bdm_jax.rules import block_of
from bdm_jax.unet import block_infos


def block_rings(model_cfg: Any, grouping: str) -> dict[str, int]:
    """Ring of every block name (SPEC §6): 0 for the middle block, growing outward."""
    blocks = block_infos(model_cfg)
    mid = len(blocks) // 2
    if grouping == "block":
        return {b.name: abs(b.index - mid) for b in blocks}
    if grouping == "level":
        lowest = blocks[mid].resolution
        return {
            b.name: 0 if b.index == mid else 1 + int(round(math.log2(b.resolution / lowest)))
            for b in blocks
        }
    raise ValueError(f"quant.progressive_grouping={grouping!r} is not one of block, level")


def mask_rings(mask_template: Mapping[str, Any], model_cfg: Any, grouping: str) -> dict[tuple[str, ...], int]:
    """Ring of every `binarize` leaf of a masks tree; modules outside blocks go last."""
    rings = block_rings(model_cfg, grouping)
    last = max(rings.values()) + 1
    out = {}
    for key in traverse_util.flatten_dict(dict(mask_template)):
        if key[-1] == "binarize":
            block = block_of("/".join(key[:-1]))
            out[key] = rings[block] if block in rings else last
    return out


def progressive_masks(
    step: jax.Array,
    mask_template: Mapping[str, Any],
    rings: Mapping[tuple[str, ...], int] | None,
    interval: int,
    ebb_transition_step: int = -1,
) -> dict[str, Any]:
    """Masks tree for `step`. rings=None: progressive off, everything binarized from step 0."""
    flat = traverse_util.flatten_dict(dict(mask_template))
    out = {}
    for key in flat:
        if key[-1] == "binarize":
            ring = 0 if rings is None else rings[key]
            out[key] = (step >= ring * interval).astype(jnp.float32)
        elif key[-1] == "extra_bases":
            keep = jnp.ones((), jnp.float32) if ebb_transition_step < 0 else (step < ebb_transition_step)
            out[key] = jnp.asarray(keep, jnp.float32)
        else:
            raise KeyError(f"unknown mask variable {'/'.join(key)}")
    return traverse_util.unflatten_dict(out)


def schedule_order(rings: Mapping[tuple[str, ...], int]) -> list[list[str]]:
    """Module paths grouped by the step index at which they switch on (for docs and tests)."""
    by_ring: dict[int, list[str]] = {}
    for key, ring in rings.items():
        by_ring.setdefault(ring, []).append("/".join(key[:-1]))
    return [sorted(by_ring[r]) for r in sorted(by_ring)]
