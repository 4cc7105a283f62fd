"""End to end: a short FP run, exact resume, sample.py, and the start-up errors of bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bdm_jax import checkpoint as ckpt_lib
from bdm_jax.config import ConfigError
from bdm_jax.trainer import WorkdirError, train_and_evaluate
from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**train):
    cfg = tiny.get_config()
    for k, v in train.items():
        cfg.train[k] = v
    return cfg


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row for row in map(json.loads, f)}


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fp"))
    result = train_and_evaluate(_cfg(steps=4, save_every=2), workdir)
    return workdir, result


def test_two_step_run_writes_everything(fp_run):
    workdir, result = fp_run
    assert result["step"] == 4
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    rows = _losses(workdir)
    assert sorted(rows) == [1, 2, 3, 4]
    for row in rows.values():
        assert np.isfinite(row["loss"]) and row["grad_norm"] > 0 and "eta_sec" in row and "steps_per_sec" in row
    assert os.path.getsize(result["grid"]) > 100
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model"]["model_channels"] == 32


def test_resume_is_exact(fp_run, tmp_path):
    full_dir, _ = fp_run
    part = str(tmp_path / "part")
    train_and_evaluate(_cfg(steps=2, save_every=2), part)
    train_and_evaluate(_cfg(steps=4, save_every=2), part)  # resumes from step 2
    full, resumed = _losses(full_dir), _losses(part)
    for step in (3, 4):
        assert resumed[step]["loss"] == full[step]["loss"], step
        assert resumed[step]["grad_norm"] == full[step]["grad_norm"], step
    cfg = _cfg()
    for which in ("params", "ema_params"):
        a, _ = ckpt_lib.load_params(full_dir, cfg, which)
        b, _ = ckpt_lib.load_params(part, cfg, which)
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sample_py_writes_grid_and_npz(fp_run, tmp_path):
    workdir, _ = fp_run
    out = tmp_path / "samples"
    proc = subprocess.run(
        [sys.executable, "sample.py", f"--workdir={workdir}", "--num=6", "--batch_size=4", "--steps=3",
         f"--out={out}"], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(os.listdir(out))
    npz = [f for f in files if f.endswith(".npz")]
    assert len(npz) == 1 and any(f.endswith(".png") for f in files)
    imgs = np.load(out / npz[0])["images"]
    assert imgs.shape == (6, 8, 8, 1) and imgs.dtype == np.uint8


def _run_train(args, workdir):
    return subprocess.run(
        [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}", *args],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300,
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config.no_such_field=1"], "--config.no_such_field is not a valid config override"),
        (["--config.train.steps=abc"], "--config.train.steps=abc"),
        (["--config.train.steps=-3"], "config.train.steps=-3 is not allowed: must be >= 0"),
        (["--config.data.image_size=10", "--config.model.channel_mult=(1,2,2)"],
         "config.model.image_size=10 is not allowed: must be divisible by"),
        (["--config.model.attention_resolutions=(5,)"], "config.model.attention_resolutions=(5,) is not allowed"),
        (["--config.quant.act_bits=3"], "config.quant.act_bits=3 is not allowed: one of 4, 8, 32"),
        (["--config.method=magic"], "config.method='magic' is not allowed"),
    ],
)
def test_bad_input_stops_with_one_line(args, expected, tmp_path):
    proc = _run_train(args, tmp_path / "w")
    assert proc.returncode in (1, 2)
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_checkpoint_from_another_model_config(fp_run, tmp_path):
    workdir, _ = fp_run
    cfg = _cfg(steps=6)
    cfg.model.model_channels = 64
    with pytest.raises(ckpt_lib.CheckpointError, match="model.model_channels=32 but the config says model.model_channels=64"):
        train_and_evaluate(cfg, workdir)
    proc = _run_train(["--config.model.model_channels=64", "--config.train.steps=6"], workdir)
    assert proc.returncode == 2 and "was written for model.model_channels=32" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(WorkdirError, match="is not writable"):
        train_and_evaluate(_cfg(), str(blocker / "run"))


def test_validate_errors_name_the_field():
    cfg = _cfg()
    cfg.diffusion.beta_start = 0.5
    cfg.diffusion.beta_end = 0.1
    with pytest.raises(ConfigError, match=r"config.diffusion.beta_start=0.5 .*diffusion.beta_end"):
        train_and_evaluate(cfg, "/tmp/never_created_bdm")
    assert not os.path.exists("/tmp/never_created_bdm")
