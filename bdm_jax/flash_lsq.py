"""Fused attention with LSQ-quantized softmax probabilities: a Pallas kernel (SPEC §4; issue 9).

`lsq_flash_attention(q, k, v, step, on, bits=...)` computes what the explicit attention core of
`bdm_jax.attention` computes for an `attn_quant` LSQ quantizer,

    P  = softmax(q k^T / sqrt(d))                       rounded to q's dtype, as the explicit core does
    P' = round_ste(clip(P / step, Qn, Qp)) * step       if on > 0 (the layer's progressive mask), else P
    out = P' v

without writing the (batch, heads, T, S) logits or probabilities to device memory: at the LDM-4 32x32
attention levels those are 0.9-1.9 GB per layer and pass, and the explicit core's ~16 passes over them
were most of the W1A8 QAT step (docs/PERF_NOTES.md, change 2).

Quantizing P needs its normalised value, so the forward makes two sweeps over the keys per query block
(row max and sum first, then P' v). The backward follows the LSQ gradients of `bdm_jax.quant.lsq_quantize`:
dP = dP' * 1[Qn <= P/step <= Qp] (straight-through inside the range), d step = g * sum(dP' * (round(v) - v)
inside, Qn/Qp outside) with g = 1 / sqrt(numel(P) * Qp), and the softmax backward dS = P (dP - rowsum(P dP)).
rowsum(P dP) is not dO . out here (out uses P', and dP is masked), so a first backward kernel computes it,
together with the step gradient's row sums; a second computes dK, dV (per key block) and dQ (per query
block). `bits=None` is plain flash attention (no quantizer).

On GPU the kernels lower through Pallas' Triton backend; elsewhere `interpret=True` runs the same kernel
code as XLA ops (how the tests check it against the explicit core on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from bdm_jax.quant import _lsq_range

Array = jax.Array
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel choices: quantizer bits (None = off), tile sizes, Triton launch parameters."""

    bits: int | None
    block_q: int = 64  # query rows per forward program
    block_k: int = 64  # keys per inner step (forward); the backward uses block_b for both
    block_b: int = 64
    num_warps: int = 4
    num_stages: int = 2
    interpret: bool = False


def supported(q_shape: tuple[int, ...], k_shape: tuple[int, ...], cfg: KernelConfig) -> str:
    """'' when the kernel applies to (B, T, H, D) q and (B, S, H, D) k; else why not (for an error or a fallback)."""
    (_, t, _, d), s = q_shape, k_shape[1]
    if d < 16 or d & (d - 1):
        return f"head size {d} is not a power of two >= 16"
    for name, n, blk in (("query tokens", t, min(cfg.block_q, t)), ("key tokens", s, min(cfg.block_k, s)),
                         ("query tokens", t, min(cfg.block_b, t)), ("key tokens", s, min(cfg.block_b, s))):
        if blk < 16 or blk & (blk - 1) or n % blk:
            return f"{name} {n} is not a multiple of a power-of-two tile >= 16"
    if t // min(cfg.block_b, t) != s // min(cfg.block_b, s):
        return f"query tokens {t} != key tokens {s} (the backward kernel pairs query and key tiles)"
    return ""


def _dot(a: Array, b: Array) -> Array:
    """a @ b of two tiles with a float32 result (tensor cores on GPU for bf16 tiles)."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _round_half_even(x: Array) -> Array:
    """jnp.round (ties to even) from floor: Triton has no round-to-nearest-even op."""
    f = jnp.floor(x)
    frac = x - f
    odd = f - 2.0 * jnp.floor(0.5 * f)  # 1 where f is odd
    return jnp.where(frac > 0.5, f + 1.0, jnp.where(frac < 0.5, f, f + odd))


def _probs(q: Array, k: Array, m: Array, l: Array, scale: float) -> Array:
    """float32 softmax probabilities of one (query tile, key tile) from the rows' max m and sum l."""
    s = _dot(q, k.T) * scale
    return jnp.exp(s - m[:, None]) / l[:, None]


