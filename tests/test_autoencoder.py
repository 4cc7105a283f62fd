"""First-stage autoencoders (issue 7): flax VQ / KL encoder-decoder against diffusers' VQModel and
AutoencoderKL (random weights, explicit configs), CompVis-layout conversion, posterior, files.

Relative error = ||ours - torch|| / ||torch||, float32 on CPU; measured ~1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, VQModel
from flax import traverse_util

import torch_refs as refs
from bdm_jax import autoencoder as ae_lib
from bdm_jax import convert
from bdm_jax.autoencoder import Autoencoder, posterior_latents
from configs import default, ldm4_bedrooms


def _ae_cfg(cls, dcfg: dict):
    implied = convert.diffusers_autoencoder_config({"_class_name": cls.__name__, **dcfg})
    channels = implied.pop("image_channels")
    c = default.get_config().autoencoder
    for k, v in implied.items():
        c[k] = v
    return c, channels


def _torch_model(cls, dcfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    m = cls(**dcfg).eval()
    refs.perturb_vectors(m, seed)
    if cls is VQModel:  # codes spread like the latents, so the nearest-code search really chooses
        with torch.no_grad():
            h = m.encode(torch.from_numpy(_images(dcfg["in_channels"], n=4, seed=9))).latents
            flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
            n = m.quantize.embedding.weight.shape[0]
            pick = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[:n]
            m.quantize.embedding.weight.copy_(flat[pick] + 0.05 * flat.std() * torch.randn(n, h.shape[1]))
    return m


def _images(channels: int, size: int = 16, n: int = 2, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, channels, size, size)).astype(np.float32)


def _nhwc(x) -> jax.Array:
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _apply(ae: Autoencoder, params, method, x):
    return jax.jit(lambda p, x: ae.apply({"params": p}, x, method=method))(params, x)


def test_vq_encode_decode_match_diffusers():
    m = _torch_model(VQModel, refs.VQ_SMALL)
    cfg, ch = _ae_cfg(VQModel, refs.VQ_SMALL)
    params = convert.autoencoder_from_diffusers(refs.numpy_state(m), cfg, ch)
    ae = Autoencoder.from_config(cfg, ch)
    x = _images(ch)
    with torch.no_grad():
        h = m.encode(torch.from_numpy(x)).latents
        dec = m.decode(h).sample.numpy()
        unquantized = m.decode(h, force_not_quantize=True).sample.numpy()
    enc_err = refs.rel_err(_nchw(_apply(ae, params, Autoencoder.encode, _nhwc(x))), h.numpy())
    ours = _nchw(_apply(ae, params, Autoencoder.decode, _nhwc(h.numpy())))
    dec_err = refs.rel_err(ours, dec)
    print(f"VQModel rel err: encode {enc_err:.2e}, decode {dec_err:.2e}")
    assert enc_err < 1e-4 and dec_err < 1e-4
    assert refs.rel_err(ours, unquantized) > 1e-2  # the codebook lookup happened
    codes = torch.cdist(h.permute(0, 2, 3, 1).reshape(-1, 3), m.quantize.embedding.weight).argmin(1)
    assert len(torch.unique(codes)) > 10


def test_kl_encode_decode_match_diffusers():
    m = _torch_model(AutoencoderKL, refs.KL_SMALL)
    cfg, ch = _ae_cfg(AutoencoderKL, refs.KL_SMALL)
    params = convert.autoencoder_from_diffusers(refs.numpy_state(m), cfg, ch)
    ae = Autoencoder.from_config(cfg, ch)
    x = _images(ch)
    with torch.no_grad():
        dist = m.encode(torch.from_numpy(x)).latent_dist
        dec = m.decode(dist.mean).sample.numpy()
    moments = _nchw(_apply(ae, params, Autoencoder.encode, _nhwc(x)))
    mean_err = refs.rel_err(moments[:, :4], dist.mean.numpy())
    logvar_err = refs.rel_err(moments[:, 4:], dist.logvar.numpy())
    dec_err = refs.rel_err(_nchw(_apply(ae, params, Autoencoder.decode, _nhwc(dist.mean.numpy()))), dec)
    print(f"AutoencoderKL rel err: mean {mean_err:.2e}, logvar {logvar_err:.2e}, decode {dec_err:.2e}")
    assert max(mean_err, logvar_err, dec_err) < 1e-4


@pytest.mark.parametrize("cls, dcfg", [(VQModel, refs.VQ_SMALL), (AutoencoderKL, refs.KL_SMALL)])
def test_compvis_first_stage_equals_diffusers_conversion(cls, dcfg):
    m = _torch_model(cls, dcfg, seed=4)
    sd = refs.numpy_state(m)
    cfg, ch = _ae_cfg(cls, dcfg)
    compvis = refs.autoencoder_to_compvis(sd, levels=len(dcfg["block_out_channels"]))
    assert "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight" in compvis
    assert compvis["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    # A full LDM checkpoint also holds the UNet; a first-stage checkpoint its training losses.
    ckpt = dict(compvis, **{"model.diffusion_model.out.2.bias": np.zeros(3, np.float32)})
    want = traverse_util.flatten_dict(convert.autoencoder_from_diffusers(sd, cfg, ch))
    got = traverse_util.flatten_dict(convert.autoencoder_from_compvis(ckpt, cfg, ch))
    bare = {k[len("first_stage_model."):]: v for k, v in compvis.items()}
    bare["loss.discriminator.main.0.weight"] = np.zeros((4, 3, 4, 4), np.float32)
    got_bare = traverse_util.flatten_dict(convert.autoencoder_from_compvis(bare, cfg, ch))
    assert got.keys() == want.keys() == got_bare.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))
        np.testing.assert_array_equal(got_bare[k], want[k], err_msg="/".join(k))
    with pytest.raises(convert.ConversionError, match="attention inside its levels"):
        convert.autoencoder_from_compvis(dict(bare, **{"encoder.down.2.attn.0.q.weight": np.zeros(1)}), cfg, ch)


@pytest.mark.parametrize("cls, dcfg, count", [(VQModel, refs.VQ_F4, 55_322_782), (AutoencoderKL, refs.KL_F8, None)])
def test_full_size_vq_f4_and_kl_f8_convert(cls, dcfg, count):
    with torch.device("meta"):
        m = cls(**dcfg)
    cfg, ch = _ae_cfg(cls, dcfg)
    params = convert.autoencoder_from_diffusers(refs.shape_state(m), cfg, ch)
    assert convert.count_params(params) == sum(p.numel() for p in m.parameters())
    if count is not None:  # LDM-4 Bedrooms' first stage is exactly VQ-f4
        assert convert.count_params(params) == count
        convert.check_autoencoder_config(ldm4_bedrooms.get_config(), convert.diffusers_autoencoder_config(
            {"_class_name": "VQModel", **dcfg}))


def test_posterior_latents():
    mean = jnp.full((1, 64, 64, 2), 3.0)
    logvar = jnp.full((1, 64, 64, 2), 2 * np.log(0.5))
    moments = jnp.concatenate([mean, logvar], axis=-1)
    z = posterior_latents("kl", moments, jax.random.key(0), sample=True)
    assert z.shape == mean.shape
    np.testing.assert_allclose(float(z.mean()), 3.0, atol=0.02)
    np.testing.assert_allclose(float(z.std()), 0.5, atol=0.02)
    np.testing.assert_array_equal(posterior_latents("kl", moments, None, sample=False), mean)
    huge = jnp.concatenate([mean, jnp.full_like(logvar, 100.0)], axis=-1)  # logvar clipped at 20
    assert float(jnp.abs(posterior_latents("kl", huge, jax.random.key(1), True) - 3).max()) < 6 * np.exp(10)
    np.testing.assert_array_equal(posterior_latents("vq", mean, None, sample=True), mean)


def test_vector_quantizer_picks_nearest_code():
    codebook = np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32)
    z = np.random.default_rng(1).standard_normal((2, 4, 4, 3)).astype(np.float32)
    vq = ae_lib.VectorQuantizer(16, 3)
    out = np.asarray(vq.apply({"params": {"embedding": codebook}}, jnp.asarray(z)))
    nearest = codebook[np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)]
    np.testing.assert_array_equal(out, nearest)


def test_bfloat16_compute_is_close_to_float32():
    cfg, ch = _ae_cfg(AutoencoderKL, refs.KL_SMALL)
    ae32 = Autoencoder.from_config(cfg, ch)
    params = ae_lib.random_params(ae32, seed=0)
    cfg.dtype = "bfloat16"
    ae16 = Autoencoder.from_config(cfg, ch)
    x = _nhwc(_images(ch))
    a = _apply(ae32, params, Autoencoder.encode, x)
    b = _apply(ae16, params, Autoencoder.encode, x)
    assert b.dtype == jnp.float32  # moments come back in float32
    err = refs.rel_err(b, a)
    assert 1e-5 < err < 5e-2  # really computed in bfloat16, and still close


def test_save_and_load_params(tmp_path):
    cfg = default.get_config().autoencoder
    cfg.kind, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.norm_groups, cfg.n_embed = "vq", 8, (1, 2), 1, 4, 16
    ae = Autoencoder.from_config(cfg, 1)
    params = ae_lib.random_params(ae, seed=0)
    ae_lib.save_params(str(tmp_path / "ae"), cfg, 1, params, {"source": "test"})
    loaded = ae_lib.load_params(str(tmp_path / "ae"), cfg, 1)
    chex_equal = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, loaded)
    assert all(jax.tree.leaves(chex_equal))
    cfg.n_embed = 32
    with pytest.raises(ae_lib.AutoencoderError, match=r"autoencoder\.n_embed=16 .* says 32"):
        ae_lib.load_params(str(tmp_path / "ae"), cfg, 1)
    cfg.n_embed = 16
    with pytest.raises(ae_lib.AutoencoderError, match=r"data\.channels=1"):
        ae_lib.load_params(str(tmp_path / "ae"), cfg, 3)
    with pytest.raises(ae_lib.AutoencoderError, match="no autoencoder.json"):
        ae_lib.load_params(str(tmp_path), cfg, 1)
