"""1-bit packing (bdm_jax.pack): bit layout, round trips for odd fan-ins, exact reconstruction. ~5 s."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdm_jax import pack, quant

# fan-in not a multiple of 8 or 32 (45, 3, 13, 1, 33), exactly one word (32), several words (576)
SHAPES = [(3, 3, 5, 7), (1, 1, 3, 2), (13, 4), (1, 3), (33, 1), (32, 3), (3, 3, 64, 5)]


def np_layout(signs, word_bits):
    """Reference packer written from the documented layout, one bit at a time."""
    k, c_out = signs.shape[0], signs.shape[-1]
    flat = signs.reshape(k, -1, c_out)
    fan_in = flat.shape[1]
    n = -(-fan_in // word_bits)
    words = np.zeros((k, n, c_out), np.uint64)
    for j in range(k):
        for f in range(fan_in):
            for o in range(c_out):
                if flat[j, f, o]:
                    words[j, f // word_bits, o] |= np.uint64(1) << np.uint64(f % word_bits)
    return words


@pytest.mark.parametrize("word_bits", [8, 32])
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_matches_documented_layout_and_round_trips(shape, word_bits):
    rng = np.random.default_rng(sum(shape) + word_bits)
    signs = rng.random((2,) + shape) < 0.5
    words = jax.jit(pack.pack_signs, static_argnums=1)(jnp.asarray(signs), word_bits)
    fan_in = math.prod(shape[:-1])
    chex.assert_shape(words, (2, -(-fan_in // word_bits), shape[-1]))
    chex.assert_type(words, pack.WORD_DTYPES[word_bits])
    np.testing.assert_array_equal(np.asarray(words, np.uint64), np_layout(signs, word_bits))
    back = jax.jit(pack.unpack_signs, static_argnums=1)(words, shape)
    chex.assert_shape(back, (2,) + shape)
    np.testing.assert_array_equal(back, np.where(signs, 1.0, -1.0))
    assert pack.packed_nbytes(shape, 2, word_bits) == words.size * words.dtype.itemsize


def test_padding_bits_are_zero_and_all_ones_fill_fan_in():
    words = pack.pack_signs(jnp.ones((1, 45, 2), bool), 32)  # 45 = 32 + 13
    np.testing.assert_array_equal(words[0, 0], [0xFFFFFFFF] * 2)
    np.testing.assert_array_equal(words[0, 1], [(1 << 13) - 1] * 2)


@pytest.mark.parametrize("shape,k", [((3, 3, 5, 7), 1), ((3, 3, 5, 7), 2), ((13, 4), 3)])
def test_binary_kernel_is_bit_identical_to_multi_basis_binarize(shape, k):
    w = jax.random.normal(jax.random.key(k), shape) * 0.1
    w = w.at[(0,) * len(shape)].set(0.0)  # sign(0) = +1 must survive packing
    scales = quant.init_scales(w, k) * jnp.linspace(0.5, 1.5, shape[-1])  # not the init: learned scales
    want = jax.jit(quant.multi_basis_binarize)(w, scales)
    for word_bits in (8, 32):
        words = jax.jit(pack.pack_kernel, static_argnums=2)(w, scales, word_bits)
        got = jax.jit(pack.binary_kernel, static_argnums=2)(words, scales, shape)
        np.testing.assert_array_equal(got, want)


def test_unpack_runs_under_jit_with_packed_inputs():
    shape = (3, 3, 5, 7)
    w = jax.random.normal(jax.random.key(0), shape)
    scales = quant.init_scales(w, 2)
    words = pack.pack_kernel(w, scales, 32)
    f = jax.jit(lambda b, s: pack.binary_kernel(b, s, shape))
    assert "tensor<2x2x7xui32>" in f.lower(words, scales).as_text()  # the packed words are the input
    np.testing.assert_array_equal(f(words, scales), quant.multi_basis_binarize(w, scales))


def test_bad_inputs():
    with pytest.raises(ValueError, match="word_bits=16"):
        pack.pack_signs(jnp.ones((1, 4, 2), bool), 16)
    words = pack.pack_signs(jnp.ones((1, 40, 2), bool), 32)
    with pytest.raises(ValueError, match="do not fit kernel shape"):
        pack.unpack_signs(words, (70, 2))
    with pytest.raises(ValueError, match="scales of shape"):
        pack.binary_kernel(words, jnp.ones((2, 2)), (40, 2))
