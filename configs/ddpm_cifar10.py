"""DDPM CIFAR-10 32x32 (Ho et al.; diffusers google/ddpm-cifar10-32), SPEC §11: 35,746,307 params.

FP:       python train.py --config=configs/ddpm_cifar10.py:fp --workdir=workdirs/cifar10_fp \
            --config.train.lr=2e-4 --config.train.steps=800000 --config.train.batch_size=128
BinaryDM: python train.py --config=configs/ddpm_cifar10.py:binarydm_w1a4 --workdir=workdirs/cifar10_bdm_w1a4 \
            --config.teacher_workdir=workdirs/cifar10_fp
          (variants: fp, baseline_w1a32, baseline_w1a8, baseline_w1a4, binarydm_w1a32, binarydm_w1a8, binarydm_w1a4;
          QAT settings: batch 64, lr 2e-5 = 1/10 of the FP lr, 200k iterations, SPEC §7)
Paper (ICLR version, DDIM 100): FP IS/FID 8.90/5.54; W1A32 baseline 7.84/22.59, BinaryDM 8.28/11.92.

Pretrained teacher (diffusers google/ddpm-cifar10-32, downloaded to ddpm-cifar10-32/):
    python -m bdm_jax.convert --kind=unet --format=diffusers --input=ddpm-cifar10-32 \
        --config=configs/ddpm_cifar10.py --out=workdirs/cifar10_fp
"""

from configs import default


VARIANTS = {
    # name: (method, act_bits); paper (ICLR version) IS/FID in the comment.
    "fp": ("fp", 32),  # 8.90 / 5.54
    "baseline_w1a32": ("baseline", 32),  # 7.84 / 22.59
    "baseline_w1a8": ("baseline", 8),
    "baseline_w1a4": ("baseline", 4),  # 5.92 / 100.17
    "binarydm_w1a32": ("binarydm", 32),  # 8.28 / 11.92
    "binarydm_w1a8": ("binarydm", 8),
    "binarydm_w1a4": ("binarydm", 4),  # 6.48 / 87.77
}


def get_config(variant: str = "fp"):
    """`--config=configs/ddpm_cifar10.py:binarydm_w1a4` picks a row of the paper's CIFAR-10 table."""
    if variant not in VARIANTS:
        raise ValueError(f"configs/ddpm_cifar10.py:{variant} is not one of {', '.join(VARIANTS)}")
    c = default.get_config()
    c.method, c.quant.act_bits = VARIANTS[variant]
    c.data.name = "tfds:cifar10"
    c.data.image_size = 32
    c.data.channels = 3
    c.data.random_flip = True
    c.model.model_channels = 128
    c.model.channel_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (16,)
    c.model.dropout = 0.1
    # The original DDPM's numerics (and diffusers' port of it): needed to use its converted weights as teacher.
    c.model.flip_sin_to_cos = False
    c.model.freq_shift = 1
    c.model.norm_eps = 1e-6
    c.model.downsample_padding = 0
    c.diffusion.beta_schedule = "linear"
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    if c.method == "fp":  # Ho et al.: batch 128, lr 2e-4 with 5k warmup, 800k steps
        c.train.batch_size = 128
        c.train.steps = 800_000
        c.train.lr = 2e-4
        c.train.warmup_steps = 5000
    else:  # paper's QAT: batch 64, lr 1/10 of the FP lr, ~200k iterations (SPEC §7)
        c.train.batch_size = 64
        c.train.steps = 200_000
        c.train.lr = 2e-5
    c.train.ema_decay = 0.9999
    c.train.save_every = 5000
    c.train.log_every = 100
    return c
