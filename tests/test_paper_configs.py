"""The paper's configs: every variant validates, the CIFAR-10 config trains 2 steps on mock TFDS data, and the
LDM-8 Churches / LDM-4 ImageNet configs: their fields, their data on mock TFDS, a scaled-down 2-step run each."""

import os

import flax.linen as nn
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bdm_jax import checkpoint as ckpt_lib
from bdm_jax import data as bdata
from bdm_jax.checkpoint import CheckpointError, check_architecture
from bdm_jax.config import ConfigError, validate
from bdm_jax.trainer import train_and_evaluate
from bdm_jax.unet import UNet
from configs import ddpm_cifar10, ldm4_bedrooms, ldm4_ffhq, ldm4_imagenet, ldm8_churches


@pytest.mark.parametrize("variant", sorted(ddpm_cifar10.VARIANTS))
def test_cifar10_variants_validate(variant):
    cfg = validate(ddpm_cifar10.get_config(variant))
    method, bits = ddpm_cifar10.VARIANTS[variant]
    assert cfg.method == method and cfg.quant.act_bits == bits
    assert cfg.quant.lrm == ("pca" if method == "binarydm" else "none")
    assert cfg.train.lr == (2e-4 if method == "fp" else 2e-5)


def test_unknown_variant():
    with pytest.raises(ValueError, match="not one of fp, baseline_w1a32"):
        ddpm_cifar10.get_config("w2a2")


def test_cifar10_config_trains_two_steps_on_mock_tfds(tmp_path):
    """The real config's data path (tfds:cifar10, 32x32x3, flips) and its 35.7M-param UNet, 2 steps."""
    cfg = ddpm_cifar10.get_config("fp")
    cfg.train.steps = 2
    cfg.train.batch_size = 2
    cfg.train.log_every = 1
    cfg.train.save_every = 2
    cfg.sample.num = 1
    cfg.sample.batch_size = 1
    cfg.sample.steps = 1
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        result = train_and_evaluate(cfg, str(tmp_path))
    assert result["step"] == 2
    assert os.path.exists(result["grid"])
    params, step = ckpt_lib.load_params(str(tmp_path), validate(cfg))
    assert step == 2 and params["conv_in"]["kernel"].shape == (3, 3, 3, 128)


def test_ldm4_ffhq_is_the_bedrooms_model_on_a_folder():
    a, b = validate(ldm4_ffhq.get_config()), validate(ldm4_bedrooms.get_config())
    assert a.data.name == "folder" and a.data.data_dir
    assert a.model.to_dict() == b.model.to_dict() and a.autoencoder.to_dict() == b.autoencoder.to_dict()


# ---------------------------------------------------- LDM-8 Churches and LDM-4 ImageNet (issues 6 and 7)
def test_churches_and_imagenet_configs_are_the_compvis_models():
    ch = validate(ldm8_churches.get_config())
    assert (ch.model.image_size, ch.model.in_channels, ch.data.image_size) == (32, 4, 256)  # KL-f8 latents
    assert ch.model.use_scale_shift_norm and ch.model.resblock_updown and ch.model.num_heads == 8
    assert ch.autoencoder.kind == "kl" and list(ch.autoencoder.ch_mult) == [1, 2, 4, 4]
    assert (ch.diffusion.beta_start, ch.diffusion.beta_end, ch.diffusion.beta_schedule) == (0.0015, 0.0155,
                                                                                          "sqrt_linear")
    im = validate(ldm4_imagenet.get_config())
    assert (im.model.image_size, im.model.in_channels) == (64, 3)
    assert (im.autoencoder.kind, im.autoencoder.n_embed) == ("vq", 8192)
    assert im.model.cond_stage == "class" and im.model.use_spatial_transformer and im.model.context_dim == 512
    assert (im.model.num_classes, im.data.num_classes) == (1001, 1000)  # + cin256-v2's unconditional class
    assert im.sample.steps == 20 and im.diffusion.beta_end == 0.0195  # SPEC §8: ImageNet with DDIM 20


