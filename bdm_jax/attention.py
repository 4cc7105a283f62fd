"""Multi-head attention core shared by the UNet's attention layers (SPEC §4: quantized attention operands).

`multihead_attention` takes q, k, v as (batch, tokens, heads, head_dim) and returns the same layout.
When the layer's plan quantizes the attention operands (q, k, v and the softmax output, each an LSQ
`QAct`), the probabilities must exist as a tensor, so the core is the explicit einsum-softmax-einsum.
When nothing inside is quantized (the FP model, the teacher, W1A32 students), the core is
`jax.nn.dot_product_attention`, which on GPU can run cuDNN's fused flash attention: the
(batch, heads, tokens, tokens) logits never reach device memory (issue 9).

When the softmax output is quantized, `bdm_jax.flash_lsq` (a Pallas kernel) computes the same core
without the tensor either: it quantizes each tile of probabilities on chip (issue 9, change 2).

`impl` (config `model.attention_impl`):
* "explicit": always the einsum path (the reference the fused paths are tested against);
* "xla": jax.nn.dot_product_attention's XLA implementation when unquantized; quantized: explicit;
* "cudnn": its cuDNN implementation when unquantized (GPU, bf16/fp16 only); quantized: explicit;
* "pallas": the flash_lsq kernel for every attention it can tile, quantized or not (interpreted off GPU:
  slow, for tests);
* "auto": unquantized: cudnn where it applies (GPU backend, bf16/fp16, head_dim <= 128 and a multiple of 8),
  else xla; quantized: the flash_lsq kernel where it applies (one GPU, bf16/fp16, tiles fit), else explicit.
The kernel path is never taken while calibrating (`calib` mutable: the explicit quantizer records mean|P|)
nor with `quant.act_scale='dynamic'` (its step comes from the explicit tensor's mean).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdm_jax import flash_lsq
from bdm_jax.layers import LSQStep, QAct, QuantPlan

IMPLS = ("auto", "explicit", "xla", "cudnn", "pallas")
_QUANT_NAMES = ("q_quant", "k_quant", "v_quant", "attn_quant")


def operands_quantized(module: nn.Module, plan: QuantPlan | None) -> bool:
    """True when any attention operand of `module` is LSQ-quantized by the plan (probe plans included)."""
    if plan is None:
        return False
    base = "/".join(module.path)
    return any(plan.get(f"{base}/{n}").act_bits < 32 for n in _QUANT_NAMES)


def resolve_impl(impl: str, dtype: Any, head_dim: int) -> str:
    """The concrete implementation for an unquantized attention: "explicit", "xla" or "cudnn"."""
    if impl not in IMPLS:
        raise ValueError(f"model.attention_impl={impl!r}: allowed {IMPLS}")
    fused_ok = (
        jax.default_backend() == "gpu"
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim <= 128
        and head_dim % 8 == 0
    )
    if impl == "cudnn" and not fused_ok:  # say why here, not in a cuDNN error from inside the compiler
        raise ValueError(f"model.attention_impl='cudnn' needs a GPU, model.dtype bfloat16/float16 and a head size "
                         f"<= 128 divisible by 8 (have {jax.default_backend()}, {jnp.dtype(dtype).name}, "
                         f"{head_dim}); use 'auto'")
    if impl != "auto":
        return impl
    return "cudnn" if fused_ok else "xla"


def _use_kernel(module: nn.Module, plan: QuantPlan | None, impl: str, dtype: Any, q_shape, k_shape) -> bool:
    """Whether the softmax-and-values core runs the flash_lsq kernel (module doc)."""
    if impl not in ("auto", "pallas") or module.is_mutable_collection("calib"):
        return False
    if plan is not None and plan.act_scale == "dynamic" and operands_quantized(module, plan):
        return False
    fits = not flash_lsq.supported(q_shape, k_shape, flash_lsq.KernelConfig(bits=None))
    if impl == "pallas":
        return fits
    # "auto" gets here only with quantized operands (unquantized attention went to dot_product_attention).
    # One device only: under a sharded jit XLA cannot split the kernel's custom call over the batch (it
    # would gather and compute it whole on every device); not yet wrapped in shard_map, so several devices
    # keep the explicit core.
    on_gpu = jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return on_gpu and fits and jax.device_count() == 1


def multihead_attention(
    module: nn.Module, q: jax.Array, k: jax.Array, v: jax.Array, plan: QuantPlan | None, dtype: Any,
    impl: str = "auto",
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over (B, T, H, D) operands, with the layer's LSQ quantizers (SPEC §4).

    Must be called inside `module`'s compact `__call__`: the quantizers are its submodules
    `q_quant`, `k_quant`, `v_quant`, `attn_quant` (the names the rules and the converters use).
    """
    if impl not in ("explicit", "pallas") and not operands_quantized(module, plan):
        chosen = resolve_impl(impl, dtype, q.shape[-1])
        if chosen != "explicit":
            q, k, v = (a.astype(dtype) for a in (q, k, v))
            return jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), implementation=chosen)
    q = QAct(plan, name="q_quant")(q)
    k = QAct(plan, name="k_quant")(k)
    v = QAct(plan, name="v_quant")(v)
    if _use_kernel(module, plan, impl, dtype, q.shape, k.shape):
        bits, step, on = LSQStep(plan, name="attn_quant")()
        q, k, v = (a.astype(dtype) for a in (q, k, v))
        return flash_lsq.lsq_flash_attention(q, k, v, step, on, bits=None if bits >= 32 else bits)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    weights = QAct(plan, name="attn_quant")(weights)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
