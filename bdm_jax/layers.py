"""The one layer type every conv/dense of the UNet goes through (SPEC §2–§4, ARCHITECTURE "Decisions").

`QConv`, `QDense` and `QAct` look up their own treatment (full precision, k binary bases, activation
bits) in a `QuantPlan` by module path, so BinaryDM binarizes a UNet by rule without the UNet knowing.
With `plan=None` they are plain FP layers and create exactly the FP params (kernel, bias): the teacher
and FP pretraining use that path.

Binarized layers read a 0/1 `masks/binarize` variable (progressive binarization, SPEC §6): mask 0 uses
the latent FP weight and the unquantized input, mask 1 the binarized weight and quantized input. The
mask is data, so changing it never recompiles. Multi-basis layers also read `masks/extra_bases`, which
EBB sets to 0 after its transition step to drop the second basis (SPEC §2).

Exported models (bdm_jax.export) use a plan with `packed=True`: binarized layers then own
`kernel_bits` (sign bits in uint8/uint32 words, layout in bdm_jax.pack) and `scales` instead of a latent
kernel, unpack them inside jit, and always quantize their inputs (no masks: the model is fully binarized).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdm_jax import pack
from bdm_jax.quant import init_scales, lsq_init_step, lsq_quantize, lsq_select, multi_basis_binarize

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
    `packed=True` is the exported inference model (bdm_jax.export): binarized layers read packed sign
    bits in `word_bits`-bit words and their `bases` are the exported ones.
    `act_scale="dynamic"` is the official code's behaviour (SPEC §4): the LSQ step is recomputed from each
    input (per layer, per forward, no gradient) instead of learned; the `act_step` params stay (unused) so
    checkpoints of both modes have the same structure.
    """

    entries: tuple[tuple[str, LayerSpec], ...] = ()
    probe: bool = False
    packed: bool = False
    word_bits: int = 32
    act_scale: str = "learned"  # learned: the LSQ step param; dynamic: 2 mean|x| / sqrt(Qp) of every input

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


def is_packed(module: nn.Module, spec: LayerSpec) -> bool:
    """True when the layer's binarized kernel comes as packed sign bits (exported model)."""
    plan = getattr(module, "plan", None)
    return spec.bases > 0 and plan is not None and plan.packed


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
    absmean = jnp.mean(jnp.abs(x.astype(jnp.float32)))
    module.sow("calib", "act_absmean", absmean)
    step = module.param("act_step", nn.initializers.ones, (), jnp.float32)
    plan = getattr(module, "plan", None)
    if plan is not None and plan.act_scale == "dynamic":  # a dead input (absmean 0) must not give step 0
        step = jax.lax.stop_gradient(lsq_init_step(jnp.maximum(absmean, 1e-8), spec.act_bits))
    if plan is not None and plan.packed:  # exported model: every layer binarized, i.e. mask 1
        return lsq_quantize(x.astype(jnp.float32), step, spec.act_bits).astype(x.dtype)
    return lsq_select(x, step, _mask(module, "binarize"), spec.act_bits)


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


def packed_kernel(
    module: nn.Module, spec: LayerSpec, shape: Sequence[int], x: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(binarized kernel, x) of an exported layer, unpacked inside jit (SPEC §2, §9; layout in bdm_jax.pack).

    Params `kernel_bits` (uint words, (bases, words, C_out)) and `scales` (bases, C_out) are the only
    weight storage; the float kernel is a temporary of the jitted computation. The unpack is tied to this
    layer's input `x` (use the returned x), so neither loop-invariant code motion nor the scheduler can
    unpack every layer up front and keep all float kernels alive at once (the memory of the FP weights):
    by an optimization barrier, which XLA keeps through scheduling on GPU/TPU, and on CPU, whose compiler
    strips barriers early, by xor with a zero it cannot fold (0.0 * an element of x).
    """
    word_bits = module.plan.word_bits
    bits = module.param(
        "kernel_bits", nn.initializers.zeros, pack.packed_shape(shape, spec.bases, word_bits),
        pack.word_dtype(word_bits),
    )
    scales = module.param("scales", nn.initializers.ones, (spec.bases, shape[-1]), jnp.float32)
    bits, scales, x = jax.lax.optimization_barrier((bits, scales, x))
    if jax.default_backend() == "cpu":
        bits = bits ^ (x.reshape(-1)[0].astype(jnp.float32) * 0.0).astype(bits.dtype)
    return pack.binary_kernel(bits, scales, shape), x


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
        shape = (kh, kw, x.shape[-1], self.features)
        packed = is_packed(self, spec)
        if not packed:
            kernel = self.param("kernel", _kernel_init(self.zero_init), shape, jnp.float32)
        padding = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if self.padding == "torch" else self.padding
        x = quantize_input(self, spec, x)
        if packed:
            kernel, x = packed_kernel(self, spec, shape, x)
        else:
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
        shape = (x.shape[-1], self.features)
        packed = is_packed(self, spec)
        if not packed:
            kernel = self.param("kernel", _kernel_init(self.zero_init), shape, jnp.float32)
        x = quantize_input(self, spec, x)
        if packed:
            kernel, x = packed_kernel(self, spec, shape, x)
        else:
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


class LSQStep(nn.Module):
    """The variables of a QAct (its `act_step` param, its `binarize` mask) without applying it.

    For a fused kernel that quantizes on chip (bdm_jax.flash_lsq): same name, same variables, so params,
    masks and checkpoints are those of the QAct it stands in for. Returns (bits, step, mask); an exported
    (packed) model's mask is 1, as in `quantize_input`.
    """

    plan: QuantPlan | None = None

    @nn.compact
    def __call__(self) -> tuple[int, jax.Array, jax.Array]:
        spec = module_spec(self, self.plan)
        if spec.act_bits >= 32:
            return spec.act_bits, jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
        step = self.param("act_step", nn.initializers.ones, (), jnp.float32)
        if self.plan is not None and self.plan.packed:
            return spec.act_bits, step, jnp.ones((), jnp.float32)
        return spec.act_bits, step, _mask(self, "binarize")


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
