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
rowsum(P dP) is not dO . out here (out uses P', and dP is masked); but dP = m * (dO v^T) with m the 0/1
straight-through mask, so rowsum(P dP) = dO . sum_j (P m)_j v_j, and likewise the step gradient's row sum
= dO . sum_j (dP'/dstep)_j v_j. The forward's second sweep accumulates those two (T, Dv) sums next to P' v
(`KernelConfig.d_from_forward`, change 6), and the backward gets both row sums from dO with one product
each; `d_from_forward=False` keeps the earlier backward kernel that sweeps the keys once more for them.
A last kernel computes dK, dV (per key block) and dQ (per query block). `bits=None` is plain flash
attention (no quantizer).

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
    # query rows per forward program. 128 won (2.77 vs 2.91 ms, one 32x32 layer fwd+bwd, H100) until change 6
    # gave the forward two more accumulators; since then 64: 2.37 vs 2.71 ms (docs/PERF_NOTES.md, session 4)
    block_q: int = 64
    block_k: int = 64  # keys per inner step (forward); the backward uses block_b for both
    block_b: int = 64
    num_warps: int = 4
    num_stages: int = 3  # measured: 2.93 vs 3.19 ms (2 stages) fwd+bwd at 32x32, H200 (docs/PERF_NOTES.md)
    # the backward's row sums from the forward's extra accumulators (module doc) instead of a third key sweep
    d_from_forward: bool = True
    # dQ added atomically (float32) from the dK/dV sweep over query tiles, instead of a second sweep over the keys.
    # Measured slower: 4.15 vs 2.33 ms per 32x32 layer fwd+bwd on an H100, the atomics contend (PERF_NOTES,
    # session 5); kept as a tested variant for comparison
    dq_atomic: bool = False
    interpret: bool = False


def supported(q_shape: tuple[int, ...], k_shape: tuple[int, ...], cfg: KernelConfig) -> str:
    """'' when the kernel applies to (B, T, H, D) q and (B, S, H, D) k; else why not (for an error or a fallback)."""
    (_, t, _, d), s = q_shape, k_shape[1]
    if d < 16 or d & (d - 1) or d > 128:
        # > 128: a tile's K and V rows no longer fit in shared memory with the pipelined loads (seen on an H100
        # at d = 256: 256 KiB asked, 227 KiB there)
        return f"head size {d} is not a power of two in [16, 128]"
    for name, n, blk in (("query tokens", t, min(cfg.block_q, t)), ("key tokens", s, min(cfg.block_k, s)),
                         ("query tokens", t, min(cfg.block_b, t)), ("key tokens", s, min(cfg.block_b, s))):
        if blk < 16 or blk & (blk - 1) or n % blk:
            return f"{name} {n} is not a multiple of a power-of-two tile >= 16"
    if t // min(cfg.block_b, t) != s // min(cfg.block_b, s):
        return f"query tokens {t} != key tokens {s} (the backward kernel pairs query and key tiles)"
    return ""


def _dot(a: Array, b: Array) -> Array:
    """a @ b of two tiles with a float32 result (tensor cores for bf16 tiles; exact float32 for float32)."""
    prec = lax.Precision.HIGHEST if a.dtype == F32 else None
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec, preferred_element_type=F32)


def _asm(op: str, x: Array) -> Array:
    from jax.experimental.pallas import triton as plgpu

    return plgpu.elementwise_inline_asm(f"{op} $0, $1;", args=[x], constraints="=f,f", pack=1,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])[0]


def _exp2(x: Array, cfg: KernelConfig) -> Array:
    # One MUFU instruction on GPU (what cuDNN's and Triton's flash kernels use); libdevice's is ~10x the work.
    return jnp.exp2(x) if cfg.interpret else _asm("ex2.approx.ftz.f32", x)


def _round(x: Array, cfg: KernelConfig) -> Array:
    # Round half to even, as jnp.round (the explicit quantizer); Triton has no op for it, PTX has one instruction.
    return jnp.round(x) if cfg.interpret else _asm("cvt.rni.f32.f32", x)


