"""1-bit packing of binarized kernels (SPEC §2, §9): sign bits per basis in uint8/uint32 words.

Pure functions (jnp, jittable). A binarized kernel is ``w_b = sum_j a_j * s_j`` with per-output-channel
scales ``a_j`` (shape ``(k, C_out)``) and signs ``s_j`` in {-1, +1}; only the signs and scales are stored.

Bit layout (format version 1; also written into every export manifest):

* The kernel's fan-in axes are flattened in row-major order, output channels stay last: a conv kernel
  ``(kh, kw, C_in, C_out)`` (HWIO) has fan-in index ``f = (i * kw + j) * C_in + c``; a dense kernel
  ``(C_in, C_out)`` has ``f = c``.
* Basis ``j``'s signs are packed along the fan-in into words of ``word_bits`` (8 or 32) bits:
  array shape ``(k, ceil(fan_in / word_bits), C_out)``, dtype uint8 / uint32, C order, little-endian.
* Bit ``b`` (0 = least significant) of word ``w`` holds fan-in index ``f = w * word_bits + b``;
  bit 1 means sign +1 (``r >= 0``, SPEC §2 Decision sign(0) = +1), bit 0 means -1. Padding bits past
  ``fan_in`` are 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

WORD_DTYPES = {8: jnp.uint8, 32: jnp.uint32}
"""Supported word widths and their dtypes."""


def _check_word_bits(word_bits: int) -> None:
    if word_bits not in WORD_DTYPES:
        raise ValueError(f"word_bits={word_bits!r} is not supported: use 8 or 32")


def word_dtype(word_bits: int) -> jnp.dtype:
    _check_word_bits(word_bits)
    return jnp.dtype(WORD_DTYPES[word_bits])


def num_words(fan_in: int, word_bits: int) -> int:
    """Words per (basis, output channel): ``ceil(fan_in / word_bits)``."""
    _check_word_bits(word_bits)
    return -(-int(fan_in) // word_bits)


def packed_shape(kernel_shape: Sequence[int], bases: int, word_bits: int) -> tuple[int, int, int]:
    """Shape of the packed words of a kernel: ``(bases, ceil(fan_in / word_bits), C_out)``."""
    fan_in = math.prod(kernel_shape[:-1])
    return (int(bases), num_words(fan_in, word_bits), int(kernel_shape[-1]))


def packed_nbytes(kernel_shape: Sequence[int], bases: int, word_bits: int) -> int:
    """Bytes of the packed sign bits of one kernel (word padding included)."""
    return math.prod(packed_shape(kernel_shape, bases, word_bits)) * word_bits // 8


def binary_signs(w: jax.Array, scales: jax.Array) -> jax.Array:
    """Signs ``s_j = [r_{j-1} >= 0]`` of the multi-basis binarizer (SPEC §2), bool ``(k,) + w.shape``.

    Same recurrence and precision as :func:`bdm_jax.quant.multi_basis_binarize`
    (``r_0 = w``, ``r_j = r_{j-1} - a_j sign(r_{j-1})``), so ``sum_j a_j s_j`` reproduces its forward exactly.
    """
    if scales.ndim != 2 or scales.shape[-1] != w.shape[-1]:
        raise ValueError(f"scales must have shape (num_bases, C_out={w.shape[-1]}), got {scales.shape}")
    dtype = jnp.result_type(w.dtype, scales.dtype)
    r = jnp.asarray(w, dtype)
    out = []
    for j in range(scales.shape[0]):
        s = r >= 0
        out.append(s)
        r = r - scales[j].astype(dtype) * jnp.where(s, 1, -1).astype(dtype)
    return jnp.stack(out)


def pack_signs(signs: jax.Array, word_bits: int = 32) -> jax.Array:
    """Pack bool signs ``(k,) + kernel_shape`` into words ``(k, ceil(fan_in / word_bits), C_out)``.

    True = +1. Layout in the module docstring.
    """
    _check_word_bits(word_bits)
    signs = jnp.asarray(signs, jnp.bool_)
    k, c_out = signs.shape[0], signs.shape[-1]
    fan_in = math.prod(signs.shape[1:-1])
    n = num_words(fan_in, word_bits)
    flat = signs.reshape(k, fan_in, c_out).astype(jnp.uint32)
    flat = jnp.pad(flat, ((0, 0), (0, n * word_bits - fan_in), (0, 0)))
    shifts = jnp.arange(word_bits, dtype=jnp.uint32)[None, None, :, None]
    # Distinct powers of two: their sum is their bitwise OR and never overflows 32 bits.
    words = jnp.sum(flat.reshape(k, n, word_bits, c_out) << shifts, axis=2, dtype=jnp.uint32)
    return words.astype(WORD_DTYPES[word_bits])


def unpack_signs(words: jax.Array, kernel_shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`pack_signs`: ``(k,) + kernel_shape`` in {-1, +1} of ``dtype``.

    Runs inside jit; the words are the only weight storage, the ±1 array is a temporary.
    """
    kernel_shape = tuple(int(d) for d in kernel_shape)
    word_bits = jnp.dtype(words.dtype).itemsize * 8
    _check_word_bits(word_bits)
    fan_in, c_out = math.prod(kernel_shape[:-1]), kernel_shape[-1]
    k, n = words.shape[0], words.shape[1]
    if words.ndim != 3 or n != num_words(fan_in, word_bits) or words.shape[2] != c_out:
        raise ValueError(
            f"packed words of shape {tuple(words.shape)} do not fit kernel shape {kernel_shape} "
            f"(expected (bases, {num_words(fan_in, word_bits)}, {c_out}) for {word_bits}-bit words)"
        )
    shifts = jnp.arange(word_bits, dtype=words.dtype)[None, None, :, None]
    bits = (words[:, :, None, :] >> shifts) & jnp.asarray(1, words.dtype)
    bits = bits.reshape(k, n * word_bits, c_out)[:, :fan_in]
    return jnp.where(bits != 0, 1, -1).astype(dtype).reshape((k,) + kernel_shape)


def binary_kernel(words: jax.Array, scales: jax.Array, kernel_shape: Sequence[int]) -> jax.Array:
    """Float32 kernel ``sum_j a_j s_j`` from packed signs and scales ``(k, C_out)`` (SPEC §2).

    Accumulates basis by basis from zero in float32, in the order of
    :func:`bdm_jax.quant.multi_basis_binarize`, so the result is bit-identical to the training forward.
    """
    if scales.ndim != 2 or scales.shape[0] != words.shape[0] or scales.shape[1] != kernel_shape[-1]:
        raise ValueError(
            f"scales of shape {tuple(scales.shape)} do not fit {words.shape[0]} bases x C_out={kernel_shape[-1]}"
        )
    signs = unpack_signs(words, kernel_shape, jnp.float32)
    w_b = jnp.zeros(signs.shape[1:], jnp.float32)
    for j in range(scales.shape[0]):
        w_b = w_b + scales[j].astype(jnp.float32) * signs[j]
    return w_b


def pack_kernel(w: jax.Array, scales: jax.Array, word_bits: int = 32) -> jax.Array:
    """Packed words of a latent kernel under the given (effective) scales: ``pack_signs(binary_signs(w, a))``."""
    return pack_signs(binary_signs(w, scales), word_bits)

