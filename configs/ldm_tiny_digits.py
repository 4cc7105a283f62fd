"""Tiny latent diffusion for tests and smoke runs: 16x16 digits -> a tiny RANDOMLY initialised KL-f2
autoencoder (8x8x2 latents) -> a 2-level UNet; FP teacher then BinaryDM, a few steps each.

    python train.py --config=configs/ldm_tiny_digits.py --workdir=/tmp/ldm_tiny
    python sample.py --workdir=/tmp/ldm_tiny --num=16

It checks the plumbing (encode -> train/binarize the UNet on latents -> decode samples), not quality:
a random autoencoder's latents carry the images only as a random conv net does.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.method = "binarydm"
    c.data.name = "digits"
    c.data.image_size = 16
    c.data.channels = 1
    for key in ("image_size", "in_channels", "out_channels"):
        del c.model[key]
    c.model.image_size = 8
    c.model.in_channels = 2
    c.model.out_channels = 2
    c.model.model_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (4,)
    c.model.norm_groups = 8
    c.autoencoder.kind = "kl"
    c.autoencoder.path = ""  # random init from config.seed
    c.autoencoder.ch = 8
    c.autoencoder.ch_mult = (1, 2)
    c.autoencoder.num_res_blocks = 1
    c.autoencoder.z_channels = 2
    c.autoencoder.embed_dim = 2
    c.autoencoder.norm_groups = 4
    c.autoencoder.scale_factor = 1.0
    c.diffusion.timesteps = 100
    c.train.batch_size = 8
    c.train.steps = 2
    c.train.warmup_steps = 1
    c.train.log_every = 1
    c.train.save_every = 2
    c.pretrain.steps = 2
    c.sample.num = 4
    c.sample.batch_size = 4
    c.sample.steps = 5
    c.sample.clip_denoised = False
    return c