def _bf(x: Array, dtype) -> Array:
    """float32 x rounded to the operands' dtype and back: the explicit core's casts of P and P'."""
    return x.astype(dtype).astype(F32)


def _tile(q, k, lse2, qparams, dtype, scale2: float, cfg: KernelConfig):
    """(P, P', dP'/dstep, inside-range mask) of one (query tile, key tile), float32.

    P = 2^(s log2(e) / sqrt(d) - lse2) with lse2 the row's base-2 log-sum-exp: one FMA and one exp2 per
    element. The quantizer divides by multiplying with 1/step (ulp-level differences from x / step).
    dP'/dstep = round(v) - v inside the range, Qn/Qp outside (before the mask; only the rows kernel uses it,
    the compiler drops it elsewhere).
    """
    p = _exp2(_dot(q, k.T) * scale2 - lse2[:, None], cfg)
    pb = _bf(p, dtype)
    if cfg.bits is None:
        return p, pb, None, None
    qn, qp = _lsq_range(cfg.bits)
    step, on, inv_step = qparams
    v = pb * inv_step
    inside = (v >= qn) & (v <= qp)
    vc = jnp.clip(v, qn, qp)
    r = _round(vc, cfg)
    return p, jnp.where(on > 0, _bf(r * step, dtype), pb), r - jnp.where(inside, vc, 0.0), inside


def _dp(dpq: Array, inside, on) -> Array:
    """dP from dP': straight through inside the LSQ range, 0 outside (where the quantizer is on)."""
    return dpq if inside is None else jnp.where((on > 0) & ~inside, 0.0, dpq)


def _params(qp_ref):
    return qp_ref[0], qp_ref[1], qp_ref[2]


def _fwd_kernel(qp_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *sums_refs, scale2: float, cfg: KernelConfig):
    """out = P' v and the row log-sum-exp; with `sums_refs` (d_from_forward) also, float32, sum_j (P m)_j v_j
    and sum_j (dP'/dstep)_j v_j, whose products with dO are the backward's two row sums (module doc)."""
    q = q_ref[...]
    bq, bk = q.shape[0], min(cfg.block_k, k_ref.shape[0])
    n_k = k_ref.shape[0] // bk

    def stats(j, carry):  # online max / sum of 2^s over the key tiles
        m, l = carry
        s = _dot(q, k_ref[pl.ds(j * bk, bk), :].T) * scale2
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        return m_new, l * _exp2(m - m_new, cfg) + jnp.sum(_exp2(s - m_new[:, None], cfg), axis=1)

    m, l = lax.fori_loop(0, n_k, stats, (jnp.full((bq,), -jnp.inf, F32), jnp.zeros((bq,), F32)))
    lse2 = m + jnp.log2(l)
    qparams = _params(qp_ref)
    on = qparams[1]
    quantized_sums = bool(sums_refs) and cfg.bits is not None

    def accumulate(j, acc):
        sl = pl.ds(j * bk, bk)
        v = v_ref[sl, :]
        p, pu, dstep, inside = _tile(q, k_ref[sl, :], lse2, qparams, v.dtype, scale2, cfg)
        o = acc[0] + _dot(pu.astype(v.dtype), v)
        if not quantized_sums:
            return (o,)
        pm = jnp.where((on > 0) & ~inside, 0.0, p)  # P m: dP = m dP'
        return o, acc[1] + _dot(pm.astype(v.dtype), v), acc[2] + _dot(dstep.astype(v.dtype), v)

    zeros = jnp.zeros((bq, v_ref.shape[1]), F32)
    acc = lax.fori_loop(0, n_k, accumulate, (zeros,) * (3 if quantized_sums else 1))
    o_ref[...] = acc[0].astype(o_ref.dtype)
    lse_ref[...] = lse2
    if sums_refs:
        pm_ref, g_ref = sums_refs
        # bits=None: P m = P' = P (up to the operands' rounding, as in the accumulator itself) and no step
        pm_ref[...] = acc[1] if quantized_sums else acc[0]
        g_ref[...] = (acc[2] if quantized_sums else zeros).astype(g_ref.dtype)


