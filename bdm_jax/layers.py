"""The one layer type every conv/dense of the UNet goes through (SPEC §2–§4, ARCHITECTURE "Decisions").

`QConv`, `QDense` and `QAct` look up their own treatment (full precision, k binary bases, activation
bits) in a `QuantPlan` by module path, so BinaryDM binarizes a UNet by rule without the UNet knowing.
With `plan=None` they are plain FP layers and create exactly the FP params (kernel, bias): the teacher
and FP pretraining use that path.

Binarized layers read a 0/1 `masks/binarize` variable (progressive binarization, SPEC §6): mask 0 uses
the latent FP weight and the unquantized input, mask 1 the binarized weight and quantized input. The
mask is data, so changing it never recompiles. Multi-basis layers also read `masks/extra_bases`, which
EBB sets to 0 after its transition step to drop the second basis (SPEC §2).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdm_jax.quant import init_scales, lsq_quantize, multi_basis_binarize

Dtype = Any

FP_SPEC_BASES = 0


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Treatment of one layer: `bases` 0 = full precision, k >= 1 binary bases; `act_bits` 4/8/32."""

    bases: int = 0
    act_bits: int = 32

    @property
    def is_fp(self) -> bool:
        return self.bases == 0 and self.act_bits == 32


FP = LayerSpec()


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """Hashable map from module path ('output_blocks_3/res/in_conv') to `LayerSpec`.

    `probe=True` gives every layer a quantized spec; it is only used to enumerate the quantizable
    layers of a model (rules.enumerate_layers), never to train.
    """

    entries: tuple[tuple[str, LayerSpec], ...] = ()
    probe: bool = False

    @classmethod
    def from_dict(cls, mapping: Mapping[str, LayerSpec]) -> "QuantPlan":
        return cls(tuple(sorted(mapping.items())))

    def as_dict(self) -> dict[str, LayerSpec]:
        return dict(self.entries)

    def get(self, path: str) -> LayerSpec:
        if self.probe:
            return LayerSpec(bases=1, act_bits=8)
        # Linear scan would be O(layers^2) at trace time; cache the dict on the frozen instance.
        table = self.__dict__.get("_table")
        if table is None:
            table = dict(self.entries)
            object.__setattr__(self, "_table", table)
        return table.get(path, FP)


def module_spec(module: nn.Module, plan: QuantPlan | None) -> LayerSpec:
    if plan is None:
        return FP
    return plan.get("/".join(module.path))


def _mask(module: nn.Module, name: str) -> jax.Array:
    # Weight and input quantization of one layer share its mask; create it once.
    if module.has_variable("masks", name):
        return module.get_variable("masks", name)
    # Default 1: a student applied without an explicit masks collection is fully binarized.
    return module.variable("masks", name, lambda: jnp.ones((), jnp.float32)).value


def quantize_input(module: nn.Module, spec: LayerSpec, x: jax.Array) -> jax.Array:
    """LSQ fake-quantization of a layer input (SPEC §4), selected by the layer's binarize mask."""
    if spec.act_bits >= 32:
        return x
    # Calibration (bdm_jax.qat.init_student) reads this to set the step once from real activations.
    module.sow("calib", "act_absmean", jnp.mean(jnp.abs(x.astype(jnp.float32))))
    step = module.param("act_step", nn.initializers.ones, (), jnp.float32)
    xq = lsq_quantize(x.astype(jnp.float32), step, spec.act_bits).astype(x.dtype)
    return jnp.where(_mask(module, "binarize") > 0, xq, x)


def binarize_kernel(module: nn.Module, spec: LayerSpec, kernel: jax.Array) -> jax.Array:
    """Multi-basis binarization of a latent kernel (SPEC §2), selected by the layer's mask."""
    if spec.bases == 0:
        return kernel
    cout = kernel.shape[-1]
    # Placeholder init; init_student overwrites it from the teacher's weights (SPEC §2: never lazily).
    scales = module.param(
        "scales", lambda _, shape: init_scales(kernel, spec.bases), (spec.bases, cout)
    )
    if spec.bases > 1:
        keep = _mask(module, "extra_bases")
        scales = jnp.concatenate([scales[:1], scales[1:] * keep], axis=0)
    w_b = multi_basis_binarize(kernel, scales)
    return jnp.where(_mask(module, "binarize") > 0, w_b, kernel)


def _kernel_init(zero: bool):
    # torch's default conv/linear init (kaiming_uniform a=sqrt(5)) = uniform(+-1/sqrt(fan_in)); matches the
    # reference implementations the converters are checked against, and zero for the output convs.
    if zero:
        return nn.initializers.zeros
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class QConv(nn.Module):
    """2-D convolution, NHWC / HWIO, torch-style explicit padding, optionally binarized by plan."""

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: Any = "torch"
    use_bias: bool = True
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    plan: QuantPlan | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        spec = module_spec(self, self.plan)
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", _kernel_init(self.zero_init), (kh, kw, x.shape[-1], self.features), jnp.float32
        )
        padding = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if self.padding == "torch" else self.padding
        x = quantize_input(self, spec, x)
        kernel = binarize_kernel(self, spec, kernel)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=tuple(self.strides),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class QDense(nn.Module):
    """Dense layer on the last axis, optionally binarized by plan."""

    features: int
    use_bias: bool = True
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    plan: QuantPlan | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        spec = module_spec(self, self.plan)
        kernel = self.param(
            "kernel", _kernel_init(self.zero_init), (x.shape[-1], self.features), jnp.float32
        )
        x = quantize_input(self, spec, x)
        kernel = binarize_kernel(self, spec, kernel)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class QAct(nn.Module):
    """Standalone LSQ quantizer for attention operands (q, k, v, softmax output; SPEC §4)."""

    plan: QuantPlan | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return quantize_input(self, module_spec(self, self.plan), x)


def layer_paths(params: Mapping[str, Any]) -> Iterable[tuple[str, ...]]:
    """Module paths of all layers that own a `kernel` (conv/dense) or an `act_step` (QAct) in a params tree."""
    flat = flax_flatten(params)
    seen = set()
    for key in flat:
        if key[-1] in ("kernel", "act_step") and key[:-1] not in seen:
            seen.add(key[:-1])
            yield key[:-1]


def flax_flatten(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    from flax import traverse_util

    return traverse_util.flatten_dict(dict(tree))
