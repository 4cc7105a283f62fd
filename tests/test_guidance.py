"""Classifier-free guidance: guided sampling and label dropout in training (cin256-v2's 'no class' label)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdm_jax import diffusion
from bdm_jax.config import ConfigError, validate
from bdm_jax.train_state import make_optimizer
from bdm_jax.trainer import Setup, make_init_fn, make_mask_fn, make_sample_fn, make_train_step
from configs import tiny


def _cfg(guidance=1.0, dropout=0.0):
    cfg = tiny.get_config()
    del cfg.model["num_classes"]  # a class table with one row more than the data's classes, as cin256-v2
    cfg.data.num_classes = 10
    cfg.model.num_classes = 11
    cfg.model.uncond_label = 10
    cfg.sample.guidance_scale = guidance
    cfg.sample.steps = 3
    cfg.train.label_dropout = dropout
    return validate(cfg)


@pytest.fixture(scope="module")
def params():
    setup = Setup.from_config(_cfg())
    s, c = setup.cfg.model.image_size, setup.cfg.model.in_channels
    variables = setup.model.init(jax.random.key(0), jnp.zeros((1, s, s, c)), jnp.zeros((1,), jnp.int32),
                                 jnp.zeros((1,), jnp.int32))
    # Non-zero output conv and a non-trivial label table: otherwise every label gives the same eps.
    return jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), variables["params"])


def _manual(setup, params, scale, num):
    labels = jnp.arange(num, dtype=jnp.int32) % 10
    uncond = jnp.full_like(labels, 10)

    def model_fn(x, t):
        e_c = setup.model.apply({"params": params}, x, t, labels)
        e_u = setup.model.apply({"params": params}, x, t, uncond)
        return e_u + scale * (e_c - e_u)

    s, c = setup.cfg.model.image_size, setup.cfg.model.out_channels
    x = diffusion.sample(model_fn, setup.sched, (num, s, s, c), jax.random.key(7), sampler="ddim", steps=3)
    return jnp.clip(x, -1.0, 1.0)


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_guided_sampling_is_the_cfg_combination(params, scale):
    setup = Setup.from_config(_cfg(guidance=scale))
    got = make_sample_fn(setup, 4)(params, {}, jax.random.key(7))
    np.testing.assert_allclose(np.asarray(got), np.asarray(_manual(setup, params, scale, 4)), atol=1e-4)


def test_guidance_changes_samples(params):
    plain = make_sample_fn(Setup.from_config(_cfg(1.0)), 4)(params, {}, jax.random.key(7))
    guided = make_sample_fn(Setup.from_config(_cfg(3.0)), 4)(params, {}, jax.random.key(7))
    assert float(jnp.max(jnp.abs(plain - guided))) > 1e-3


def test_label_dropout_one_trains_on_the_uncond_label():
    """Dropout 1.0 with labels 3 gives the step of dropout 0 with every label = uncond (same noise); labels
    matter (dropout 0 with labels 3 differs). Params are perturbed: the zero-initialised output convs make a
    fresh model's output and gradients label-independent."""
    losses = {}
    for dropout, label in ((1.0, 3), (0.0, 10), (0.0, 3)):
        setup = Setup.from_config(_cfg(dropout=dropout))
        tx = make_optimizer(setup.cfg.train)
        s = setup.cfg.model.image_size
        batch = {"image": jax.random.uniform(jax.random.key(1), (4, s, s, 1), minval=-1, maxval=1),
                 "label": jnp.full((4,), label, jnp.int32)}
        state = jax.jit(make_init_fn(setup, tx))(jax.random.key_data(jax.random.key(0)), {}, batch)
        state = state.replace(params=jax.tree.map(
            lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), state.params))
        _, metrics = jax.jit(make_train_step(setup, tx, make_mask_fn(setup, state.masks)))(state, batch)
        losses[(dropout, label)] = (float(metrics["loss"]), float(metrics["grad_norm"]))
    assert losses[(1.0, 3)] == pytest.approx(losses[(0.0, 10)], rel=1e-6)
    assert losses[(0.0, 3)][0] != pytest.approx(losses[(0.0, 10)][0], rel=1e-4)


@pytest.mark.parametrize("field,value,message", [
    ("model.uncond_label", 11, "must be a row of the class table"),
    ("sample.guidance_scale", 2.0, "needs a model trained with a 'no class' label"),
    ("train.label_dropout", 0.1, "needs model.uncond_label >= 0"),
    ("train.label_dropout", 1.5, "must be <= 1"),
])
def test_bad_guidance_fields_stop_with_one_line(field, value, message):
    cfg = _cfg()
    if field != "model.uncond_label" and "needs" in message:
        cfg.model.uncond_label = -1
    group, key = field.split(".")
    cfg[group][key] = value
    with pytest.raises(ConfigError, match=message) as e:
        validate(cfg)
    assert f"config.{field}=" in str(e.value) and "\n" not in str(e.value)


def test_sampler_overrides_and_file_tags():
    from bdm_jax.sampling import sampler_tag, with_sampler

    cfg = with_sampler(_cfg(), "ddim", 20, None, 3.0)
    assert (cfg.sample.steps, cfg.sample.guidance_scale, cfg.sample.eta) == (20, 3.0, 0.0)
    assert sampler_tag(cfg) == "ddim20_g3"  # guided samples never share a file or shard dir with plain ones
    assert sampler_tag(with_sampler(_cfg(), "ddpm", None, None, 1.0)) == "ddpm"
    plain = tiny.get_config()
    with pytest.raises(ConfigError, match="sample.guidance_scale"):
        with_sampler(plain, guidance_scale=2.0)  # no 'no class' label: a clear error, not a JAX trace
