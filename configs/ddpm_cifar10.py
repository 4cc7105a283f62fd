"""DDPM CIFAR-10 32x32 (Ho et al.; diffusers google/ddpm-cifar10-32), SPEC §11: 35,746,307 params.

FP:       python train.py --config=configs/ddpm_cifar10.py --workdir=workdirs/cifar10_fp
BinaryDM: python train.py --config=configs/ddpm_cifar10.py --workdir=workdirs/cifar10_bdm \
            --config.method=binarydm --config.teacher_workdir=workdirs/cifar10_fp
Paper (ICLR version, DDIM 100): FP IS/FID 8.90/5.54; W1A32 baseline 7.84/22.59, BinaryDM 8.28/11.92.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.name = "tfds:cifar10"
    c.data.image_size = 32
    c.data.channels = 3
    c.data.random_flip = True
    c.model.model_channels = 128
    c.model.channel_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (16,)
    c.model.dropout = 0.1
    c.diffusion.beta_schedule = "linear"
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.train.batch_size = 64
    c.train.steps = 200_000
    c.train.lr = 2e-5  # QAT: 1/10 of the FP lr (SPEC §7)
    c.train.ema_decay = 0.9999
    c.train.save_every = 5000
    c.train.log_every = 100
    return c
