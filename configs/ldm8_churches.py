"""LDM-8 LSUN-Churches (CompVis lsun_churches-ldm-kl-8.yaml), SPEC §9/§11: a 294,966,916-param UNet with
scale-shift norm and ResBlock up/downsampling on 32x32x4 latents of the KL-f8 autoencoder (256x256 images).

Pretrained weights (CompVis latent-diffusion `lsun_churches.zip` -> model.ckpt: UNet, EMA copy, KL-f8 and the
scale_factor 0.22765929 that `scale_by_std` fixed, all in one file):
    python -m bdm_jax.convert --kind=ldm --input=models/ldm/lsun_churches256/model.ckpt \\
        --config=configs/ldm8_churches.py --out=workdirs/churches_fp
BinaryDM W1A4 (only the UNet is binarized, SPEC §7; prepare the data once with
`tfds build lsun/church_outdoor --data_dir=/data/tfds --file_format=array_record`):
    python train.py --config=configs/ldm8_churches.py --workdir=workdirs/churches_w1a4 --config.method=binarydm \\
        --config.quant.act_bits=4 --config.data.data_dir=/data/tfds --config.teacher_workdir=workdirs/churches_fp \\
        --config.autoencoder.path=workdirs/churches_fp/autoencoder
    python evaluate.py --workdir=workdirs/churches_w1a4 --inception_weights=pt_inception-2015-12-05-6726825d.pth
Efficiency (`python -m bdm_jax.efficiency --config=configs/ldm8_churches.py`), paper v1 (SPEC §9): LDM-8
Churches W1A4 17.36 -> 1.09 GFLOPs, 1125.2 -> 41.5 MB. SPEC.md gives no FID for Churches, so there is no
FID to compare with here (the LDM paper's FP model: FID 4.02 with 400 DDIM steps).
The CompVis model was trained with an L1 noise loss (loss_type: l1); BinaryDM's QAT uses the MSE of SPEC §7.
"""

from configs import default, ldm4_bedrooms


def get_config():
    c = default.get_config()
    c.data.name = "tfds:lsun/church_outdoor"
    c.data.image_size = 256
    c.data.channels = 3
    c.data.random_flip = True  # the LDM LSUN loader flips with p = 0.5
    # The UNet sees latents: unlink model.image_size / in / out channels from data.* (default.py ties them).
    for key in ("image_size", "in_channels", "out_channels"):
        del c.model[key]
    c.model.image_size = 32
    c.model.in_channels = 4
    c.model.out_channels = 4
    c.model.model_channels = 192
    c.model.channel_mult = (1, 2, 2, 4, 4)  # latent resolutions 32, 16, 8, 4, 2
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (32, 16, 8, 4)  # the yaml's downsample rates 1, 2, 4, 8
    c.model.num_heads = 8  # 8 heads at every width (num_head_channels unset in the yaml)
    c.model.num_head_channels = -1
    c.model.use_scale_shift_norm = True
    c.model.resblock_updown = True
    c.model.dropout = 0.0
    # KL-f8 (models/first_stage_models/kl-f8/config.yaml): double_z, no attention inside the levels.
    c.autoencoder.kind = "kl"
    c.autoencoder.ch = 128
    c.autoencoder.ch_mult = (1, 2, 4, 4)
    c.autoencoder.num_res_blocks = 2
    c.autoencoder.z_channels = 4
    c.autoencoder.embed_dim = 4
    c.autoencoder.scale_factor = 0.22765929  # the checkpoint's scale_factor (scale_by_std); convert checks it
    c.diffusion.beta_schedule = "sqrt_linear"
    c.diffusion.beta_start = 0.0015
    c.diffusion.beta_end = 0.0155
    ldm4_bedrooms.set_ldm_qat_training(c)  # the official LDM QAT recipe (SPEC §7)
    return c
