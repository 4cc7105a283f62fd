"""`train_and_evaluate(config, workdir)`: FP training and BinaryDM QAT, one readable loop.

Order (big_vision style): validate config → workdir → mesh → data → models and plan → abstract state
→ restore or initialise under jit → jitted update step with donated state → loop with metrics,
checkpoints and sample grids. A method other than `fp` without `teacher_workdir` first trains the FP
teacher in `<workdir>/teacher` (the README main job on digits).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
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
from bdm_jax import diffusion, images, latent, progressive, reliability, rules, sharding
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
    codec: latent.Codec | None = None  # latent diffusion: the frozen first stage (config.autoencoder)

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "Setup":
        fp_model = UNet.from_config(cfg.model)
        sched = diffusion.make_schedule(
            cfg.diffusion.beta_schedule, cfg.diffusion.timesteps, cfg.diffusion.beta_start, cfg.diffusion.beta_end
        )
        codec = latent.Codec.from_config(cfg)
        if cfg.method == "fp":
            return cls(cfg, fp_model, fp_model, None, None, sched, False, codec)
        layers = rules.enumerate_layers(cfg.model)
        plan = rules.build_plan(cfg.model, cfg.quant, layers)
        return cls(cfg, fp_model, UNet.from_config(cfg.model, plan), plan, layers, sched, True, codec)

    def labels(self, batch: dict) -> jax.Array | None:
        return batch["label"] if self.cfg.model.num_classes else None


def prepare_workdir(workdir: str) -> str:
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test", dir=workdir)  # unique: hosts may share the workdir
        with os.fdopen(fd, "w") as f:
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
        if y is not None and cfg.train.label_dropout > 0:  # classifier-free guidance training
            # fold_in, not a third split: runs without label dropout keep their random streams.
            drop = jax.random.bernoulli(jax.random.fold_in(rng, 1), cfg.train.label_dropout, y.shape)
            y = jnp.where(drop, cfg.model.uncond_label, y).astype(y.dtype)
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
                terms["lrm"] = lrm_loss(feats, teacher_feats, state.lrm_proj, q.lrm_lambda, q.lrm_precision)
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


def make_sample_fn(setup: Setup, num: int, mesh: Any = None) -> Callable:
    """sample(params, masks, rng) -> float32 [num, H, W, C] images in [-1, 1] (jitted; SPEC §8).

    With a `mesh`, the batch is split over all its devices (replicated if `num` does not divide evenly);
    the values do not depend on the split (threefry random bits are partitionable)."""
    cfg, s = setup.cfg, setup.cfg.sample
    out_sh = sharding.sample_sharding(mesh, num)
    constrain = (lambda x: jax.lax.with_sharding_constraint(x, out_sh)) if out_sh is not None else (lambda x: x)  # noqa: E731
    shape = (num, cfg.model.image_size, cfg.model.image_size, cfg.model.out_channels)
    # Cycle through the data's classes: a class table may have more rows (cin256-v2: row 1000 = "no class").
    classes = min(cfg.data.num_classes, cfg.model.num_classes) if cfg.data.num_classes else cfg.model.num_classes
    labels = jnp.arange(num, dtype=jnp.int32) % classes if cfg.model.num_classes else None
    guidance = float(s.get("guidance_scale", 1.0)) if labels is not None else 1.0

    codec = setup.codec

    @functools.partial(jax.jit, **({} if out_sh is None else {"out_shardings": out_sh}))
    def sample(params, masks, rng, codec_params):
        variables = {"params": params, "masks": masks} if setup.quant else {"params": params}
        model_fn = lambda x, t: constrain(setup.model.apply(variables, constrain(x), t, labels))  # noqa: E731
        if guidance != 1.0:  # classifier-free guidance: conditional and 'no class' eps in one forward of 2N
            def model_fn(x, t):
                x = constrain(x)
                y2 = jnp.concatenate([labels, jnp.full_like(labels, cfg.model.uncond_label)])
                out = setup.model.apply(variables, jnp.concatenate([x, x]), jnp.concatenate([t, t]), y2)
                cond, uncond = jnp.split(out, 2)
                return constrain(uncond + guidance * (cond - uncond))
        x = diffusion.sample(model_fn, setup.sched, shape, rng, sampler=s.sampler, steps=s.steps, eta=s.eta,
                             spacing=s.spacing, clip_denoised=s.clip_denoised)
        if codec is not None:  # latent diffusion: decode the sampled latents to images
            x = codec.decode(codec_params, x)
        return jnp.clip(x, -1.0, 1.0)

    # The autoencoder's params go in as an argument, not as constants baked into the compiled sampler.
    codec_params = codec.params if codec is not None else None
    if codec_params is not None and mesh is not None:
        codec_params = sharding.on_mesh(codec_params, mesh)
    return lambda params, masks, rng: sample(params, masks, rng, codec_params)


def generate(setup: Setup, params: Any, masks: Any, num: int, batch_size: int, seed: int,
             progress: bool = False, mesh: Any = None) -> np.ndarray:
    """`num` uint8 samples, batch by batch; batch i uses fold_in(seed key, i) so results don't depend on timing.

    Each batch is split over the devices of `mesh` (default: all devices, if more than one); params and
    masks not yet on its devices are placed there (replicated, or by the FSDP rule of a given mesh)."""
    batch_size = min(batch_size, num)
    if mesh is None and jax.device_count() > 1:
        mesh = sharding.create_mesh({"data": -1, "fsdp": 1})
    if mesh is not None:
        params, masks = sharding.on_mesh(params, mesh), sharding.on_mesh(masks, mesh)
    sample = make_sample_fn(setup, batch_size, mesh)
    key = jax.random.key(seed)
    out = []
    batches = range((num + batch_size - 1) // batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="sampling", unit="batch")
    for i in batches:
        out.append(images.to_uint8(sharding.to_host(sample(params, masks, jax.random.fold_in(key, i)))))
    return np.concatenate(out)[:num]


@dataclasses.dataclass
class ShardedTraining:
    """The train state's abstract shape and shardings on a mesh, and the jitted init and update step."""

    abstract: TrainState  # ShapeDtypeStructs with .sharding: the restore target of any checkpoint
    shardings: TrainState
    init: Callable  # init(teacher_params, batch0) -> TrainState at step 0, sharded
    step: Callable  # step(state, batch) -> (state, metrics); donates `state`