def _quantized(p: Array, dtype, step: Array, on: Array, bits: int | None) -> Array:
    """P' of a tile: P rounded to `dtype` (the explicit core's cast), then LSQ where `on` (float32)."""
    p = p.astype(dtype).astype(F32)
    if bits is None:
        return p
    qn, qp = _lsq_range(bits)
    pq = _round_half_even(jnp.clip(p / step, qn, qp)) * step
    return jnp.where(on > 0, pq.astype(dtype).astype(F32), p)


def _quant_grads(p: Array, dpq: Array, dtype, step: Array, on: Array, bits: int | None) -> tuple[Array, Array]:
    """(dP, step-gradient terms dP' * d P'/d step) of a tile, given dP' (float32)."""
    if bits is None:
        return dpq, jnp.zeros_like(dpq)
    qn, qp = _lsq_range(bits)
    v = p.astype(dtype).astype(F32) / step
    inside = (v >= qn) & (v <= qp)
    vc = jnp.clip(v, qn, qp)
    on_ = on > 0
    dp = jnp.where(on_ & ~inside, 0.0, dpq)
    term = jnp.where(on_, _round_half_even(vc) - jnp.where(inside, vc, 0.0), 0.0)
    return dp, dpq * term


def _fwd_kernel(qp_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, scale: float, cfg: KernelConfig):
    q = q_ref[...]
    bq, bk = q.shape[0], min(cfg.block_k, k_ref.shape[0])
    n_k = k_ref.shape[0] // bk

    def stats(j, carry):  # online max / sum of exp over the key tiles
        m, l = carry
        s = _dot(q, k_ref[pl.ds(j * bk, bk), :].T) * scale
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        return m_new, l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(s - m_new[:, None]), axis=1)

    m, l = lax.fori_loop(0, n_k, stats, (jnp.full((bq,), -jnp.inf, F32), jnp.zeros((bq,), F32)))
    step, on = qp_ref[0], qp_ref[1]

    def accumulate(j, o):
        sl = pl.ds(j * bk, bk)
        v = v_ref[sl, :]
        p = _quantized(_probs(q, k_ref[sl, :], m, l, scale), v.dtype, step, on, cfg.bits)
        return o + _dot(p.astype(v.dtype), v)

    o = lax.fori_loop(0, n_k, accumulate, jnp.zeros((bq, v_ref.shape[1]), F32))
    o_ref[...] = o.astype(o_ref.dtype)
    m_ref[...] = m
    l_ref[...] = l


