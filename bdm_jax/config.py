"""Config validation and method presets.

`validate(config)` runs at start-up, before anything touches JAX, and raises `ConfigError` with one
line naming the field, the value and what is allowed. `resolve_method` fills the BinaryDM switches that
were left as placeholders from the method preset (SPEC §2-§7; issue "methods selectable by config").
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import ml_collections

METHODS = ("fp", "baseline", "binarydm")
# Switch values per method; None-valued config placeholders take these.
PRESETS = {
    "fp": dict(multi_basis=False, lrm="none", progressive=False),
    "baseline": dict(multi_basis=False, lrm="none", progressive=False),
    "binarydm": dict(multi_basis=True, lrm="pca", progressive=True),
}


# Fields added after the first checkpoints were written; a config saved without them gets these values,
# which are the behaviour of the code that wrote it.
ADDED_MODEL_FIELDS = dict(flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, downsample_padding=1,
                          attention_impl="auto", use_scale_shift_norm=False, resblock_updown=False,
                          use_spatial_transformer=False, transformer_depth=1, context_dim=512, cond_stage="none",
                          uncond_label=-1)
COND_STAGES = ("none", "class")
AUTOENCODER_KINDS = ("none", "vq", "kl")
# Fields added later (reliability, issue 10; quant.act_scale), filled in configs saved before them.
ADDED_FIELDS = {"resume": "latest", "train.nan_policy": "stop", "quant.act_scale": "learned",
                "train.label_dropout": 0.0, "sample.guidance_scale": 1.0}


class ConfigError(ValueError):
    """A config value that is not allowed; the message is one line naming the field."""


def _fail(field: str, value: Any, allowed: str) -> None:
    shown = repr(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)
    shown = " ".join(shown.split()) if len(shown) <= 80 else " ".join(shown[:77].split()) + "..."  # one line
    raise ConfigError(f"config.{field}={shown} is not allowed: {allowed}")


def _check_int(cfg: Any, field: str, lo: int | None = None, hi: int | None = None) -> int:
    value = _get(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, value, "expected an integer")
    if lo is not None and value < lo:
        _fail(field, value, f"must be >= {lo}")
    if hi is not None and value > hi:
        _fail(field, value, f"must be <= {hi}")
    return value


def _check_float(cfg: Any, field: str, lo: float | None = None, hi: float | None = None, lo_open=False) -> float:
    value = _get(cfg, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        _fail(field, value, "expected a finite number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        _fail(field, value, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        _fail(field, value, f"must be <= {hi}")
    return float(value)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def _check_choice(cfg: Any, field: str, choices: Iterable[Any]) -> Any:
    value = _get(cfg, field)
    choices = tuple(choices)
    if value not in choices:
        _fail(field, value, "one of " + ", ".join(map(str, choices)))
    return value


def _check_bool(cfg: Any, field: str) -> bool:
    value = _get(cfg, field)
    if not isinstance(value, bool):
        _fail(field, value, "expected True or False")
    return value


def _get(cfg: Any, field: str) -> Any:
    node = cfg
    for part in field.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            raise ConfigError(f"config.{field} is missing (compare with configs/default.py)")
        node = node[part]
    return node


def resolve_method(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Return a copy of `config` whose quant switches are concrete (method preset for placeholders)."""
    cfg = ml_collections.ConfigDict(config.to_dict())
    _check_kinds(cfg)  # first: a value of the wrong kind anywhere is named before any value of the right kind
    _check_choice(cfg, "method", METHODS)
    preset = PRESETS[cfg.method]
    with cfg.unlocked():
        for field, value in ADDED_FIELDS.items():
            group, _, key = field.rpartition(".")
            node = cfg[group] if group else cfg
            if key not in node:
                node[key] = value
        if "model" in cfg:
            for key, value in ADDED_MODEL_FIELDS.items():
                if key not in cfg.model:
                    cfg.model[key] = value
        if "autoencoder" not in cfg:
            from configs.default import get_config as _default_config

            cfg.autoencoder = _default_config().autoencoder
        for key, value in preset.items():
            if cfg.quant[key] is None:
                cfg.quant[key] = value
        if cfg.quant.quantize_attention is None:
            cfg.quant.quantize_attention = cfg.quant.act_bits < 32
    return cfg


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check every field; return the resolved config (resolve_method). Raises ConfigError."""
    cfg = resolve_method(config)
    _check_int(cfg, "seed", 0)
    _check_choice(cfg, "resume", ("latest", "latest_good"))
    _check_choice(cfg, "train.nan_policy", ("stop", "rollback"))
    _check_int(cfg, "data.size", 1)
    for f in ("data", "fsdp"):
        if _check_int(cfg, f"mesh.{f}", -1) == 0:
            _fail(f"mesh.{f}", 0, "-1 (all remaining devices) or a positive axis size")
    if "fsdp_min_size" in cfg.mesh:
        _check_int(cfg, "mesh.fsdp_min_size", 0)

    # data
    name = _get(cfg, "data.name")
    if not isinstance(name, str) or not (name in ("digits", "synthetic", "folder") or name.startswith("tfds:")):
        _fail("data.name", name, "digits, synthetic, folder or tfds:<dataset name>")
    _check_int(cfg, "data.image_size", 4)
    _check_choice(cfg, "data.channels", (1, 3, 4))
    _check_int(cfg, "data.num_classes", 0)
    _check_bool(cfg, "data.random_flip")
    if name == "folder" and not cfg.data.data_dir:
        _fail("data.data_dir", cfg.data.data_dir, "data.name=folder needs the image directory in data.data_dir")

    # model
    m = cfg.model
    _check_int(cfg, "model.image_size", 1)
    for f in ("in_channels", "out_channels", "num_heads"):
        _check_int(cfg, f"model.{f}", 1)
    _check_int(cfg, "model.num_classes", 0)
    _check_int(cfg, "model.num_head_channels")
    _check_int(cfg, "model.model_channels", 1)
    _check_int(cfg, "model.num_res_blocks", 1)
    _check_int(cfg, "model.norm_groups", 1)
    _check_float(cfg, "model.dropout", 0.0, 0.99)
    _check_choice(cfg, "model.dtype", ("float32", "bfloat16", "float16"))
    mult = _get(cfg, "model.channel_mult")
    if not isinstance(mult, (tuple, list)) or not mult or not all(isinstance(x, int) and x >= 1 for x in mult):
        _fail("model.channel_mult", mult, "a non-empty tuple of positive integers, e.g. (1, 2, 2, 2)")
    factor = 2 ** (len(mult) - 1)
    if m.image_size % factor:
        _fail("model.image_size", m.image_size,
              f"must be divisible by 2**(len(channel_mult)-1) = {factor} (the UNet downsamples {len(mult) - 1} times)")
    levels = [m.image_size // 2**i for i in range(len(mult))]
    attn = _get(cfg, "model.attention_resolutions")
    if not isinstance(attn, (tuple, list)) or any(r not in levels for r in attn):
        _fail("model.attention_resolutions", attn, f"feature-map sizes of this model: a subset of {tuple(levels)}")
    widths = {m.model_channels * x for x in mult}
    for w in sorted(widths):
        if w % m.norm_groups:
            _fail("model.norm_groups", m.norm_groups, f"must divide every level's channel count (not {w})")
        if m.num_head_channels > 0 and w % m.num_head_channels:
            _fail("model.num_head_channels", m.num_head_channels, f"must divide every level's channel count (not {w})")
        if m.num_head_channels <= 0 and w % m.num_heads:
            _fail("model.num_heads", m.num_heads, f"must divide every level's channel count (not {w})")

    _check_bool(cfg, "model.flip_sin_to_cos")
    _check_float(cfg, "model.freq_shift", 0.0)
    if m.freq_shift >= m.model_channels // 2:
        _fail("model.freq_shift", m.freq_shift, f"must be < model_channels // 2 = {m.model_channels // 2}")
    _check_float(cfg, "model.norm_eps", 0.0, 1.0, lo_open=True)
    _check_choice(cfg, "model.downsample_padding", (0, 1))
    _check_choice(cfg, "model.attention_impl", ("auto", "explicit", "xla", "cudnn", "pallas"))
    _validate_ldm_variants(cfg)
    _validate_guidance(cfg)

    _validate_autoencoder(cfg)

    # diffusion
    _check_choice(cfg, "diffusion.beta_schedule", ("linear", "sqrt_linear", "cosine"))
    _check_int(cfg, "diffusion.timesteps", 1)
    b0 = _check_float(cfg, "diffusion.beta_start", 0.0, 1.0, lo_open=True)
    b1 = _check_float(cfg, "diffusion.beta_end", 0.0, 1.0, lo_open=True)
    if b0 > b1:
        _fail("diffusion.beta_start", b0, f"must be <= diffusion.beta_end ({b1})")

    # train
    for f in ("train", "pretrain"):
        _check_int(cfg, f"{f}.steps", 0)
        _check_float(cfg, f"{f}.lr", 0.0, 1.0, lo_open=True)
    _check_int(cfg, "train.batch_size", 1)
    _check_int(cfg, "train.warmup_steps", 0)
    _check_float(cfg, "train.weight_decay", 0.0)
    _check_float(cfg, "train.grad_clip", 0.0)
    _check_float(cfg, "train.ema_decay", 0.0, 1.0)
    _check_int(cfg, "train.log_every", 1)
    _check_int(cfg, "train.save_every", 1)
    _check_int(cfg, "train.sample_every", 0)
    _check_int(cfg, "train.keep_checkpoints", 1)

    # quant
    q = cfg.quant
    _check_choice(cfg, "quant.act_bits", (4, 8, 32))
    _check_int(cfg, "quant.num_bases", 1, 8)
    _check_bool(cfg, "quant.multi_basis")
    _check_int(cfg, "quant.head_tail_blocks", -1)
    _check_float(cfg, "quant.head_tail_min_ratio", 0.0, 1.0)
    _check_choice(cfg, "quant.lrm", ("pca", "mse", "none"))
    k = _check_int(cfg, "quant.lrm_k", 1)
    if q.lrm == "pca" and cfg.method != "fp":
        narrowest = min(widths | {m.model_channels})
        if k > narrowest:
            _fail("quant.lrm_k", k, f"must be <= the channels of every block (the narrowest has {narrowest})")
    _check_float(cfg, "quant.lrm_lambda", 0.0)
    _check_choice(cfg, "quant.lrm_precision", ("features", "float32"))
    _check_bool(cfg, "quant.progressive")
    _check_int(cfg, "quant.progressive_interval", 1)
    _check_choice(cfg, "quant.progressive_grouping", ("block", "level"))
    _check_bool(cfg, "quant.ebb")
    _check_float(cfg, "quant.ebb_tau", 0.0)
    _check_int(cfg, "quant.ebb_transition_step", -1)
    _check_bool(cfg, "quant.quantize_attention")
    _check_choice(cfg, "quant.act_scale", ("learned", "dynamic"))
    if q.fp_layers:
        try:
            re.compile(q.fp_layers)
        except re.error as e:
            _fail("quant.fp_layers", q.fp_layers, f"a valid regular expression ({e})")
    if not isinstance(q.rules, (tuple, list)) or not all(isinstance(r, str) for r in q.rules):
        _fail("quant.rules", q.rules, "a tuple of 'regex=fp|1|2' strings")
    if not isinstance(cfg.teacher_workdir, str):
        _fail("teacher_workdir", cfg.teacher_workdir, "a path (string)")

    # sample
    _check_int(cfg, "sample.num", 1)
    _check_int(cfg, "sample.batch_size", 1)
    _check_choice(cfg, "sample.sampler", ("ddim", "ddpm"))
    _check_int(cfg, "sample.steps", 1, cfg.diffusion.timesteps)
    _check_float(cfg, "sample.eta", 0.0)
    _check_choice(cfg, "sample.spacing", ("uniform", "quadratic"))
    _check_bool(cfg, "sample.clip_denoised")
    _check_int(cfg, "sample.seed", 0)
    return cfg


def _validate_ldm_variants(cfg: ml_collections.ConfigDict) -> None:
    """Scale-shift norm, resampling ResBlocks, SpatialTransformer and the class-embedder context (SPEC §11)."""
    m = cfg.model
    for f in ("use_scale_shift_norm", "resblock_updown", "use_spatial_transformer"):
        _check_bool(cfg, f"model.{f}")
    _check_int(cfg, "model.transformer_depth", 1)
    _check_int(cfg, "model.context_dim", 1)
    stage = _check_choice(cfg, "model.cond_stage", COND_STAGES)
    if stage == "class":
        if not m.use_spatial_transformer:
            _fail("model.cond_stage", stage, "'class' feeds cross-attention: needs model.use_spatial_transformer=True")
        if m.num_classes < 1:
            _fail("model.num_classes", m.num_classes, "model.cond_stage='class' needs the class embedder's size (>= 1)")
        if not 1 <= cfg.data.num_classes <= m.num_classes:
            _fail("data.num_classes", cfg.data.num_classes,
                  f"model.cond_stage='class' needs labelled data with 1 .. model.num_classes={m.num_classes} classes")
    elif m.use_spatial_transformer:
        _fail("model.use_spatial_transformer", True,
              "the cross-attention needs a context: set model.cond_stage='class' (with model.num_classes)")


def _validate_guidance(cfg: ml_collections.ConfigDict) -> None:
    """Classifier-free guidance: the 'no class' label, label dropout in training, the guidance scale."""
    m = cfg.model
    uncond = _check_int(cfg, "model.uncond_label", -1)
    if uncond >= 0 and uncond >= m.num_classes:
        _fail("model.uncond_label", uncond, f"must be a row of the class table: 0 .. model.num_classes-1 = "
              f"{m.num_classes - 1} (or -1: none)")
    drop = _check_float(cfg, "train.label_dropout", 0.0, 1.0)
    if drop > 0 and uncond < 0:
        _fail("train.label_dropout", drop, "needs model.uncond_label >= 0 (the label a dropped one becomes)")
    scale = _check_float(cfg, "sample.guidance_scale", 0.0)
    if scale != 1.0 and uncond < 0:
        _fail("sample.guidance_scale", scale, "1.0 (off) unless model.uncond_label >= 0: guidance needs a model "
              "trained with a 'no class' label")


def _validate_autoencoder(cfg: ml_collections.ConfigDict) -> None:
    """config.autoencoder (latent diffusion, SPEC §7/§11) and its consistency with data.* and model.*."""
    a, m = cfg.autoencoder, cfg.model
    kind = _check_choice(cfg, "autoencoder.kind", AUTOENCODER_KINDS)
    if kind == "none":
        return
    if not isinstance(a.path, str):
        _fail("autoencoder.path", a.path, "a directory written by `python -m bdm_jax.convert` or '' (random init)")
    _check_float(cfg, "autoencoder.scale_factor", 0.0, lo_open=True)
    _check_bool(cfg, "autoencoder.sample_posterior")
    _check_bool(cfg, "autoencoder.cache_latents")
    _check_choice(cfg, "autoencoder.dtype", ("float32", "bfloat16", "float16"))
    for f in ("ch", "num_res_blocks", "z_channels", "embed_dim", "n_embed", "norm_groups"):
        _check_int(cfg, f"autoencoder.{f}", 1)
    mult = a.ch_mult
    if not isinstance(mult, (tuple, list)) or not mult or not all(isinstance(x, int) and x >= 1 for x in mult):
        _fail("autoencoder.ch_mult", mult, "a non-empty tuple of positive integers, e.g. (1, 2, 4)")
    for w in sorted({a.ch * x for x in mult}):
        if w % a.norm_groups:
            _fail("autoencoder.norm_groups", a.norm_groups, f"must divide every level's channel count (not {w})")
    f = 2 ** (len(mult) - 1)
    if cfg.data.image_size % f:
        _fail("data.image_size", cfg.data.image_size, f"must be divisible by the autoencoder's downsampling factor {f}")
    if m.image_size != cfg.data.image_size // f:
        _fail("model.image_size", m.image_size,
              f"latent diffusion: must be data.image_size / {f} = {cfg.data.image_size // f} (the latent size)")
    for f_ in ("in_channels", "out_channels"):
        if m[f_] != a.embed_dim:
            _fail(f"model.{f_}", m[f_], f"latent diffusion: must be autoencoder.embed_dim = {a.embed_dim}")
    if a.cache_latents and cfg.data.random_flip:
        _fail("autoencoder.cache_latents", True,
              "the cache holds one latent per image, so it cannot serve data.random_flip=True; set one of them False")
    if cfg.sample.clip_denoised:
        _fail("sample.clip_denoised", True, "latent diffusion: latents are not in [-1, 1]; set it False")


_KINDS = {bool: "True or False", int: "a number", float: "a number", str: "a string", tuple: "a tuple",
          list: "a tuple"}


def _kind(value: Any) -> str:
    """bool, number (int or float: the field checks decide which), string or tuple."""
    return next((k for t, k in _KINDS.items() if isinstance(value, t)), type(value).__name__)


def _check_kinds(cfg: ml_collections.ConfigDict, ref: ml_collections.ConfigDict | None = None,
                 prefix: str = "") -> None:
    """Every field of `cfg` that configs/default.py also has holds the default's kind of value (group,
    bool, number, string, tuple of the same kind of items; None where the default is a placeholder), so
    the checks in `validate` never meet a value they cannot compare. Absent fields are left to them."""
    if ref is None:
        from configs.default import get_config as _default_config

        ref = _default_config()
    for key in ref.keys():
        if key not in cfg:
            continue
        field, value, default = prefix + key, cfg[key], ref[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                _fail(field, value, "a group of fields (see configs/default.py)")
            _check_kinds(value, default, field + ".")
            continue
        want = _KINDS.get(ref.get_type(key))
        if want is None or (value is None and default is None):  # placeholder: resolve_method fills it
            continue
        if _kind(value) != want:
            _fail(field, value, f"expected {want}")
        if want == "a tuple" and default and any(_kind(v) != _kind(default[0]) for v in value):
            _fail(field, value, f"expected a tuple of items like {tuple(default)!r}")


def architecture_dict(config: ml_collections.ConfigDict) -> dict:
    """The fields that define the parameter shapes; two checkpoints are compatible iff these match."""
    m = config.model
    get = lambda f: m.get(f, ADDED_MODEL_FIELDS[f])  # noqa: E731 - configs saved before the field existed
    arch = dict(
        in_channels=m.in_channels, out_channels=m.out_channels, image_size=m.image_size,
        model_channels=m.model_channels, channel_mult=list(m.channel_mult), num_res_blocks=m.num_res_blocks,
        attention_resolutions=list(m.attention_resolutions), num_classes=m.num_classes,
        norm_groups=m.norm_groups, use_scale_shift_norm=get("use_scale_shift_norm"),
        resblock_updown=get("resblock_updown"), use_spatial_transformer=get("use_spatial_transformer"),
        cond_stage=get("cond_stage"),
    )
    if arch["use_spatial_transformer"]:  # only then do these shape anything
        arch.update(transformer_depth=get("transformer_depth"), context_dim=get("context_dim"))
    return arch