def shard_training(setup: Setup, tx: optax.GradientTransformation, mesh: Any, batch0: dict) -> ShardedTraining:
    """Abstract state (eval_shape) -> shardings by one rule for every leaf (params, EMA, optax moments,
    teacher, LRM bases, masks, step, rng; sharding.state_shardings) -> jitted init with out_shardings and
    the update step jitted with in/out shardings and the state donated (issue 5)."""
    cfg = setup.cfg
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
    state_sh = sharding.state_shardings(abstract, mesh, sharding.fsdp_min_size(cfg.mesh))
    abstract = sharding.with_shardings(abstract, state_sh)
    init_fn = jax.jit(init, out_shardings=state_sh)
    mask_fn = make_mask_fn(setup, abstract.masks)
    step_fn = jax.jit(make_train_step(setup, tx, mask_fn), in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    return ShardedTraining(abstract, state_sh, lambda teacher, batch0: init_fn(rng_data, teacher, batch0), step_fn)


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
    """One training run (FP or QAT) of a validated config; with train.nan_policy=rollback a non-finite step
    restarts it from the last checkpoint without that step's batch (reliability.run_with_rollback)."""
    return reliability.run_with_rollback(_train_once, cfg, workdir)


def _train_once(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    from tqdm import tqdm

    workdir = prepare_workdir(workdir)
    is_main = jax.process_index() == 0
    mesh = sharding.create_mesh(cfg.mesh)
    n_data = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.train.batch_size % n_data:
        raise ValueError(f"config.train.batch_size={cfg.train.batch_size} must be divisible by the {n_data} devices of the mesh")

    source = data_lib.create_source(cfg.data)
    setup = Setup.from_config(cfg)
    to_latents = lambda batch, step: batch  # noqa: E731 - pixel-space diffusion
    if setup.codec is not None:  # latent diffusion: batches of images become scaled latents (SPEC §7)
        cached = bool(cfg.autoencoder.cache_latents)
        if cached:
            source = latent.cached_source(setup.codec, source, cfg, workdir, cfg.train.batch_size)
        encode = setup.codec.to_latents_fn(cached, sharding.batch_sharding(mesh))
        codec_params = jax.device_put(setup.codec.params, sharding.replicated(mesh))
        to_latents = lambda batch, step: dict(  # noqa: E731
            batch, image=encode(codec_params, batch["image"], latent.step_rng(cfg.seed, step)))
    if setup.quant and is_main:
        table = rules.plan_table(setup.layers, setup.plan)
        with open(os.path.join(workdir, "quant_plan.txt"), "w") as f:
            f.write(table + "\n")
        log.info("quantization plan written to %s", os.path.join(workdir, "quant_plan.txt"))
    tx = make_optimizer(cfg.train)
    mngr = ckpt_lib.manager(workdir, keep=cfg.train.keep_checkpoints)
    resume = reliability.Resume(mngr, cfg)  # skips partial saves; checks the newest checkpoint's config
    latest = resume.step

    batch_kw = dict(global_batch_size=cfg.train.batch_size, seed=cfg.seed, random_flip=cfg.data.random_flip,
                    process_index=jax.process_index(), process_count=jax.process_count())
    b_shard = sharding.batch_sharding(mesh)
    batch0 = to_latents(sharding.global_batch(data_lib.get_batch(source, 0, **batch_kw), b_shard), 0)
    sharded = shard_training(setup, tx, mesh, batch0)
    abstract, step_fn = sharded.abstract, sharded.step

    if latest is not None:
        state, latest = resume.restore(abstract)
        log.info("resumed from %s at step %d", mngr.directory, latest)
    else:
        teacher = {}
        if setup.quant:
            teacher, tstep = ckpt_lib.load_params(cfg.teacher_workdir, cfg, mesh=mesh,
                                                  fsdp_min_size=sharding.fsdp_min_size(cfg.mesh))
            log.info("teacher: EMA params of %s at step %d", cfg.teacher_workdir, tstep)
        state = sharded.init(teacher, batch0)

    start, total = int(state.step), cfg.train.steps
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if is_main:
        reliability.trim_metrics(metrics_path, start)
    sample_dir = os.path.join(workdir, "samples")
    os.makedirs(sample_dir, exist_ok=True)
    history: list[dict] = []
    if is_main:
        ckpt_lib.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())

    def dump_samples(step: int) -> None:
        imgs = generate(setup, state.ema_params, state.masks, min(cfg.sample.num, 64), cfg.sample.batch_size,
                        cfg.sample.seed, mesh=mesh)
        if is_main:
            images.save_grid(imgs, os.path.join(sample_dir, f"grid_{step:07d}.png"))

    t_start, acc = time.time(), []
    bar = tqdm(total=total, initial=start, desc=f"train {cfg.method}", unit="step", disable=not is_main,
               dynamic_ncols=True)
    with reliability.batches(source, start, total, workdir, **batch_kw) as batches, reliability.RunGuard(mngr) as guard:
        for step in range(start, total):
            batch = to_latents(sharding.global_batch(next(batches), b_shard), step)
            state, metrics = step_fn(state, batch)
            acc.append(metrics)
            done = step + 1
            bar.update(1)
            stopping = guard.should_stop(done)  # SIGTERM / preemption: save this step and exit
            if done % cfg.train.log_every == 0 or done == total or stopping:
                host = jax.device_get(acc)
                acc = []
                reliability.check_finite(host, done)
                row = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                elapsed = time.time() - t_start
                rate = (done - start) / max(elapsed, 1e-9)
                row.update(step=done, steps_per_sec=rate, eta_sec=(total - done) / max(rate, 1e-9),
                           elapsed_sec=elapsed)
                history.append(row)
                if is_main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if done % cfg.train.save_every == 0 or done == total or stopping:
                reliability.check_finite(jax.device_get(acc), done)  # never checkpoint a non-finite state
                ckpt_lib.save(mngr, done, state, cfg)
            if stopping:
                raise guard.preempted(done)
            if cfg.train.sample_every and done % cfg.train.sample_every == 0 and done != total:
                dump_samples(done)
    bar.close()
    mngr.wait_until_finished()
    mngr.close()  # joins orbax's background threads, so nothing outlives the run
    if start < total or not os.path.exists(os.path.join(sample_dir, f"grid_{total:07d}.png")):
        dump_samples(total)
    return {"workdir": workdir, "step": int(state.step), "history": history,
            "grid": os.path.join(sample_dir, f"grid_{total:07d}.png")}
