"""`train_and_evaluate(config, workdir)`: FP training and BinaryDM QAT, one readable loop.

Order (big_vision style): validate config → workdir → mesh → data → models and plan → abstract state
→ restore or initialise under jit → jitted update step with donated state → loop with metrics,
checkpoints and sample grids. A method other than `fp` without `teacher_workdir` first trains the FP
teacher in `<workdir>/teacher` (the README main job on digits).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from bdm_jax import checkpoint as ckpt_lib
from bdm_jax import data as data_lib
from bdm_jax import diffusion, images, progressive, rules, sharding
from bdm_jax.config import validate
from bdm_jax.layers import QuantPlan
from bdm_jax.lrm import feature_mse_loss, lrm_loss
from bdm_jax.qat import block_features, init_student
from bdm_jax.quant import ebb_regularizer
from bdm_jax.train_state import TrainState, lr_at, make_optimizer
from bdm_jax.unet import UNet

log = logging.getLogger("bdm_jax")


class WorkdirError(OSError):
    """The workdir cannot be created or written."""


@dataclasses.dataclass
class Setup:
    """Everything static that the step, the sampler and the scripts derive from a config."""

    cfg: ml_collections.ConfigDict
    fp_model: UNet
    model: UNet  # == fp_model for method fp
    plan: QuantPlan | None
    layers: list | None
    sched: diffusion.Schedule
    quant: bool

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "Setup":
        fp_model = UNet.from_config(cfg.model)
        sched = diffusion.make_schedule(
            cfg.diffusion.beta_schedule, cfg.diffusion.timesteps, cfg.diffusion.beta_start, cfg.diffusion.beta_end
        )
        if cfg.method == "fp":
            return cls(cfg, fp_model, fp_model, None, None, sched, False)
        layers = rules.enumerate_layers(cfg.model)
        plan = rules.build_plan(cfg.model, cfg.quant, layers)
        return cls(cfg, fp_model, UNet.from_config(cfg.model, plan), plan, layers, sched, True)

    def labels(self, batch: dict) -> jax.Array | None:
        return batch["label"] if self.cfg.model.num_classes else None


def prepare_workdir(workdir: str) -> str:
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir} is not writable ({e.strerror}); choose a directory you can write") from None
    return workdir


def noisy_input(setup: Setup, x0: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x_t, t, eps) for a batch, SPEC §7."""
    k_t, k_n = jax.random.split(rng)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, setup.sched.num_timesteps)
    eps = jax.random.normal(k_n, x0.shape, jnp.float32)
    return diffusion.q_sample(setup.sched, x0, t, eps), t, eps


def make_init_fn(setup: Setup, tx: optax.GradientTransformation) -> Callable:
    """init(rng_data, teacher_params, batch) -> TrainState at step 0 (jittable, and eval_shape-able)."""
    cfg = setup.cfg

    def init(rng_data: jax.Array, teacher_params: Any, batch: dict) -> TrainState:
        rng = jax.random.wrap_key_data(rng_data)
        k_init, k_calib = jax.random.split(jax.random.fold_in(rng, 2**31 - 1))
        x0, y = batch["image"], setup.labels(batch)
        if not setup.quant:
            params = setup.model.init({"params": k_init}, x0[:1], jnp.zeros((1,), jnp.int32),
                                      None if y is None else y[:1])["params"]
            masks, proj = {}, {}
        else:
            x_t, t, _ = noisy_input(setup, x0, k_calib)
            params, template, proj = init_student(
                setup.model, setup.fp_model, teacher_params, setup.plan, x_t, t, y, k_init,
                cfg.quant.lrm, cfg.quant.lrm_k,
            )
            masks = progressive.progressive_masks(jnp.zeros((), jnp.int32), template, None, 1)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params),
            rng=rng_data, masks=masks, teacher_params=teacher_params, lrm_proj=proj,
        )

    return init


def make_mask_fn(setup: Setup, mask_template: Any) -> Callable[[jax.Array], Any]:
    q = setup.cfg.quant
    if not setup.quant:
        return lambda step: {}
    rings = progressive.mask_rings(mask_template, setup.cfg.model, q.progressive_grouping) if q.progressive else None
    transition = q.ebb_transition_step if q.ebb else -1
    return lambda step: progressive.progressive_masks(step, mask_template, rings, q.progressive_interval, transition)


def second_scales(params: Any) -> list[jax.Array]:
    """a2 of every multi-basis layer (EBB, SPEC §2)."""
    flat = traverse_util.flatten_dict(dict(params))
    return [v[1] for k, v in sorted(flat.items()) if k[-1] == "scales" and v.shape[0] > 1]


