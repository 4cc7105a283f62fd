"""LDM-4 ImageNet, class-conditional (CompVis cin256-v2.yaml), SPEC §8/§11: a UNet with SpatialTransformers
(self-attention, cross-attention to the class, GEGLU MLP) on 64x64x3 latents of the VQ-f4 autoencoder; the
class enters as CompVis' ClassEmbedder (1001 x 512 table: the 1000 ImageNet classes and class 1000, the
"unconditional" label of classifier-free guidance) built into the UNet (model.cond_stage='class').

Pretrained weights (cin256-v2 model.ckpt of the LDM ImageNet notebook,
https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt: UNet, ClassEmbedder, VQ-f4; no EMA copy):
    python -m bdm_jax.convert --kind=ldm --input=models/ldm/cin256-v2/model.ckpt \\
        --config=configs/ldm4_imagenet.py --out=workdirs/imagenet_fp
BinaryDM W1A4 (only the UNet is binarized, SPEC §7; the class table stays FP; prepare the data once with
`tfds build imagenet2012 --data_dir=/data/tfds --file_format=array_record`, after placing the ImageNet tars
in tfds' manual_dir):
    python train.py --config=configs/ldm4_imagenet.py --workdir=workdirs/imagenet_w1a4 --config.method=binarydm \\
        --config.quant.act_bits=4 --config.data.data_dir=/data/tfds --config.teacher_workdir=workdirs/imagenet_fp \\
        --config.autoencoder.path=workdirs/imagenet_fp/autoencoder
    python evaluate.py --workdir=workdirs/imagenet_w1a4 --inception_weights=pt_inception-2015-12-05-6726825d.pth
Evaluation as the paper's (SPEC §8): DDIM 20 steps (sample.steps below), eta 0; samples cycle through the
1000 classes. Classifier-free guidance is off by default (`--config.sample.guidance_scale=3.0` is the LDM
ImageNet notebook's setting; class 1000 is model.uncond_label); QAT with `--config.train.label_dropout=0.1`
keeps the student's unconditional path trained. SPEC.md carries no ImageNet number to compare with. There is no official BinaryDM ImageNet config; training settings follow configs/ldm4_bedrooms.py.
"""

from configs import ldm4_bedrooms


def get_config():
    c = ldm4_bedrooms.get_config()  # VQ-f4 first stage, sqrt_linear schedule, QAT settings
    c.data.name = "tfds:imagenet2012"
    c.data.random_flip = False
    # The class table has one row more than the data has classes: unlink model.num_classes from data.*.
    del c.model["num_classes"]
    c.data.num_classes = 1000
    c.model.num_classes = 1001  # ClassEmbedder n_classes of cin256-v2.yaml
    c.model.model_channels = 192
    c.model.channel_mult = (1, 2, 3, 5)  # latent resolutions 64, 32, 16, 8
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (32, 16, 8)  # the yaml's downsample rates 2, 4, 8
    c.model.num_heads = 1  # cin256-v2.yaml: num_heads 1, no num_head_channels (one head of the full width)
    c.model.num_head_channels = -1
    c.model.use_spatial_transformer = True
    c.model.transformer_depth = 1
    c.model.context_dim = 512
    c.model.cond_stage = "class"
    c.model.uncond_label = 1000  # the "no class" row of the table (classifier-free guidance)
    c.diffusion.beta_end = 0.0195
    c.sample.steps = 20
    return c
