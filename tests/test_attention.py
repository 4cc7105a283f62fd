"""Attention core (bdm_jax.attention): the fused path computes the explicit path's function (issue 9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bdm_jax import attention, rules
from bdm_jax.config import ConfigError, validate
from bdm_jax.unet import UNet
from configs import tiny


def _unet_out(impl, plan=None, dtype="float32", variables=None):
    cfg = tiny.get_config()
    cfg.model.attention_impl = impl
    cfg.model.dtype = dtype
    cfg.model.num_head_channels = 8  # several heads: the (B, T, H, D) layout must be right
    net = UNet.from_config(cfg.model, plan)
    s, c = cfg.model.image_size, cfg.model.in_channels
    x = jax.random.normal(jax.random.key(1), (2, s, s, c))
    t = jnp.array([3, 700])
    if variables is None:
        variables = net.init(jax.random.key(0), x, t)
    # Non-zero output convs: zero-initialised ones would hide the attention branch.
    variables = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(2), a.shape, a.dtype)
                             if a.dtype == jnp.float32 else a, variables)
    return net.apply(variables, x, t), variables


def test_fused_xla_path_equals_explicit_unet():
    ref, variables = _unet_out("explicit")
    for impl in ("xla",) if jax.default_backend() == "cpu" else ("xla", "auto"):  # auto = xla on CPU
        out, _ = _unet_out(impl)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    assert float(jnp.max(jnp.abs(ref))) > 1e-2  # the comparison is not between zeros


def test_core_matches_reference_softmax_in_float64():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 16, 3, 8)) for _ in range(3))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = np.einsum("bhqk,bkhd->bqhd", w, v)

    import flax.linen as nn

    class Core(nn.Module):
        impl: str

        @nn.compact
        def __call__(self, q, k, v):
            return attention.multihead_attention(self, q, k, v, None, jnp.float32, self.impl)

    for impl in ("explicit", "xla"):
        out = Core(impl).apply({}, *(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
        err = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
        assert err < 1e-5, (impl, err)


def test_quantized_attention_keeps_explicit_path_and_its_quantizers():
    cfg = tiny.get_config()
    cfg.method, cfg.quant.act_bits = "binarydm", 8  # before validate: quantize_attention follows act_bits
    cfg = validate(cfg)
    plan = rules.build_plan(cfg.model, cfg.quant)
    net = UNet.from_config(cfg.model, plan)
    s, c = cfg.model.image_size, cfg.model.in_channels
    params = net.init(jax.random.key(0), jnp.zeros((1, s, s, c)), jnp.zeros((1,), jnp.int32))["params"]
    names = {"/".join(k) for k in traverse_util.flatten_dict(dict(params))}
    assert any(n.endswith("attn/attn_quant/act_step") for n in names)
    assert any(n.endswith("attn/q_quant/act_step") for n in names)


def test_resolve_impl_and_config_check():
    assert attention.resolve_impl("explicit", jnp.bfloat16, 32) == "explicit"
    if jax.default_backend() == "cpu":
        assert attention.resolve_impl("auto", jnp.bfloat16, 32) == "xla"
    assert attention.resolve_impl("auto", jnp.float32, 32) in ("xla",)
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU"):
        attention.resolve_impl("cudnn", jnp.float32, 32)  # float32 is never cuDNN's, on any backend
    cfg = tiny.get_config()
    cfg.model.attention_impl = "flash"
    with pytest.raises(ConfigError, match="model.attention_impl"):
        validate(cfg)
