"""LDM-4 FFHQ (CompVis ffhq-ldm-vq-4.yaml): the LDM-4 Bedrooms UNet and VQ-f4 first stage on 256x256 faces.

FFHQ is not in tensorflow-datasets: point data.data_dir at a folder of the 70k PNGs (data.name=folder).
Pretrained weights (CompVis latent-diffusion `ffhq` model.ckpt):
    python -m bdm_jax.convert --kind=ldm --input=models/ldm/ffhq256/model.ckpt \\
        --config=configs/ldm4_ffhq.py --out=workdirs/ffhq_fp
BinaryDM:
    python train.py --config=configs/ldm4_ffhq.py --workdir=workdirs/ffhq_bdm --config.method=binarydm \\
        --config.data.data_dir=/data/ffhq --config.teacher_workdir=workdirs/ffhq_fp \\
        --config.autoencoder.path=workdirs/ffhq_fp/autoencoder
The paper reports FFHQ among its LDM-4 results; SPEC.md §10 carries no FFHQ number to compare with.
"""

from configs import ldm4_bedrooms


def get_config():
    c = ldm4_bedrooms.get_config()
    c.data.name = "folder"
    c.data.data_dir = "/data/ffhq"  # a folder of PNG/JPEG files; override on the command line
    c.data.random_flip = False
    return c
