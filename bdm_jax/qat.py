"""Teacher-student QAT set-up (SPEC §2-§7): the student from the teacher, LSQ calibration, LRM bases."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from bdm_jax.layers import QuantPlan
from bdm_jax.lrm import fit_projections
from bdm_jax.quant import init_scales, lsq_init_step


class TeacherMismatchError(ValueError):
    """The teacher params do not fit the student architecture."""


def block_features(variables_out: Any) -> dict[str, jax.Array]:
    """The {block: features} dict the UNet sowed (SPEC §5)."""
    return variables_out["block_features"]["blocks"][0]


def student_from_teacher(student_init: Any, teacher_params: Any, plan: QuantPlan) -> Any:
    """Copy the teacher's FP params into the student and initialise scales from them (SPEC §2).

    Scales are `init_scales` of the teacher kernel (a1 = mean|w|, a2 = mean|residual| per output
    channel), computed here once — never lazily in a later forward.
    """
    flat_s = traverse_util.flatten_dict(dict(student_init))
    flat_t = traverse_util.flatten_dict(dict(teacher_params))
    missing = sorted("/".join(k) for k in flat_t if k not in flat_s)
    if missing:
        raise TeacherMismatchError(f"teacher params not in the student model: {missing[:3]} (teacher_workdir has another architecture)")
    out = {}
    for key, value in flat_s.items():
        if key in flat_t:
            if flat_t[key].shape != value.shape:
                raise TeacherMismatchError(
                    f"teacher param {'/'.join(key)} has shape {flat_t[key].shape}, the student expects {value.shape}"
                )
            out[key] = jnp.asarray(flat_t[key], value.dtype)
        elif key[-1] == "scales":
            kernel = flat_t[key[:-1] + ("kernel",)]
            out[key] = init_scales(jnp.asarray(kernel, jnp.float32), plan.get("/".join(key[:-1])).bases)
        elif key[-1] == "act_step":
            out[key] = value  # set by calibrate_act_steps
        else:
            raise TeacherMismatchError(f"student param {'/'.join(key)} has no teacher counterpart")
    return traverse_util.unflatten_dict(out)


def calibrate_act_steps(params: Any, calib: Any, plan: QuantPlan) -> Any:
    """Set every LSQ step once from the mean |input| of a calibration forward (SPEC §4)."""
    flat_p = traverse_util.flatten_dict(dict(params))
    flat_c = traverse_util.flatten_dict(dict(calib))
    for key in flat_p:
        if key[-1] == "act_step":
            path = key[:-1]
            absmean = flat_c[path + ("act_absmean",)]
            absmean = absmean[0] if isinstance(absmean, tuple) else absmean
            # A dead input (all zeros) would give step 0 and a division by zero in LSQ.
            step = lsq_init_step(jnp.maximum(absmean, 1e-8), plan.get("/".join(path)).act_bits)
            flat_p[key] = step.astype(flat_p[key].dtype)
    return traverse_util.unflatten_dict(flat_p)


def zero_masks(mask_template: Any) -> Any:
    return jax.tree.map(jnp.zeros_like, mask_template)


def init_student(
    student_model: Any,
    fp_model: Any,
    teacher_params: Any,
    plan: QuantPlan,
    x_t: jax.Array,
    t: jax.Array,
    y: jax.Array | None,
    rng: jax.Array,
    lrm: str,
    lrm_k: int,
) -> tuple[Any, Any, Any]:
    """(student params, masks template, LRM projections) from the teacher and one calibration batch.

    The calibration forward runs the student with all masks 0 (= the FP model on the teacher's weights),
    so LSQ steps see the FP activations; the LRM bases come from the teacher's block outputs on the same
    x_t (SPEC §5: the first training batch).
    """
    variables = student_model.init({"params": rng}, x_t[:1], t[:1], None if y is None else y[:1])
    mask_template = variables.get("masks", {})
    params = student_from_teacher(variables["params"], teacher_params, plan)
    if any(k[-1] == "act_step" for k in traverse_util.flatten_dict(dict(params))):
        _, calib = student_model.apply(
            {"params": params, "masks": zero_masks(mask_template)}, x_t, t, y, mutable=["calib"]
        )
        params = calibrate_act_steps(params, calib["calib"], plan)
    proj = {}
    if lrm == "pca":
        _, out = fp_model.apply({"params": teacher_params}, x_t, t, y, mutable=["block_features"])
        proj = fit_projections(block_features(out), lrm_k)
    return params, mask_template, proj