def make_train_step(setup: Setup, tx: optax.GradientTransformation, mask_fn: Callable) -> Callable:
    """One update: noise → (teacher forward) → student loss and grads → AdamW → EMA (SPEC §7)."""
    cfg = setup.cfg
    q = cfg.quant
    use_lrm = setup.quant and q.lrm != "none"
    use_ebb = setup.quant and q.ebb

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_noise, k_drop = jax.random.split(rng)
        x0, y = batch["image"], setup.labels(batch)
        x_t, t, eps = noisy_input(setup, x0, k_noise)
        masks = mask_fn(state.step)
        teacher_feats = None
        if use_lrm:
            _, out = setup.fp_model.apply({"params": state.teacher_params}, x_t, t, y, mutable=["block_features"])
            teacher_feats = jax.lax.stop_gradient(block_features(out))

        def loss_fn(params):
            variables = {"params": params, "masks": masks} if setup.quant else {"params": params}
            mutable = ["block_features"] if use_lrm else False
            out = setup.model.apply(variables, x_t, t, y, train=True, rngs={"dropout": k_drop}, mutable=mutable)
            eps_pred, feats = (out[0], block_features(out[1])) if use_lrm else (out, None)
            terms = {"mse": diffusion.eps_loss(eps_pred, eps)}
            if use_lrm and q.lrm == "pca":
                terms["lrm"] = lrm_loss(feats, teacher_feats, state.lrm_proj, q.lrm_lambda)
            elif use_lrm:
                terms["lrm_mse"] = feature_mse_loss(feats, teacher_feats, q.lrm_lambda)
            if use_ebb:
                active = 1.0 if q.ebb_transition_step < 0 else (state.step < q.ebb_transition_step)
                terms["ebb"] = ebb_regularizer(second_scales(params), q.ebb_tau) * active
            return sum(terms.values()), terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = cfg.train.ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
        metrics = {"loss": loss, **terms, "grad_norm": optax.global_norm(grads), "lr": lr_at(cfg.train, state.step)}
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state, masks=masks)
        return new_state, metrics

    return step_fn


def make_sample_fn(setup: Setup, num: int) -> Callable:
    """sample(params, masks, rng) -> float32 [num, H, W, C] images in [-1, 1] (jitted; SPEC §8)."""
    cfg, s = setup.cfg, setup.cfg.sample
    shape = (num, cfg.model.image_size, cfg.model.image_size, cfg.model.out_channels)
    labels = jnp.arange(num, dtype=jnp.int32) % cfg.model.num_classes if cfg.model.num_classes else None

    @jax.jit
    def sample(params, masks, rng):
        variables = {"params": params, "masks": masks} if setup.quant else {"params": params}
        model_fn = lambda x, t: setup.model.apply(variables, x, t, labels)  # noqa: E731
        x = diffusion.sample(model_fn, setup.sched, shape, rng, sampler=s.sampler, steps=s.steps, eta=s.eta,
                             spacing=s.spacing, clip_denoised=s.clip_denoised)
        return jnp.clip(x, -1.0, 1.0)

    return sample


