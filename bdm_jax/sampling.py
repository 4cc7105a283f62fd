"""Sampling a workdir's checkpoint (used by sample.py, evaluation and notebooks)."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bdm_jax import checkpoint as ckpt_lib
from bdm_jax import images
from bdm_jax.config import validate


def load_for_sampling(workdir: str) -> tuple[ml_collections.ConfigDict, Any, Any, int]:
    """(validated config, EMA params, masks, step) of the newest checkpoint in `workdir`."""
    ckpt = ckpt_lib.checkpoint_dir(workdir)
    if not os.path.isdir(ckpt):
        raise ckpt_lib.CheckpointError(f"no checkpoints in {ckpt}: train there first")
    mngr = ckpt_lib.manager(workdir, create=False)
    step = mngr.latest_step()
    if step is None:
        raise ckpt_lib.CheckpointError(f"no complete checkpoint in {ckpt}")
    cfg = validate(ml_collections.ConfigDict(ckpt_lib.saved_config(mngr, step)))
    try:
        target = ckpt_lib.saved_state_target(mngr, step)  # any topology -> replicated on this one (issue 5)
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    except Exception as e:  # noqa: BLE001 - reported with the path
        raise ckpt_lib.CheckpointError(f"checkpoint {ckpt}/{step} could not be restored ({type(e).__name__}: {e})") from None
    finally:
        mngr.close()
    return cfg, state["ema_params"], state.get("masks", {}), step


def with_sampler(cfg: ml_collections.ConfigDict, sampler: str | None = None, steps: int | None = None,
                 eta: float | None = None, guidance_scale: float | None = None) -> ml_collections.ConfigDict:
    """`cfg` with the given sampler options (None: keep the run's `sample.*`), validated."""
    with cfg.unlocked():
        for key, value in (("sampler", sampler), ("steps", steps), ("eta", eta), ("guidance_scale", guidance_scale)):
            if value is not None:
                cfg.sample[key] = value
    return validate(cfg)


def sampler_tag(cfg: ml_collections.ConfigDict) -> str:
    """Short name of the sampler settings for file names: ddim100, ddpm, + _g3 under classifier-free guidance."""
    s = cfg.sample
    tag = f"{s.sampler}{s.steps if s.sampler == 'ddim' else ''}"
    guidance = s.get("guidance_scale", 1.0)
    return tag + (f"_g{guidance:g}" if guidance != 1.0 else "")


def sample_workdir(workdir: str, out_dir: str, *, num: int, batch_size: int, sampler: str = "ddim",
                   steps: int = 100, eta: float = 0.0, seed: int = 0, progress: bool = False,
                   guidance_scale: float | None = None) -> dict:
    """Generate `num` samples from a workdir; write grid PNG (first 64) and all as uint8 .npz."""
    from bdm_jax.trainer import Setup, generate

    cfg, params, masks, step = load_for_sampling(workdir)
    cfg = with_sampler(cfg, sampler, steps, eta, guidance_scale)
    setup = Setup.from_config(cfg)
    imgs = generate(setup, params, masks, num, batch_size, seed, progress=progress)
    os.makedirs(out_dir, exist_ok=True)
    tag = f"{sampler_tag(cfg)}_seed{seed}_step{step}"
    grid = os.path.join(out_dir, f"sample_{tag}.png")
    npz = os.path.join(out_dir, f"sample_{tag}.npz")
    if jax.process_index() == 0:  # multi-host: every process holds all samples; one writes them
        images.save_grid(imgs[:64], grid)
        images.save_npz(imgs, npz)
    return {"grid": grid, "npz": npz, "images": imgs, "step": step, "config": cfg}