def _bwd_rows_kernel(qp_ref, q_ref, k_ref, v_ref, do_ref, m_ref, l_ref, d_ref, sg_ref, *, scale: float,
                     cfg: KernelConfig):
    """Per query row: D = sum_j P dP (softmax backward) and sum_j of the step-gradient terms."""
    q, do, m, l = q_ref[...], do_ref[...], m_ref[...], l_ref[...]
    bq, bk = q.shape[0], min(cfg.block_b, k_ref.shape[0])
    step, on = qp_ref[0], qp_ref[1]

    def body(j, carry):
        dsum, sg = carry
        sl = pl.ds(j * bk, bk)
        v = v_ref[sl, :]
        p = _probs(q, k_ref[sl, :], m, l, scale)
        dp, terms = _quant_grads(p, _dot(do, v.T), v.dtype, step, on, cfg.bits)
        return dsum + jnp.sum(p * dp, axis=1), sg + jnp.sum(terms, axis=1)

    zeros = jnp.zeros((bq,), F32)
    dsum, sg = lax.fori_loop(0, k_ref.shape[0] // bk, body, (zeros, zeros))
    d_ref[...] = dsum
    sg_ref[...] = sg


def _bwd_kernel(qp_ref, q_ref, k_ref, v_ref, do_ref, m_ref, l_ref, d_ref, dq_ref, dk_ref, dv_ref, *,
                scale: float, cfg: KernelConfig):
    """dK, dV of key tile i (loop over query tiles), then dQ of query tile i (loop over key tiles)."""
    i = pl.program_id(2)
    t, s = q_ref.shape[0], k_ref.shape[0]
    bq, bk = t // (s // min(cfg.block_b, s)), min(cfg.block_b, s)
    step, on = qp_ref[0], qp_ref[1]
    dtype = v_ref.dtype

    def grads(q, k, v, do, m, l, dd):  # (P', dS) of one tile pair
        p = _probs(q, k, m, l, scale)
        dp, _ = _quant_grads(p, _dot(do, v.T), dtype, step, on, cfg.bits)
        return _quantized(p, dtype, step, on, cfg.bits), p * (dp - dd[:, None]) * scale

    k_sl = pl.ds(i * bk, bk)
    k, v = k_ref[k_sl, :], v_ref[k_sl, :]

    def kv_body(j, carry):
        dk, dv = carry
        sl = pl.ds(j * bq, bq)
        q, do = q_ref[sl, :], do_ref[sl, :]
        pu, ds = grads(q, k, v, do, m_ref[sl], l_ref[sl], d_ref[sl])
        dv = dv + _dot(pu.astype(dtype).T, do)
        return dk + _dot(ds.astype(q.dtype).T, q), dv

    zeros = jnp.zeros((bk, k_ref.shape[1]), F32)
    dk, dv = lax.fori_loop(0, t // bq, kv_body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)

    q_sl = pl.ds(i * bq, bq)
    q, do, m, l, dd = q_ref[q_sl, :], do_ref[q_sl, :], m_ref[q_sl], l_ref[q_sl], d_ref[q_sl]

    def q_body(j, dq):
        sl = pl.ds(j * bk, bk)
        k = k_ref[sl, :]
        _, ds = grads(q, k, v_ref[sl, :], do, m, l, dd)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, s // bk, q_body, jnp.zeros((bq, q_ref.shape[1]), F32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _call(kernel, cfg: KernelConfig, grid, in_specs, out_specs, out_shape, name: str, *args):
    params = {}
    if not cfg.interpret:
        from jax.experimental.pallas import triton as plgpu

        params = dict(compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=cfg.interpret, name=name, **params)(*args)


def _forward(q, k, v, qparams, scale: float, cfg: KernelConfig):
    b, t, h, d = q.shape
    s = k.shape[1]
    bq = min(cfg.block_q, t)
    tile = lambda i, bi, hi: (bi, i, hi, 0)  # noqa: E731
    whole = lambda i, bi, hi: (bi, 0, hi, 0)  # noqa: E731
    row = lambda i, bi, hi: (bi, hi, i)  # noqa: E731
    return _call(
        functools.partial(_fwd_kernel, scale=scale, cfg=cfg), cfg, (t // bq, b, h),
        [pl.BlockSpec((2,), lambda *_: (0,)), pl.BlockSpec((None, bq, None, d), tile),
         pl.BlockSpec((None, s, None, d), whole), pl.BlockSpec((None, s, None, v.shape[-1]), whole)],
        [pl.BlockSpec((None, bq, None, v.shape[-1]), tile), pl.BlockSpec((None, None, bq), row),
         pl.BlockSpec((None, None, bq), row)],
        [jax.ShapeDtypeStruct((b, t, h, v.shape[-1]), q.dtype), jax.ShapeDtypeStruct((b, h, t), F32),
         jax.ShapeDtypeStruct((b, h, t), F32)],
        "lsq_flash_fwd", qparams, q, k, v)


def _backward(q, k, v, qparams, m, l, do, scale: float, cfg: KernelConfig):
    b, t, h, d = q.shape
    s, dv_ = k.shape[1], v.shape[-1]
    bq = t // (s // min(cfg.block_b, s))
    qp_spec = pl.BlockSpec((2,), lambda *_: (0,))
    tile = lambda i, bi, hi: (bi, i, hi, 0)  # noqa: E731
    whole = lambda i, bi, hi: (bi, 0, hi, 0)  # noqa: E731
    row = lambda i, bi, hi: (bi, hi, i)  # noqa: E731
    dd, sg = _call(
        functools.partial(_bwd_rows_kernel, scale=scale, cfg=cfg), cfg, (t // bq, b, h),
        [qp_spec, pl.BlockSpec((None, bq, None, d), tile), pl.BlockSpec((None, s, None, d), whole),
         pl.BlockSpec((None, s, None, dv_), whole), pl.BlockSpec((None, bq, None, dv_), tile),
         pl.BlockSpec((None, None, bq), row), pl.BlockSpec((None, None, bq), row)],
        [pl.BlockSpec((None, None, bq), row), pl.BlockSpec((None, None, bq), row)],
        [jax.ShapeDtypeStruct((b, h, t), F32), jax.ShapeDtypeStruct((b, h, t), F32)],
        "lsq_flash_bwd_rows", qparams, q, k, v, do, m, l)
    # grid (batch, head, tile): program i owns key tile i (dK, dV) and query tile i (dQ)
    g_tile = lambda bi, hi, i: (bi, i, hi, 0)  # noqa: E731
    g_whole = lambda bi, hi, i: (bi, 0, hi, 0)  # noqa: E731
    g_rows = lambda bi, hi, i: (bi, hi, 0)  # noqa: E731
    bk = min(cfg.block_b, s)
    dq, dk, dv = _call(
        functools.partial(_bwd_kernel, scale=scale, cfg=cfg), cfg, (b, h, s // bk),
        [qp_spec, pl.BlockSpec((None, t, None, d), g_whole), pl.BlockSpec((None, s, None, d), g_whole),
         pl.BlockSpec((None, s, None, dv_), g_whole), pl.BlockSpec((None, t, None, dv_), g_whole),
         pl.BlockSpec((None, None, t), g_rows), pl.BlockSpec((None, None, t), g_rows),
         pl.BlockSpec((None, None, t), g_rows)],
        [pl.BlockSpec((None, bq, None, d), g_tile), pl.BlockSpec((None, bk, None, d), g_tile),
         pl.BlockSpec((None, bk, None, dv_), g_tile)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
         jax.ShapeDtypeStruct(v.shape, v.dtype)],
        "lsq_flash_bwd", qparams, q, k, v, do, m, l, dd)
    return dq, dk, dv, sg


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q: Array, k: Array, v: Array, qparams: Array, cfg: KernelConfig) -> Array:
    return _forward(q, k, v, qparams, 1.0 / math.sqrt(q.shape[-1]), cfg)[0]


def _attention_fwd(q, k, v, qparams, cfg):
    out, m, l = _forward(q, k, v, qparams, 1.0 / math.sqrt(q.shape[-1]), cfg)
    return out, (q, k, v, qparams, m, l)


def _attention_bwd(cfg, res, do):
    q, k, v, qparams, m, l = res
    dq, dk, dv, sg = _backward(q, k, v, qparams, m, l, do.astype(q.dtype), 1.0 / math.sqrt(q.shape[-1]), cfg)
    if cfg.bits is None:
        dstep = jnp.zeros((), F32)
    else:  # LSQ's gradient scale g = 1 / sqrt(numel(P) * Qp) (bdm_jax.quant.lsq_quantize)
        numel = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]
        dstep = jnp.sum(sg) / math.sqrt(numel * _lsq_range(cfg.bits)[1])
    return dq, dk, dv, jnp.stack([dstep, jnp.zeros((), F32)]).astype(qparams.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


def lsq_flash_attention(q: Array, k: Array, v: Array, step: Array | float = 1.0, on: Array | float = 1.0, *,
                        bits: int | None, cfg: KernelConfig | None = None, interpret: bool | None = None) -> Array:
    """softmax(q k^T / sqrt(d)) v with the probabilities LSQ-quantized at `bits` where `on` > 0 (module doc).

    q: (B, T, H, D), k: (B, S, H, D), v: (B, S, H, Dv); `step` (the LSQ step, learned: it gets its
    gradient) and `on` (the layer's progressive mask; no gradient) are scalars. `bits=None`: no quantizer.
    Raises ValueError naming the shape that the kernel cannot tile (see `supported`).
    """
    cfg = cfg or KernelConfig(bits=bits)
    if cfg.bits != bits:
        cfg = dataclasses.replace(cfg, bits=bits)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    cfg = dataclasses.replace(cfg, interpret=interpret)
    why = supported(q.shape, k.shape, cfg)
    if why:
        raise ValueError(f"lsq_flash_attention: {why} (q {q.shape}, k {k.shape}); use the explicit attention core")
    if bits is not None:
        _lsq_range(bits)  # the same error as the quantizer's for a width LSQ does not have
    qparams = jnp.stack([jnp.asarray(step, F32), lax.stop_gradient(jnp.asarray(on, F32))])
    return _attention(q, k, v, qparams, cfg)
