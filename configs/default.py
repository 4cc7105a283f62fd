"""Defaults for every bdm-jax run; the other configs import this and override.

Every field is documented where it is set. `bdm_jax.config.validate` checks all of them at start-up.
Run: python train.py --config=configs/default.py --workdir=/tmp/run --config.train.steps=100
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Which checkpoint a workdir resumes from. latest: the newest complete one; if it cannot be restored
    # (truncated, unreadable, other config) stop and say why. latest_good: move such a checkpoint to
    # <workdir>/checkpoints_rejected/ and fall back to the previous one. Interrupted saves are always skipped.
    c.resume = "latest"  # latest | latest_good
    # fp: train a full-precision model. baseline: naive binarization (one basis everywhere except the
    # SPEC §3 FP layers, no LRM, no progressive). binarydm: everything of SPEC §2-§7.
    c.method = "fp"

    image_size = config_dict.FieldReference(16)
    channels = config_dict.FieldReference(1)
    num_classes = config_dict.FieldReference(0)

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # digits | synthetic | folder | tfds:<name>
    c.data.image_size = image_size
    c.data.channels = channels
    c.data.num_classes = num_classes
    c.data.random_flip = False
    c.data.data_dir = ""  # tfds data_dir or the image folder
    c.data.size = 1024  # synthetic only

    c.model = ml_collections.ConfigDict()
    c.model.image_size = image_size
    c.model.in_channels = channels
    c.model.out_channels = channels
    c.model.num_classes = num_classes
    c.model.model_channels = 64
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (8,)  # feature-map sizes (pixels) that get self-attention
    c.model.num_heads = 1
    c.model.num_head_channels = -1  # > 0 overrides num_heads with channels // num_head_channels
    c.model.dropout = 0.0
    c.model.norm_groups = 32
    c.model.dtype = "float32"  # compute dtype; params are always float32 (bfloat16 on accelerators)
    # Numerics conventions (no effect on param shapes). Defaults: LDM openaimodel. The original DDPM
    # (diffusers google/ddpm-cifar10-32, configs/ddpm_cifar10.py) uses False, 1, 1e-6, 0.
    c.model.flip_sin_to_cos = True  # time embedding [cos | sin] (True) or [sin | cos] (False)
    c.model.freq_shift = 0  # time-embedding freqs exp(-ln(1e4) i / (half - freq_shift)), i < half
    c.model.norm_eps = 1e-5  # GroupNorm epsilon
    c.model.downsample_padding = 1  # 1: conv pad 1; 0: pad bottom/right by 1 then conv pad 0 (TF "SAME")
    # Attention core (bdm_jax.attention): auto = unquantized: cuDNN flash attention on GPU in bf16/fp16, else
    # XLA; LSQ-quantized softmax output: the flash_lsq Pallas kernel on one GPU in bf16/fp16, else explicit.
    # explicit = einsum/softmax/einsum; xla / cudnn force those for unquantized attention; pallas = flash_lsq
    # for every attention it can tile (interpreted off GPU: slow, for tests). Same function in every case.
    c.model.attention_impl = "auto"
    # LDM openaimodel variants (all off: the DDPM / LDM-4 Bedrooms UNet). Shape-relevant: a checkpoint of
    # one setting does not load into another.
    c.model.use_scale_shift_norm = False  # ResBlock FiLM: out_norm(h) * (1 + scale) + shift from the embedding
    c.model.resblock_updown = False  # downsample/upsample with ResBlocks (avg-pool / nearest) instead of convs
    # SpatialTransformer (self- + cross-attention + GEGLU MLP) instead of AttentionBlock at the attention
    # resolutions and in the middle; heads from num_heads / num_head_channels as for AttentionBlock.
    c.model.use_spatial_transformer = False
    c.model.transformer_depth = 1  # transformer blocks per SpatialTransformer
    c.model.context_dim = 512  # channels of the cross-attention context
    # Where the cross-attention context comes from. none: no context (no spatial transformer; with
    # num_classes > 0 the labels are added to the time embedding, ADM's label_emb). class: CompVis'
    # ClassEmbedder inside the UNet, an FP num_classes x context_dim table giving context embedding(y)[:, None].
    c.model.cond_stage = "none"  # none | class
    # The label that means "no class" for classifier-free guidance (cin256-v2: 1000, the extra row of its
    # 1001-row class table); -1: the model has none. Not a shape field.
    c.model.uncond_label = -1

    # Latent diffusion (SPEC §7, §11): a frozen FP first-stage autoencoder maps images to latents; only the
    # UNet is trained/binarized. The UNet then sees model.image_size = data.image_size / 2**(len(ch_mult)-1)
    # and model.in/out_channels = embed_dim (the LDM configs set both). Architecture fields use the names
    # of the CompVis ddconfig; `python -m bdm_jax.convert` writes `path` from a pretrained checkpoint.
    c.autoencoder = ml_collections.ConfigDict()
    c.autoencoder.kind = "none"  # none (pixel space) | vq (VQModel, e.g. VQ-f4) | kl (AutoencoderKL, e.g. KL-f8)
    c.autoencoder.path = ""  # converted autoencoder dir; "" = random init from `seed` (tests/smoke runs only)
    c.autoencoder.scale_factor = 1.0  # latents = scale_factor * encoder output (LDM: 1.0 for VQ-f4)
    c.autoencoder.sample_posterior = True  # kl: sample the posterior (LDM) instead of taking its mean
    c.autoencoder.cache_latents = False  # encode the dataset once to disk instead of every step
    c.autoencoder.cache_dir = ""  # "" = <workdir>/latent_cache
    c.autoencoder.dtype = "float32"  # compute dtype of the frozen autoencoder
    c.autoencoder.ch = 128
    c.autoencoder.ch_mult = (1, 2, 4)
    c.autoencoder.num_res_blocks = 2
    c.autoencoder.z_channels = 3
    c.autoencoder.embed_dim = 3  # latent channels seen by the UNet
    c.autoencoder.n_embed = 8192  # vq: codebook size
    c.autoencoder.norm_groups = 32

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.beta_schedule = "linear"  # linear | sqrt_linear (LDM "linear") | cosine
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.diffusion.timesteps = 1000

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64  # global batch
    c.train.steps = 1000
    c.train.lr = 2e-4
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0  # global-norm clip; 0 disables
    c.train.ema_decay = 0.999
    c.train.log_every = 50
    c.train.save_every = 500
    c.train.sample_every = 0  # 0: only at the end
    c.train.keep_checkpoints = 2
    # A NaN/inf loss term or gradient norm: stop (naming the step and the terms), or roll back to the last
    # checkpoint and skip that step's batch (the skip list is kept in <workdir>/skipped_batches.json).
    c.train.nan_policy = "stop"  # stop | rollback
    # Probability of replacing a training label by model.uncond_label (classifier-free guidance training);
    # the teacher and the student see the same labels.
    c.train.label_dropout = 0.0

    # BinaryDM (SPEC §2-§7). Placeholders (None) take the value of `method`'s preset; set them to ablate.
    c.quant = ml_collections.ConfigDict()
    c.quant.act_bits = 32  # 32 (off) | 8 | 4
    # LSQ step: learned (SPEC §4 decision: initialised once, then learned) | dynamic (the official code's
    # accidental behaviour: recomputed as 2 mean|x| / sqrt(Qp) from every input, no gradient).
    c.quant.act_scale = "learned"
    c.quant.num_bases = 2  # k of the multi-basis layers
    c.quant.multi_basis = config_dict.placeholder(bool)  # binarydm: True
    # Which blocks are multi-basis: -1 = by resolution (>= head_tail_min_ratio of the input, SPEC §3),
    # N >= 0 = the first and last N blocks (paper Table 9/10 ablation: 0, 3, 6, 12).
    c.quant.head_tail_blocks = -1
    c.quant.head_tail_min_ratio = 0.5
    c.quant.fp_layers = r"^(time_embed_\d+|conv_in|conv_out|label_emb)$"
    # Extra rules, applied last, in order: "regex=fp" | "regex=1" | "regex=2" (bases). Each must match a layer.
    c.quant.rules = ()
    c.quant.quantize_attention = config_dict.placeholder(bool)  # default: True when act_bits < 32
    c.quant.lrm = config_dict.placeholder(str)  # pca | mse | none ; binarydm: pca
    c.quant.lrm_k = 4
    c.quant.lrm_lambda = 1e-4
    # LRM projection operands: features = the features' dtype (bf16 under bf16 compute, float32 accumulation);
    # float32 = float32 at HIGHEST precision (the only behaviour before issue 9's change 4).
    c.quant.lrm_precision = "features"
    c.quant.progressive = config_dict.placeholder(bool)  # binarydm: True
    c.quant.progressive_interval = 1  # steps between rings (SPEC §6)
    c.quant.progressive_grouping = "block"  # block | level
    c.quant.ebb = False  # SPEC §2 EBB
    c.quant.ebb_tau = 9e-2
    c.quant.ebb_transition_step = -1  # step after which the second basis is dropped; -1 = never

    # Teacher for QAT: a workdir of an FP run. Empty with method != fp: pretrain one first in
    # <workdir>/teacher with `pretrain` overriding `train`.
    c.teacher_workdir = ""
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.steps = 1000
    c.pretrain.lr = 2e-4

    # Device mesh (SPEC/issue "Scale-out"): axis sizes, -1 = all remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.fsdp_min_size = 2**16  # with fsdp > 1, only arrays of at least this many elements are split

    c.sample = ml_collections.ConfigDict()
    c.sample.num = 64
    c.sample.batch_size = 64
    c.sample.sampler = "ddim"  # ddim | ddpm
    c.sample.steps = 100
    c.sample.eta = 0.0
    c.sample.spacing = "uniform"  # uniform | quadratic
    c.sample.clip_denoised = True
    # Classifier-free guidance of class-conditional models: eps_u + s (eps_c - eps_u) with eps_u at
    # model.uncond_label (one batched forward of 2N). 1.0 = off (plain conditional sampling).
    c.sample.guidance_scale = 1.0
    c.sample.seed = 0
    return c
