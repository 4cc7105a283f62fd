"""LDM-4 LSUN-Bedrooms UNet (official bedrooms.yaml), SPEC §11: 274,056,163 params, 64x64x3 VQ-f4 latents.

Paper (LDM-4 Bedrooms, DDIM 100, FID): FP 3.09; W1A32 baseline 26.43 -> BinaryDM 6.42; W1A4 39.69 -> 7.11.
The first-stage autoencoder arrives with the Pretrained-weights issue; until then this config trains
the UNet on latent-shaped inputs only (e.g. data.name=synthetic for benchmarks).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.name = "tfds:lsun/bedroom"
    c.data.image_size = 64
    c.data.channels = 3
    c.model.model_channels = 224
    c.model.channel_mult = (1, 2, 3, 4)
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (32, 16, 8)
    c.model.num_head_channels = 32
    c.model.dropout = 0.0
    c.diffusion.beta_schedule = "sqrt_linear"
    c.diffusion.beta_start = 0.0015
    c.diffusion.beta_end = 0.0195
    c.train.batch_size = 4
    c.train.lr = 8e-5
    c.train.steps = 200_000
    c.train.weight_decay = 0.01
    c.train.ema_decay = 0.9999
    c.train.save_every = 5000
    c.train.log_every = 100
    return c
