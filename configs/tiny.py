"""A tiny config for tests and smoke runs: 8x8 digits, a 2-level UNet of 32 channels, a few steps.

    python train.py --config=configs/tiny.py --workdir=/tmp/tiny
"""

from configs import default


def get_config():
    c = default.get_config()
    c.method = "fp"
    c.data.name = "digits"
    c.data.image_size = 8
    c.model.model_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (4,)
    c.model.norm_groups = 8
    c.diffusion.timesteps = 100
    c.train.batch_size = 8
    c.train.steps = 2
    c.train.warmup_steps = 1
    c.train.log_every = 1
    c.train.save_every = 1
    c.pretrain.steps = 2
    c.sample.num = 4
    c.sample.batch_size = 4
    c.sample.steps = 5
    return c
