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


class ConfigError(ValueError):
    """A config value that is not allowed; the message is one line naming the field."""


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config.{field}={value!r} is not allowed: {allowed}")


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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field, value, "expected a finite number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        _fail(field, value, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        _fail(field, value, f"must be <= {hi}")
    return float(value)


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
    _check_choice(config, "method", METHODS)
    cfg = ml_collections.ConfigDict(config.to_dict())
    preset = PRESETS[cfg.method]
    with cfg.unlocked():
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
    _check_bool(cfg, "quant.progressive")
    _check_int(cfg, "quant.progressive_interval", 1)
    _check_choice(cfg, "quant.progressive_grouping", ("block", "level"))
    _check_bool(cfg, "quant.ebb")
    _check_float(cfg, "quant.ebb_tau", 0.0)
    _check_int(cfg, "quant.ebb_transition_step", -1)
    _check_bool(cfg, "quant.quantize_attention")
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


def architecture_dict(config: ml_collections.ConfigDict) -> dict:
    """The fields that define the parameter shapes; two checkpoints are compatible iff these match."""
    m = config.model
    return dict(
        in_channels=m.in_channels, out_channels=m.out_channels, image_size=m.image_size,
        model_channels=m.model_channels, channel_mult=list(m.channel_mult), num_res_blocks=m.num_res_blocks,
        attention_resolutions=list(m.attention_resolutions), num_classes=m.num_classes,
        norm_groups=m.norm_groups,
    )