def _bwd_rows_kernel(qp_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, sg_ref, *, scale2: float,
                     cfg: KernelConfig):
    """Per query row: D = sum_j P dP (softmax backward) and sum_j of the step-gradient terms dP' dP'/dstep."""
    q, do, lse2 = q_ref[...], do_ref[...], lse_ref[...]
    bq, bk = q.shape[0], min(cfg.block_b, k_ref.shape[0])
    qparams = _params(qp_ref)
    on = qparams[1]

    def body(j, carry):
        dsum, sg = carry
        sl = pl.ds(j * bk, bk)
        v = v_ref[sl, :]
        p, _, dstep, inside = _tile(q, k_ref[sl, :], lse2, qparams, v.dtype, scale2, cfg)
        dpq = _dot(do, v.T)
        if inside is not None:
            sg = sg + jnp.sum(dpq * dstep, axis=1)
        return dsum + jnp.sum(p * _dp(dpq, inside, on), axis=1), sg

    zeros = jnp.zeros((bq,), F32)
    dsum, sg = lax.fori_loop(0, k_ref.shape[0] // bk, body, (zeros, zeros))
    d_ref[...] = dsum
    sg_ref[...] = jnp.where(on > 0, sg, 0.0)


def _bwd_kernel(qp_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, *refs, scale2: float, cfg: KernelConfig):
    """dK, dV of key tile i (loop over query tiles), then dQ of query tile i (loop over key tiles); with
    cfg.dq_atomic, each query tile's dQ share is added atomically to a float32 dQ inside the first loop."""
    dq_ref, dk_ref, dv_ref = refs[-3:]  # dq_atomic: refs[0] is the zeros input that dq_ref aliases
    i = pl.program_id(2)
    t, s = q_ref.shape[0], k_ref.shape[0]
    bq, bk = t // (s // min(cfg.block_b, s)), min(cfg.block_b, s)
    qparams = _params(qp_ref)
    on = qparams[1]
    dtype = v_ref.dtype
    scale = scale2 / math.log2(math.e)

    k_sl = pl.ds(i * bk, bk)
    k, v = k_ref[k_sl, :], v_ref[k_sl, :]

    def kv_body(j, carry):
        dk, dv = carry
        sl = pl.ds(j * bq, bq)
        q, do = q_ref[sl, :], do_ref[sl, :]
        p, pu, _, inside = _tile(q, k, lse_ref[sl], qparams, dtype, scale2, cfg)
        ds = p * (_dp(_dot(do, v.T), inside, on) - d_ref[sl][:, None]) * scale
        dv = dv + _dot(pu.astype(dtype).T, do)
        if cfg.dq_atomic:
            _atomic_add(dq_ref, (sl, slice(None)), _dot(ds.astype(k.dtype), k))
        return dk + _dot(ds.astype(q.dtype).T, q), dv

    zeros = jnp.zeros((bk, k_ref.shape[1]), F32)
    dk, dv = lax.fori_loop(0, t // bq, kv_body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if cfg.dq_atomic:
        return

    q_sl = pl.ds(i * bq, bq)
    q, do, lse2, dd = q_ref[q_sl, :], do_ref[q_sl, :], lse_ref[q_sl], d_ref[q_sl]

    def q_body(j, dq):
        sl = pl.ds(j * bk, bk)
        k = k_ref[sl, :]
        p, _, _, inside = _tile(q, k, lse2, qparams, dtype, scale2, cfg)
        ds = p * (_dp(_dot(do, v_ref[sl, :].T), inside, on) - dd[:, None]) * scale
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, s // bk, q_body, jnp.zeros((bq, q_ref.shape[1]), F32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _atomic_add(ref, idx, val) -> None:
    from jax.experimental.pallas import triton as plgpu  # interpreted off GPU (a read-modify-write)

    plgpu.atomic_add(ref, idx, val)


def _call(kernel, cfg: KernelConfig, grid, in_specs, out_specs, out_shape, name: str, *args, aliases=None):
    params = {}
    if not cfg.interpret:
        from jax.experimental.pallas import triton as plgpu

        params = dict(compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=cfg.interpret, name=name, input_output_aliases=aliases or {}, **params)(*args)


_QP = pl.BlockSpec((4,), lambda *_: (0,))  # (step, on, 1/step, pad): scalars every program reads


def _forward(q, k, v, qparams, cfg: KernelConfig):
    """(out, lse2) and, with cfg.d_from_forward, the two (B, T, H, Dv) sums of the module doc."""
    b, t, h, d = q.shape
    s, dv_ = k.shape[1], v.shape[-1]
    bq = min(cfg.block_q, t)
    tile = lambda i, bi, hi: (bi, i, hi, 0)  # noqa: E731
    whole = lambda i, bi, hi: (bi, 0, hi, 0)  # noqa: E731
    row = lambda i, bi, hi: (bi, hi, i)  # noqa: E731
    out_specs = [pl.BlockSpec((None, bq, None, dv_), tile), pl.BlockSpec((None, None, bq), row)]
    out_shape = [jax.ShapeDtypeStruct((b, t, h, dv_), q.dtype), jax.ShapeDtypeStruct((b, h, t), F32)]
    if cfg.d_from_forward:
        # sum (P m) v in float32: the softmax backward subtracts its product with dO from dP (cancellation);
        # the step-gradient sum only enters one scalar, so it keeps the operands' dtype (half the bytes)
        out_specs += [pl.BlockSpec((None, bq, None, dv_), tile)] * 2
        out_shape += [jax.ShapeDtypeStruct((b, t, h, dv_), F32), jax.ShapeDtypeStruct((b, t, h, dv_), v.dtype)]
    return _call(
        functools.partial(_fwd_kernel, scale2=_scale2(d), cfg=cfg), cfg, (t // bq, b, h),
        [_QP, pl.BlockSpec((None, bq, None, d), tile), pl.BlockSpec((None, s, None, d), whole),
         pl.BlockSpec((None, s, None, dv_), whole)],
        out_specs, out_shape, "lsq_flash_fwd", qparams, q, k, v)


def _row_sums(do: Array, pmv: Array, gv: Array, on: Array) -> tuple[Array, Array]:
    """(rowsum(P dP) as (B, H, T), the step gradient's row sums) from the forward's sums (module doc)."""
    do = do.astype(F32)
    # products and sums, not einsum: XLA would make these dots, and float32 dots may run in TF32 on GPU
    dd = jnp.sum(do * pmv, axis=-1).transpose(0, 2, 1)
    sg = jnp.sum(do * gv.astype(F32), axis=-1).transpose(0, 2, 1)
    return dd, jnp.where(on > 0, sg, 0.0)


def _backward(q, k, v, qparams, lse2, do, sums, cfg: KernelConfig):
    b, t, h, d = q.shape
    s, dv_ = k.shape[1], v.shape[-1]
    bq = t // (s // min(cfg.block_b, s))
    tile = lambda i, bi, hi: (bi, i, hi, 0)  # noqa: E731
    whole = lambda i, bi, hi: (bi, 0, hi, 0)  # noqa: E731
    row = lambda i, bi, hi: (bi, hi, i)  # noqa: E731
    dd, sg = _row_sums(do, *sums, qparams[1]) if sums else _call(
        functools.partial(_bwd_rows_kernel, scale2=_scale2(d), cfg=cfg), cfg, (t // bq, b, h),
        [_QP, pl.BlockSpec((None, bq, None, d), tile), pl.BlockSpec((None, s, None, d), whole),
         pl.BlockSpec((None, s, None, dv_), whole), pl.BlockSpec((None, bq, None, dv_), tile),
         pl.BlockSpec((None, None, bq), row)],
        [pl.BlockSpec((None, None, bq), row), pl.BlockSpec((None, None, bq), row)],
        [jax.ShapeDtypeStruct((b, h, t), F32), jax.ShapeDtypeStruct((b, h, t), F32)],
        "lsq_flash_bwd_rows", qparams, q, k, v, do, lse2)
    # grid (batch, head, tile): program i owns key tile i (dK, dV) and query tile i (dQ)
    g_tile = lambda bi, hi, i: (bi, i, hi, 0)  # noqa: E731
    g_whole = lambda bi, hi, i: (bi, 0, hi, 0)  # noqa: E731
    g_rows = lambda bi, hi, i: (bi, hi, 0)  # noqa: E731
    bk = min(cfg.block_b, s)
    in_specs = [_QP, pl.BlockSpec((None, t, None, d), g_whole), pl.BlockSpec((None, s, None, d), g_whole),
                pl.BlockSpec((None, s, None, dv_), g_whole), pl.BlockSpec((None, t, None, dv_), g_whole),
                pl.BlockSpec((None, None, t), g_rows), pl.BlockSpec((None, None, t), g_rows)]
    out_specs = [pl.BlockSpec((None, bq, None, d), g_tile), pl.BlockSpec((None, bk, None, d), g_tile),
                 pl.BlockSpec((None, bk, None, dv_), g_tile)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)]
    args, aliases = [qparams, q, k, v, do, lse2, dd], None
    if cfg.dq_atomic:  # every program adds into all of its (batch, head)'s dQ rows: one float32 buffer, zeroed
        in_specs.append(pl.BlockSpec((None, t, None, d), g_whole))
        out_specs[0], out_shape[0] = in_specs[-1], jax.ShapeDtypeStruct(q.shape, F32)
        args.append(jnp.zeros(q.shape, F32))
        aliases = {len(args) - 1: 0}
    dq, dk, dv = _call(functools.partial(_bwd_kernel, scale2=_scale2(d), cfg=cfg), cfg, (b, h, s // bk),
                       in_specs, out_specs, out_shape, "lsq_flash_bwd", *args, aliases=aliases)
    return dq.astype(q.dtype), dk, dv, sg


def _scale2(d: int) -> float:
    """The logits' scale 1/sqrt(d) times log2(e): the kernels work in base 2."""
    return math.log2(math.e) / math.sqrt(d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q: Array, k: Array, v: Array, qparams: Array, cfg: KernelConfig) -> Array:
    # no backward to feed: the forward without the extra sums (sampling and inference pay nothing for them)
    return _forward(q, k, v, qparams, dataclasses.replace(cfg, d_from_forward=False))[0]


def _attention_fwd(q, k, v, qparams, cfg):
    out, lse2, *sums = _forward(q, k, v, qparams, cfg)
    return out, (q, k, v, qparams, lse2, tuple(sums))


def _attention_bwd(cfg, res, do):
    q, k, v, qparams, lse2, sums = res
    dq, dk, dv, sg = _backward(q, k, v, qparams, lse2, do.astype(q.dtype), sums, cfg)
    if cfg.bits is None:
        dstep = jnp.zeros((), F32)
    else:  # LSQ's gradient scale g = 1 / sqrt(numel(P) * Qp) (bdm_jax.quant.lsq_quantize)
        numel = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]
        dstep = jnp.sum(sg) / math.sqrt(numel * _lsq_range(cfg.bits)[1])
    return dq, dk, dv, jnp.zeros_like(qparams).at[0].set(dstep)


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
    step = jnp.asarray(step, F32)
    qparams = jnp.stack([step, lax.stop_gradient(jnp.asarray(on, F32)), 1.0 / step, jnp.zeros((), F32)])
    return _attention(q, k, v, qparams, cfg)