@pytest.mark.parametrize("change, field", [
    (dict(use_scale_shift_norm=1), "model.use_scale_shift_norm=1"),
    (dict(transformer_depth=0), "model.transformer_depth=0"),
    (dict(cond_stage="text"), "model.cond_stage='text'"),
    (dict(use_spatial_transformer=False), "model.cond_stage='class'"),
    (dict(cond_stage="none"), "model.use_spatial_transformer=True"),
    (dict(num_classes=999), "data.num_classes=1000"),
])
def test_bad_variant_fields_stop_with_one_line(change, field):
    cfg = ldm4_imagenet.get_config().to_dict()
    cfg["model"].update(change)  # as a dict: ConfigDict itself refuses a value of another type
    cfg = ml_collections.ConfigDict(cfg)
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(".", r"\.")) as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_checkpoints_of_another_variant_are_refused():
    old = validate(ldm4_bedrooms.get_config()).to_dict()
    for key in ("use_scale_shift_norm", "resblock_updown", "use_spatial_transformer", "cond_stage"):
        old["model"].pop(key)  # a config saved before these fields existed: today's behaviour
    check_architecture(old, validate(ldm4_bedrooms.get_config()), "old")
    cfg = ldm4_bedrooms.get_config()
    cfg.model.use_scale_shift_norm = True
    with pytest.raises(CheckpointError, match=r"written for model\.use_scale_shift_norm=False but the config"):
        check_architecture(old, validate(cfg), "old")
    im = validate(ldm4_imagenet.get_config())
    other = im.to_dict()
    other["model"]["context_dim"] = 768
    with pytest.raises(CheckpointError, match="context_dim=768"):
        check_architecture(other, im, "other")


@pytest.mark.parametrize("module", [ldm8_churches, ldm4_imagenet])
def test_config_data_on_mock_tfds(module):
    """The configs' real data sections (256x256, flips, labels) on tfds.testing.mock_data."""
    c = validate(module.get_config()).data
    kw = dict(global_batch_size=4, seed=3, random_flip=c.random_flip)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        src = bdata.create_source(c)
        full = bdata.get_batch(src, 1, **kw)
        again = bdata.get_batch(bdata.create_source(c), 1, **kw)
        parts = [bdata.get_batch(src, 1, process_index=i, process_count=2, **kw) for i in range(2)]
    assert full["image"].shape == (4, 256, 256, 3) and full["image"].dtype == np.float32
    assert -1.0 <= full["image"].min() < -0.9 and 0.9 < full["image"].max() <= 1.0
    assert full["label"].shape == (4,) and full["label"].dtype == np.int32
    if c.num_classes:
        assert 0 <= full["label"].min() and full["label"].max() < 1000
    else:
        assert not full["label"].any()
    for k in ("image", "label"):
        np.testing.assert_array_equal(full[k], again[k])  # deterministic given the seed
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])  # per-host blocks
    idx = bdata.batch_indices(1, 4, 12, 3)
    assert set(idx[bdata.host_slice(4, 0, 2)]).isdisjoint(idx[bdata.host_slice(4, 1, 2)])


def _scaled_down(module):
    """The config with its architecture switches kept and every size made tiny (16x16 images, a random
    2x-downsampling first stage of the same kind, a 2-level UNet of 16 channels), 2 FP steps."""
    c = module.get_config()
    c.method = "fp"
    c.data.image_size = 16
    c.model.image_size, c.model.in_channels, c.model.out_channels = 8, 2, 2
    c.model.model_channels = 16
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (4,)
    c.model.norm_groups = 8
    c.model.context_dim = 16
    c.autoencoder.update(path="", ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=2, embed_dim=2, n_embed=16,
                         norm_groups=4)
    c.diffusion.timesteps = 100
    c.train.update(steps=2, batch_size=2, warmup_steps=1, log_every=1, save_every=2)
    c.sample.update(num=2, batch_size=2, steps=1)
    return c


@pytest.mark.parametrize("module", [ldm8_churches, ldm4_imagenet])
def test_scaled_down_config_trains_two_steps_on_mock_tfds(module, tmp_path):
    cfg = _scaled_down(module)
    labels = []  # what the UNet gets as y in the train step (traced once) and in the sampler

    def spy(next_fn, args, kwargs, ctx):
        if isinstance(ctx.module, UNet) and ctx.method_name == "__call__" and ctx.module.scope.parent is None:
            labels.append(None if len(args) < 3 or args[2] is None else tuple(args[2].shape))
        return next_fn(*args, **kwargs)

    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE), nn.intercept_methods(spy):
        result = train_and_evaluate(cfg, str(tmp_path))
    assert result["step"] == 2 and os.path.exists(result["grid"])
    params, _ = ckpt_lib.load_params(str(tmp_path), validate(cfg))
    if module is ldm4_imagenet:
        assert params["class_embedder"]["embedding"].shape == (1001, 16)
        assert labels and all(shape is not None for shape in labels) and (2,) in labels
    else:
        assert params["input_blocks_2"]["down"]["emb_dense"]["kernel"].shape == (64, 2 * 16)  # scale, shift
        assert labels and all(shape is None for shape in labels)
