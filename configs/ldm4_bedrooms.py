"""LDM-4 LSUN-Bedrooms (official bedrooms.yaml), SPEC §11: a 274,056,163-param UNet on 64x64x3 latents of
the VQ-f4 autoencoder (256x256 images, 8192 codes, scale factor 1).

Pretrained weights (CompVis latent-diffusion `lsun_bedrooms` model.ckpt, UNet and first stage in one file):
    python -m bdm_jax.convert --kind=ldm --input=models/ldm/lsun_beds256/model.ckpt \\
        --config=configs/ldm4_bedrooms.py --out=workdirs/bedrooms_fp
BinaryDM (only the UNet is binarized; the autoencoder stays FP, SPEC §7):
    python train.py --config=configs/ldm4_bedrooms.py --workdir=workdirs/bedrooms_bdm --config.method=binarydm \\
        --config.teacher_workdir=workdirs/bedrooms_fp --config.autoencoder.path=workdirs/bedrooms_fp/autoencoder
Paper (LDM-4 Bedrooms, DDIM 100, FID): FP 3.09; W1A32 baseline 26.43 -> BinaryDM 6.42; W1A4 39.69 -> 7.11.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.name = "tfds:lsun/bedroom"
    c.data.image_size = 256
    c.data.channels = 3
    # The UNet sees latents: unlink model.image_size / in / out channels from data.* (default.py ties them).
    for key in ("image_size", "in_channels", "out_channels"):
        del c.model[key]
    c.model.image_size = 64
    c.model.in_channels = 3
    c.model.out_channels = 3
    c.model.model_channels = 224
    c.model.channel_mult = (1, 2, 3, 4)
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (32, 16, 8)
    c.model.num_head_channels = 32
    c.model.dropout = 0.0
    # VQ-f4 (models/first_stage_models/vq-f4/config.yaml).
    c.autoencoder.kind = "vq"
    c.autoencoder.ch = 128
    c.autoencoder.ch_mult = (1, 2, 4)
    c.autoencoder.num_res_blocks = 2
    c.autoencoder.z_channels = 3
    c.autoencoder.embed_dim = 3
    c.autoencoder.n_embed = 8192
    c.autoencoder.scale_factor = 1.0
    c.diffusion.beta_schedule = "sqrt_linear"
    c.diffusion.beta_start = 0.0015
    c.diffusion.beta_end = 0.0195
    set_ldm_qat_training(c)
    return c


def set_ldm_qat_training(c):
    """BinaryDM's QAT recipe for the LDM UNets (SPEC §7, official code): AdamW wd 0.01, lr 8e-5, batch 4,
    ~200k iterations, EMA; latent samples are not clipped to [-1, 1]. Shared by the LDM configs."""
    c.train.batch_size = 4
    c.train.lr = 8e-5
    c.train.steps = 200_000
    c.train.weight_decay = 0.01
    c.train.ema_decay = 0.9999
    c.train.save_every = 5000
    c.train.log_every = 100
    c.sample.clip_denoised = False
