"""The paper's configs: every variant validates, and the CIFAR-10 config trains 2 steps on mock TFDS data."""

import os

import pytest
import tensorflow_datasets as tfds

from bdm_jax import checkpoint as ckpt_lib
from bdm_jax.config import validate
from bdm_jax.trainer import train_and_evaluate
from configs import ddpm_cifar10


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
    from configs import ldm4_bedrooms, ldm4_ffhq

    a, b = validate(ldm4_ffhq.get_config()), validate(ldm4_bedrooms.get_config())
    assert a.data.name == "folder" and a.data.data_dir
    assert a.model.to_dict() == b.model.to_dict() and a.autoencoder.to_dict() == b.autoencoder.to_dict()
