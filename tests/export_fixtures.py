"""Shared by test_export / test_efficiency / test_notebook: BinaryDM checkpoints without training.

`random_student` fills the student's own param tree (from jax.eval_shape of the model the trainer builds)
with plausible random values and saves it as the TrainState fields sampling reads; nothing is compiled,
which keeps these tests fast on a shared CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from bdm_jax import checkpoint as ckpt_lib
from bdm_jax.config import validate
from bdm_jax.trainer import Setup
from configs import digits, tiny


def tiny_config(act_bits: int = 32, method: str = "binarydm") -> ml_collections.ConfigDict:
    cfg = tiny.get_config()
    cfg.method = method
    cfg.quant.act_bits = act_bits
    return cfg


def digits_config() -> ml_collections.ConfigDict:
    return digits.get_config()


def random_student(cfg: ml_collections.ConfigDict, *, seed: int = 0, finished: bool = True, extra_bases: float = 1.0):
    """(validated cfg, Setup, state dict) of a BinaryDM student with random but plausible values.

    Param tree and masks come from the student model itself (jax.eval_shape: nothing is compiled);
    values: kernels N(0, 0.1) with a few exact zeros, scales = per-channel mean|w| x U(0.8, 1.2) (second
    basis smaller), LSQ steps U(0.05, 0.2), biases/norm params near their init. `finished=False` leaves
    the outermost layers unbinarized (progressive schedule incomplete); `extra_bases=0` is EBB after its
    transition.
    """
    cfg = validate(cfg)
    setup = Setup.from_config(cfg)
    s, c = cfg.model.image_size, cfg.model.in_channels
    shapes = jax.eval_shape(setup.model.init, jax.random.key(0), jnp.zeros((1, s, s, c)), jnp.zeros((1,), jnp.int32))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(shapes["params"])
    params = {}
    for key in sorted(flat, key=lambda k: k[-1] != "kernel"):  # kernels first: scales derive from them
        shape, name = flat[key].shape, key[-1]
        if name == "kernel":
            w = rng.normal(0.0, 0.1, shape).astype(np.float32)
            w.reshape(-1)[:: 97] = 0.0
            params[key] = w
        elif name == "scales":
            w = params[key[:-1] + ("kernel",)]
            a = np.abs(w).mean(axis=tuple(range(w.ndim - 1)))
            decay = 0.3 ** np.arange(shape[0])[:, None]
            params[key] = (a * decay * rng.uniform(0.8, 1.2, shape)).astype(np.float32)
        elif name == "act_step":
            params[key] = np.float32(rng.uniform(0.05, 0.2))
        elif name == "scale":  # GroupNorm
            params[key] = (1.0 + 0.1 * rng.normal(size=shape)).astype(np.float32)
        else:
            params[key] = (0.05 * rng.normal(size=shape)).astype(np.float32)
    params = traverse_util.unflatten_dict(params)
    masks = {}
    for key in traverse_util.flatten_dict(shapes.get("masks", {})):
        on = 1.0 if finished or not key[0].startswith(("input_blocks_1", "output_blocks_")) else 0.0
        masks[key] = np.float32(on if key[-1] == "binarize" else extra_bases)
    masks = traverse_util.unflatten_dict(masks)
    state = dict(step=np.int32(cfg.train.steps), params=params, ema_params=params, opt_state={},
                 rng=np.zeros((2,), np.uint32), masks=masks, teacher_params={}, lrm_proj={})
    return cfg, setup, state


def save_workdir(workdir: str, cfg: ml_collections.ConfigDict, state) -> str:
    mngr = ckpt_lib.manager(workdir)
    ckpt_lib.save(mngr, int(state["step"]), state, cfg)
    mngr.wait_until_finished()
    return workdir


def student_workdir(workdir: str, cfg: ml_collections.ConfigDict, **kw):
    """Write a checkpoint of `random_student(cfg, **kw)` into `workdir`; returns (cfg, setup, state)."""
    cfg, setup, state = random_student(cfg, **kw)
    save_workdir(workdir, cfg, state)
    return cfg, setup, state
