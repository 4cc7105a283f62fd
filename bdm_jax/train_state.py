"""The TrainState: everything one (FP or QAT) update step needs, and so a complete resume point."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any  # the model being trained (FP params, or the student's latent weights + scales + LSQ steps)
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpoints as a plain array)
    masks: Any = struct.field(default_factory=dict)  # progressive/EBB masks used at the last step (SPEC §6)
    teacher_params: Any = struct.field(default_factory=dict)  # frozen FP teacher (QAT only)
    lrm_proj: Any = struct.field(default_factory=dict)  # per-block C x r PCA bases, fixed (SPEC §5)


def make_optimizer(train_cfg: Any) -> optax.GradientTransformation:
    """AdamW with linear warmup to a constant lr (SPEC §7: no decay schedule), global-norm clipping."""
    lr = optax.linear_schedule(0.0, train_cfg.lr, max(train_cfg.warmup_steps, 1))
    parts = []
    if train_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
    parts.append(optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=train_cfg.weight_decay))
    return optax.chain(*parts)


def lr_at(train_cfg: Any, step: jax.Array) -> jax.Array:
    return optax.linear_schedule(0.0, train_cfg.lr, max(train_cfg.warmup_steps, 1))(step)
