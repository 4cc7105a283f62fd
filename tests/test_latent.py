"""Latent diffusion (issue 7): images -> scaled latents -> UNet -> decoded samples, the latent cache, the
config checks, and end to end: a CompVis LDM model.ckpt converted into teacher + autoencoder, binarized
with BinaryDM on latents of digits (configs/ldm_tiny_digits.py), sampled."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel
from flax import traverse_util

import torch_refs as refs
from bdm_jax import checkpoint as ckpt_lib
from bdm_jax import convert, latent
from bdm_jax.config import ConfigError, validate
from bdm_jax.data import create_source
from bdm_jax.sampling import sample_workdir
from bdm_jax.trainer import train_and_evaluate
from configs import ldm_tiny_digits, tiny


def _tiny_ldm(**changes):
    c = ldm_tiny_digits.get_config()
    for path, value in changes.items():
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def test_pixel_space_configs_have_no_codec():
    assert latent.Codec.from_config(validate(tiny.get_config())) is None


def test_scale_factor_and_posterior():
    cfg = validate(_tiny_ldm(**{"autoencoder.scale_factor": 0.5, "autoencoder.sample_posterior": False}))
    codec = latent.Codec.from_config(cfg)
    again = latent.Codec.from_config(cfg)  # random init is a pure function of config.seed
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, codec.params, again.params)))
    x = jnp.asarray(create_source(cfg.data).get_examples(np.arange(4))["image"])
    moments = codec.encode_moments(codec.params, x)
    assert moments.shape == (4, 8, 8, 4)  # kl: mean | logvar of 2 latent channels at 16 / 2
    z = codec.latents(moments, jax.random.key(0))
    np.testing.assert_allclose(z, 0.5 * moments[..., :2], rtol=1e-6)  # mean (no sampling), times scale
    decoded = codec.decode(codec.params, z)
    direct = codec.module.apply({"params": codec.params}, moments[..., :2], method=codec.module.decode)
    np.testing.assert_allclose(decoded, direct, rtol=1e-5, atol=1e-6)  # decode undoes the scale
    assert decoded.shape == (4, 16, 16, 1)
    sampled = latent.Codec.from_config(validate(_tiny_ldm())).latents(moments, jax.random.key(0))
    assert float(jnp.abs(sampled - moments[..., :2]).mean()) > 1e-3  # LDM default: a posterior draw


def test_latent_cache_matches_on_the_fly_encoding(tmp_path):
    cfg = validate(_tiny_ldm(**{"autoencoder.cache_latents": True}))
    codec = latent.Codec.from_config(cfg)
    source = create_source(cfg.data)
    cached = latent.cached_source(codec, source, cfg, str(tmp_path), batch_size=512)
    files = sorted(os.listdir(tmp_path / "latent_cache"))
    assert len(cached) == len(source) == 1797 and len(files) == 2 and not any(".tmp" in f for f in files)
    idx = np.array([1796, 3, 1000, 3])
    got = cached.get_examples(idx)
    want = codec.encode_moments(codec.params, jnp.asarray(source.get_examples(idx)["image"]))
    np.testing.assert_allclose(got["image"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["label"], source.get_examples(idx)["label"])
    stamp = os.path.getmtime(tmp_path / "latent_cache" / files[0])
    latent.cached_source(codec, source, cfg, str(tmp_path), batch_size=512)  # reused, not re-encoded
    assert os.path.getmtime(tmp_path / "latent_cache" / files[0]) == stamp


def test_latent_config_errors():
    with pytest.raises(ConfigError, match=r"model\.image_size=4 .*latent size"):
        validate(_tiny_ldm(**{"model.image_size": 4}))
    with pytest.raises(ConfigError, match=r"model\.in_channels=1 .*embed_dim = 2"):
        validate(_tiny_ldm(**{"model.in_channels": 1}))
    with pytest.raises(ConfigError, match=r"autoencoder\.cache_latents"):
        validate(_tiny_ldm(**{"autoencoder.cache_latents": True, "data.random_flip": True}))
    with pytest.raises(ConfigError, match=r"sample\.clip_denoised"):
        validate(_tiny_ldm(**{"sample.clip_denoised": True}))
    with pytest.raises(ConfigError, match=r"autoencoder\.kind='ae'"):
        validate(_tiny_ldm(**{"autoencoder.kind": "ae"}))
    # A config saved before these fields existed still validates, with today's behaviour.
    old = tiny.get_config().to_dict()
    del old["autoencoder"]
    for key in ("norm_eps", "flip_sin_to_cos", "freq_shift", "downsample_padding"):
        del old["model"][key]
    resolved = validate(ml_collections.ConfigDict(old))
    assert resolved.autoencoder.kind == "none" and resolved.model.norm_eps == 1e-5


def _compvis_ldm_ckpt(path, seed: int = 0):
    """A CompVis LDM model.ckpt (UNet, first stage, schedule) for configs/ldm_tiny_digits.py, random weights."""
    unet_cfg = dict(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    attention_head_dim=None, norm_num_groups=8)
    ae_cfg = dict(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, latent_channels=2,
                  norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2)
    torch.manual_seed(seed)
    unet, ae = UNet2DModel(**unet_cfg), AutoencoderKL(**ae_cfg)
    usd, asd = refs.numpy_state(unet), refs.numpy_state(ae)
    sd = {**refs.unet_to_compvis(usd, unet_cfg), **refs.autoencoder_to_compvis(asd, levels=2)}
    d = ldm_tiny_digits.get_config().diffusion
    sd["betas"] = np.linspace(d.beta_start, d.beta_end, d.timesteps, dtype=np.float32)
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                "global_step": 5}, path)
    return usd, asd, unet_cfg, ae_cfg


def test_compvis_ldm_converts_then_binarizes_and_samples_on_latents(tmp_path):
    # model.ckpt (tiny random UNet + KL autoencoder) -> teacher workdir + autoencoder dir -> BinaryDM on
    # cached latents with configs/ldm_tiny_digits.py -> samples decoded to 16x16 digits. ~2 min on a busy
    # 2-core CPU, nearly all of it XLA compiling the trainer's init / step / sampler.
    usd, asd, _, _ = _compvis_ldm_ckpt(tmp_path / "model.ckpt")
    cfg = ldm_tiny_digits.get_config()
    written = convert.convert_main(cfg, "ldm", "compvis", str(tmp_path / "model.ckpt"), str(tmp_path / "fp"),
                                   log=lambda s: None)
    assert written == {"unet": str(tmp_path / "fp"), "autoencoder": str(tmp_path / "fp" / "autoencoder")}
    saved = json.loads((tmp_path / "fp" / "config.json").read_text())
    assert saved["autoencoder"]["path"] == written["autoencoder"]
    # The teacher workdir loads as a teacher, and the saved config finds the converted autoencoder.
    params, step = ckpt_lib.load_params(written["unet"], cfg)
    want = traverse_util.flatten_dict(convert.unet_from_diffusers(usd, cfg.model))
    got = traverse_util.flatten_dict(params)
    assert step == 0 and all(np.array_equal(got[k], want[k]) for k in want)
    codec = latent.Codec.from_config(validate(ml_collections.ConfigDict(saved)))
    ae_want = traverse_util.flatten_dict(convert.autoencoder_from_diffusers(asd, cfg.autoencoder, 1))
    ae_got = traverse_util.flatten_dict(codec.params)
    assert all(np.array_equal(ae_got[k], ae_want[k]) for k in ae_want)
    # The checkpoint's schedule must be the config's; nothing is written when it is not.
    bad = ldm_tiny_digits.get_config()
    bad.diffusion.beta_end = 0.03
    with pytest.raises(convert.ConversionError, match="betas"):
        convert.convert_main(bad, "ldm", "compvis", str(tmp_path / "model.ckpt"), str(tmp_path / "fp2"),
                             log=lambda s: None)
    assert not (tmp_path / "fp2").exists()

    cfg.teacher_workdir = written["unet"]
    cfg.autoencoder.path = written["autoencoder"]
    cfg.autoencoder.cache_latents = True
    result = train_and_evaluate(cfg, str(tmp_path / "bdm"))
    assert result["step"] == 2
    rows = [json.loads(line) for line in open(tmp_path / "bdm" / "metrics.jsonl")]
    assert all(np.isfinite(r["loss"]) for r in rows) and "lrm" in rows[-1]
    assert "middle_block" in (tmp_path / "bdm" / "quant_plan.txt").read_text()
    assert len(os.listdir(tmp_path / "bdm" / "latent_cache")) == 2  # moments + labels
    out = sample_workdir(str(tmp_path / "bdm"), str(tmp_path / "samples"), num=3, batch_size=4, steps=5)
    assert out["images"].shape == (3, 16, 16, 1) and out["images"].dtype == np.uint8
    assert len(np.unique(out["images"])) > 2