def generate(setup: Setup, params: Any, masks: Any, num: int, batch_size: int, seed: int,
             progress: bool = False) -> np.ndarray:
    """`num` uint8 samples, batch by batch; batch i uses fold_in(seed key, i) so results don't depend on timing."""
    batch_size = min(batch_size, num)
    sample = make_sample_fn(setup, batch_size)
    key = jax.random.key(seed)
    out = []
    batches = range((num + batch_size - 1) // batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="sampling", unit="batch")
    for i in batches:
        out.append(images.to_uint8(jax.device_get(sample(params, masks, jax.random.fold_in(key, i)))))
    return np.concatenate(out)[:num]


def stage_config(cfg: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """The FP-pretraining stage of a method run without a teacher: `pretrain` overrides `train`."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.method = method
    c.train.steps = cfg.pretrain.steps
    c.train.lr = cfg.pretrain.lr
    return c


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train per `config` in `workdir` (resuming if it has checkpoints); returns final metrics."""
    cfg = validate(config)
    workdir = prepare_workdir(workdir)
    if cfg.method != "fp" and not cfg.teacher_workdir:
        teacher_dir = os.path.join(workdir, "teacher")
        log.info("no teacher_workdir: pretraining the FP teacher in %s", teacher_dir)
        train(validate(stage_config(cfg, "fp")), teacher_dir)
        cfg.teacher_workdir = teacher_dir
    return train(cfg, workdir)


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """One training run (FP or QAT) of a validated config."""
    from tqdm import tqdm

    workdir = prepare_workdir(workdir)
    is_main = jax.process_index() == 0
    mesh = sharding.create_mesh(cfg.mesh)
    n_data = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.train.batch_size % n_data:
        raise ValueError(f"config.train.batch_size={cfg.train.batch_size} must be divisible by the {n_data} devices of the mesh")

    source = data_lib.create_source(cfg.data)
    setup = Setup.from_config(cfg)
    if setup.quant and is_main:
        table = rules.plan_table(setup.layers, setup.plan)
        with open(os.path.join(workdir, "quant_plan.txt"), "w") as f:
            f.write(table + "\n")
        log.info("quantization plan written to %s", os.path.join(workdir, "quant_plan.txt"))
    tx = make_optimizer(cfg.train)
    mngr = ckpt_lib.manager(workdir, keep=cfg.train.keep_checkpoints)
    latest = mngr.latest_step()
    if latest is not None:
        ckpt_lib.check_architecture(ckpt_lib.saved_config(mngr, latest), cfg, os.path.join(str(mngr.directory), str(latest)))

    batch_kw = dict(global_batch_size=cfg.train.batch_size, seed=cfg.seed, random_flip=cfg.data.random_flip,
                    process_index=jax.process_index(), process_count=jax.process_count())
    b_shard = sharding.batch_sharding(mesh)
    batch0 = sharding.global_batch(data_lib.get_batch(source, 0, **batch_kw), b_shard)
    init = make_init_fn(setup, tx)
    rng_data = jax.random.key_data(jax.random.key(cfg.seed))
    if setup.quant:
        teacher_abstract = jax.eval_shape(
            lambda: setup.fp_model.init(jax.random.key(0), batch0["image"][:1], jnp.zeros((1,), jnp.int32),
                                        None if setup.labels(batch0) is None else setup.labels(batch0)[:1])["params"]
        )
    else:
        teacher_abstract = {}
    abstract = jax.eval_shape(init, rng_data, teacher_abstract, batch0)
    state_sh = sharding.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)

    if latest is not None:
        state = ckpt_lib.restore_state(mngr, latest, abstract)
        log.info("resumed from %s at step %d", mngr.directory, latest)
    else:
        teacher = {}
        if setup.quant:
            teacher, tstep = ckpt_lib.load_params(cfg.teacher_workdir, cfg)
            log.info("teacher: EMA params of %s at step %d", cfg.teacher_workdir, tstep)
        state = jax.jit(init, out_shardings=state_sh)(rng_data, teacher, batch0)

    mask_fn = make_mask_fn(setup, abstract.masks)
    step_fn = jax.jit(make_train_step(setup, tx, mask_fn), in_shardings=(state_sh, b_shard),
                      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)

    start, total = int(state.step), cfg.train.steps
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    sample_dir = os.path.join(workdir, "samples")
    os.makedirs(sample_dir, exist_ok=True)
    history: list[dict] = []
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)

    def dump_samples(step: int) -> None:
        imgs = generate(setup, state.ema_params, state.masks, min(cfg.sample.num, 64), cfg.sample.batch_size,
                        cfg.sample.seed)
        if is_main:
            images.save_grid(imgs, os.path.join(sample_dir, f"grid_{step:07d}.png"))

    t_start, acc = time.time(), []
    bar = tqdm(total=total, initial=start, desc=f"train {cfg.method}", unit="step", disable=not is_main,
               dynamic_ncols=True)
    with data_lib.Prefetcher(source, start, total, **batch_kw) as batches:
        for step in range(start, total):
            batch = sharding.global_batch(next(batches), b_shard)
            state, metrics = step_fn(state, batch)
            acc.append(metrics)
            done = step + 1
            bar.update(1)
            if done % cfg.train.log_every == 0 or done == total:
                host = jax.device_get(acc)
                acc = []
                row = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                bad = [k for k, v in row.items() if not np.isfinite(v)]
                if bad:
                    raise FloatingPointError(
                        f"non-finite {', '.join(bad)} at step {done} (terms: "
                        + ", ".join(f"{k}={v:.4g}" for k, v in row.items()) + ")"
                    )
                elapsed = time.time() - t_start
                rate = (done - start) / max(elapsed, 1e-9)
                row.update(step=done, steps_per_sec=rate, eta_sec=(total - done) / max(rate, 1e-9),
                           elapsed_sec=elapsed)
                history.append(row)
                if is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if done % cfg.train.save_every == 0 or done == total:
                ckpt_lib.save(mngr, done, state, cfg)
            if cfg.train.sample_every and done % cfg.train.sample_every == 0 and done != total:
                dump_samples(done)
    bar.close()
    mngr.wait_until_finished()
    if start < total or not os.listdir(sample_dir):
        dump_samples(total)
    return {"workdir": workdir, "step": int(state.step), "history": history,
            "grid": os.path.join(sample_dir, f"grid_{total:07d}.png")}
