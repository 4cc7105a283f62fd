"""The README main job: scikit-learn's digits (1,797 real 8x8 handwritten digits) at 16x16, on a CPU.

    python train.py --config=configs/digits.py --workdir=workdirs/digits

With no teacher_workdir this first trains the FP teacher (pretrain.steps) in workdirs/digits/teacher,
then binarizes it with BinaryDM (train.steps) in workdirs/digits, and writes sample grids of both.
Variants: --config.method=fp (teacher only), --config.method=baseline, --config.quant.act_bits=4.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.method = "binarydm"
    c.data.name = "digits"
    c.data.image_size = 16
    c.data.channels = 1
    c.model.model_channels = 32  # sized so FP + BinaryDM + report fit ~20 min on a 2-core CPU
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (8,)
    c.model.dropout = 0.0
    c.diffusion.timesteps = 1000
    c.train.batch_size = 32
    c.train.steps = 1000
    c.train.lr = 2e-4  # QAT
    c.train.warmup_steps = 50
    c.train.ema_decay = 0.995
    c.train.log_every = 50
    c.train.save_every = 500
    c.pretrain.steps = 2500
    c.pretrain.lr = 1e-3
    c.quant.progressive_interval = 20
    c.sample.num = 64
    c.sample.steps = 50
    return c
