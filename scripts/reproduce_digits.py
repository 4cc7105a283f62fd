"""Reproduce BinaryDM's comparison and ablation (SPEC §10) on scikit-learn's embedded digits.

    # full size (the numbers in docs/results.md; a few minutes on one GPU)
    python scripts/reproduce_digits.py --out=workdirs/reproduce_digits --docs=docs/results.md
    # CPU smoke version: every row and code path, numbers meaningless (7 CPU-minutes; 18 min wall on 2
    # heavily shared cores); add --rows=binarydm_w1a4 for a ~2-minute smoke of one QAT row
    python scripts/reproduce_digits.py --out=/tmp/repro --model=tiny --scale=0.01 --num_samples=128 --sample_steps=10

One FP teacher is trained (configs/digits.py's pretraining), then every row is a train.py-equivalent
QAT run from that teacher (bdm_jax.trainer.train_and_evaluate with config overrides), evaluated with
bdm_jax.evaluation.evaluate_workdir (digits-classifier FID / sFID / IS / precision / recall, SPEC §9
weight size). Rows:

* comparison (paper Table 1 layout): FP; naive baseline W1A32 / W1A8 / W1A4; BinaryDM W1A32 / W1A8 / W1A4;
* ablation (paper v1, W1A32): vanilla, +multi-basis (LMB) only, +LRM only, LMB+LRM, each with progressive
  binarization off, and LMB+LRM with it on (= BinaryDM W1A32);
* investigation (not in the paper, only run when named): BinaryDM W1A8 / W1A4 with FP attention operands
  and W1A8 with the dynamic LSQ step, to find why W1A8 scores worst on digits (docs/results.md).

Runs with identical resolved configs are trained once (vanilla = baseline W1A32, LMB+LRM+progressive =
BinaryDM W1A32). Everything goes under --out: runs/<row>/ (workdirs, each with eval/metrics.json),
grids/<row>.png, results.json, results.md. Rerunning resumes: finished rows are reused, unfinished
training continues from its checkpoint, sampling from its shards. --docs also writes the Markdown
report there, with the grids copied next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    label: str
    group: str  # comparison | ablation | investigation
    overrides: tuple  # ((dotted config field, value), ...)


def _q(method: str, act_bits: int = 32, **switches: Any) -> tuple:
    return (("method", method), ("quant.act_bits", act_bits)) + tuple((f"quant.{k}", v) for k, v in switches.items())


ROWS = (
    Row("fp", "FP", "comparison", (("method", "fp"),)),
    Row("baseline_w1a32", "Baseline W1A32", "comparison", _q("baseline", 32)),
    Row("baseline_w1a8", "Baseline W1A8", "comparison", _q("baseline", 8)),
    Row("baseline_w1a4", "Baseline W1A4", "comparison", _q("baseline", 4)),
    Row("binarydm_w1a32", "BinaryDM W1A32", "comparison", _q("binarydm", 32)),
    Row("binarydm_w1a8", "BinaryDM W1A8", "comparison", _q("binarydm", 8)),
    Row("binarydm_w1a4", "BinaryDM W1A4", "comparison", _q("binarydm", 4)),
    Row("abl_vanilla", "Vanilla", "ablation", _q("binarydm", 32, multi_basis=False, lrm="none", progressive=False)),
    Row("abl_lmb", "+LMB", "ablation", _q("binarydm", 32, multi_basis=True, lrm="none", progressive=False)),
    Row("abl_lrm", "+LRM", "ablation", _q("binarydm", 32, multi_basis=False, lrm="pca", progressive=False)),
    Row("abl_lmb_lrm", "+LMB +LRM", "ablation", _q("binarydm", 32, multi_basis=True, lrm="pca", progressive=False)),
    Row("abl_lmb_lrm_prog", "+LMB +LRM +progressive", "ablation",
        _q("binarydm", 32, multi_basis=True, lrm="pca", progressive=True)),
    # Not in the paper: why W1A8 scores worse than W1A4 and W1A32 here (docs/results.md). Only run when named.
    Row("inv_w1a8_attn_fp", "BinaryDM W1A8, attention operands FP", "investigation",
        _q("binarydm", 8, quantize_attention=False)),
    Row("inv_w1a8_dynamic", "BinaryDM W1A8, dynamic LSQ step", "investigation", _q("binarydm", 8, act_scale="dynamic")),
    Row("inv_w1a4_attn_fp", "BinaryDM W1A4, attention operands FP", "investigation",
        _q("binarydm", 4, quantize_attention=False)),
)

# SPEC §10: LDM-4 LSUN-Bedrooms FID, DDIM 100 (paper v1), for orientation next to ours.
PAPER_FID = {"fp": 3.09, "baseline_w1a32": 26.43, "baseline_w1a8": 21.18, "baseline_w1a4": 39.69,
             "binarydm_w1a32": 6.42, "binarydm_w1a8": 6.60, "binarydm_w1a4": 7.11,
             "abl_vanilla": 27.33, "abl_lmb": 10.27, "abl_lrm": 27.37, "abl_lmb_lrm_prog": 6.42}


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------
def _set(cfg: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value


def base_config(args: argparse.Namespace) -> tuple[Any, list[tuple[str, Any]]]:
    """configs/digits.py scaled by --scale (steps, progressive interval, warmup), plus sampler settings.
    Returns (config, the overrides applied, for the commands in the report)."""
    from configs import digits

    cfg = digits.get_config()
    ov_model = []
    if args.model == "tiny":  # configs/tiny.py's UNet at 8x8: far less to compile, for CPU smoke runs
        ov_model = [("data.image_size", 8), ("model.model_channels", 32), ("model.attention_resolutions", (4,)),
                    ("model.norm_groups", 8)]
    elif args.model == "cifar":  # the DDPM CIFAR-10 UNet (35.7M params at 3 channels) on 32x32 digits, bf16
        ov_model = [("data.image_size", 32), ("model.model_channels", 128), ("model.channel_mult", (1, 2, 2, 2)),
                    ("model.num_res_blocks", 2), ("model.attention_resolutions", (16,)), ("model.dropout", 0.1),
                    ("model.dtype", "bfloat16"), ("train.batch_size", 64), ("pretrain.lr", 2e-4),
                    ("train.lr", 2e-5), ("train.ema_decay", 0.999)]
    with cfg.unlocked():
        for k, v in ov_model:
            _set(cfg, k, v)  # data.image_size is a reference shared with model.image_size
    s = args.scale
    qat = args.steps if args.steps is not None else max(2, round(cfg.train.steps * s))
    pre = args.pretrain_steps if args.pretrain_steps is not None else max(2, round(cfg.pretrain.steps * s))
    ov = ov_model + [
        ("seed", args.seed),
        ("train.steps", qat),
        ("pretrain.steps", pre),
        ("train.log_every", min(cfg.train.log_every, qat)),
        ("train.save_every", min(cfg.train.save_every, max(qat, pre))),
        ("quant.progressive_interval", max(1, round(cfg.quant.progressive_interval * min(s, 1.0)))),
        ("sample.steps", args.sample_steps),
    ]
    with cfg.unlocked():
        for k, v in ov[len(ov_model):]:
            _set(cfg, k, v)
    return cfg, ov


def row_config(base: Any, row: Row, teacher_dir: str) -> Any:
    import ml_collections

    cfg = ml_collections.ConfigDict(base.to_dict())
    with cfg.unlocked():
        for k, v in row.overrides:
            _set(cfg, k, v)
        if row.name == "fp":  # the teacher: the pretraining stage of configs/digits.py
            cfg.train.steps, cfg.train.lr = base.pretrain.steps, base.pretrain.lr
        else:
            cfg.teacher_workdir = teacher_dir
        cfg.train.warmup_steps = warmup_steps(base, cfg.train.steps)
    return cfg


def warmup_steps(base: Any, steps: int) -> int:
    """configs/digits.py's warmup, shortened for runs scaled below 10x it."""
    return min(base.train.warmup_steps, max(1, steps // 10))


def run_key(cfg: Any) -> str:
    """Identity of a run: the resolved config except `method` (baseline = binarydm with its switches off)."""
    from bdm_jax.config import validate

    d = validate(cfg).to_dict()
    d.pop("method")
    return json.dumps(d, sort_keys=True, default=str)


def train_command(wd: str, overrides: list[tuple[str, Any]], row: Row, teacher_dir: str, base: Any) -> str:
    parts = ["python train.py --config=configs/digits.py", f"--workdir={wd}"]
    items = list(overrides) + list(row.overrides)
    steps = base.pretrain.steps if row.name == "fp" else base.train.steps
    if row.name == "fp":
        items += [("train.steps", base.pretrain.steps), ("train.lr", base.pretrain.lr)]
    else:
        items.append(("teacher_workdir", teacher_dir))
    items.append(("train.warmup_steps", warmup_steps(base, steps)))
    seen = {}
    for k, v in items:
        seen[k] = v
    for k, v in seen.items():
        parts.append(shlex.quote(f"--config.{k}={v}"))
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def _fmt(v: Any, f: str = "{:.2f}") -> str:
    return "-" if v is None else f.format(v)


def markdown_report(results: list[dict], args: argparse.Namespace, overrides: list, grid_dir_rel: str,
                    env: dict) -> str:
    from bdm_jax.evaluation import compare_table

    by = {r["name"]: r for r in results}
    lines = [
        f"# Results: BinaryDM on scikit-learn digits ({env['image_size']}x{env['image_size']}, real handwritten digits)",
        "",
        "Written by `scripts/reproduce_digits.py`; every number below was measured by that run.",
        "",
        f"- Command: `{env['command']}`",
        f"- Machine: {env['devices']} (jax {env['jax']}), {env['minutes']:.1f} min in total.",
        f"- Training: FP teacher {env['pretrain_steps']} steps, each QAT row {env['qat_steps']} steps from that "
        f"teacher (configs/digits.py{', tiny UNet' if args.model == 'tiny' else ''}, scale {args.scale}).",
        f"- Evaluation: {args.num_samples} samples per model, DDIM {args.sample_steps} steps, eta 0; features of the "
        f"digits classifier (test accuracy {env.get('classifier_accuracy', '-')}) against all 1,797 digits; "
        "FID/sFID (classifier penultimate / conv features), IS (its 10-class softmax), improved precision/recall "
        "(k=3).",
        "- Weight size: SPEC §9 (1 bit per binarized weight per basis + FP32 scales, FP layers, biases, norms).",
        "",
        "Digits-classifier FIDs are on another scale than Inception FIDs; compare rows with each other, not with the "
        "paper's numbers (LDM-4 LSUN-Bedrooms, Inception), which are shown for orientation only.",
        "",
        "## Comparison (paper Table 1 layout)",
        "",
        compare_table([dict(by[n], name=by[n]["label"]) for n in
                       ("fp", "baseline_w1a32", "baseline_w1a8", "baseline_w1a4", "binarydm_w1a32", "binarydm_w1a8",
                        "binarydm_w1a4") if n in by]),
        "",
        "| setting | FP FID | baseline FID | BinaryDM FID | paper (Bedrooms) FP / baseline / BinaryDM |",
        "|---|---|---|---|---|",
    ]
    for bits in (32, 8, 4):
        b, d = by.get(f"baseline_w1a{bits}"), by.get(f"binarydm_w1a{bits}")
        paper = " / ".join(f"{PAPER_FID[k]:.2f}" for k in ("fp", f"baseline_w1a{bits}", f"binarydm_w1a{bits}"))
        lines.append(f"| W1A{bits} | {_fmt(by.get('fp', {}).get('fid'))} | {_fmt(b and b.get('fid'))} | "
                     f"{_fmt(d and d.get('fid'))} | {paper} |")
    abl = [r for r in results if r["group"] == "ablation"]
    if abl:
        lines += ["", "## Ablation (paper v1, W1A32)", "",
                  "| variant | multi-basis | LRM | progressive | FID ↓ | sFID ↓ | IS ↑ | precision ↑ "
                  "| recall ↑ | paper FID |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in abl:
            q = dict(r["overrides"])
            same = f" (= {by[r['same_as']]['label']})" if r.get("same_as") else ""
            lines.append(
                f"| {r['label']}{same} | {'yes' if q.get('quant.multi_basis') else 'no'} | "
                f"{'yes' if q.get('quant.lrm') == 'pca' else 'no'} | {'yes' if q.get('quant.progressive') else 'no'} | "
                f"{_fmt(r.get('fid'))} | {_fmt(r.get('sfid'))} | {_fmt(r.get('is'))} | "
                f"{_fmt(r.get('precision'), '{:.3f}')} | "
                f"{_fmt(r.get('recall'), '{:.3f}')} | {PAPER_FID.get(r['name'], '-')} |")
    inv = [r for r in results if r["group"] == "investigation"]
    if inv:
        lines += ["", "## Investigation rows (not in the paper)", "",
                  compare_table([dict(r, name=r["label"]) for r in inv])]
    lines += ["", "## Sample grids (first 64 evaluation samples of each model)", ""]
    for r in results:
        if r.get("grid_copy") and not r.get("same_as"):
            lines.append(f"**{r['label']}** (FID {_fmt(r.get('fid'))})  ")
            lines.append(f"![{r['label']}]({grid_dir_rel}/{os.path.basename(r['grid_copy'])})")
            lines.append("")
    lines += ["## Exact commands", "",
              "Each row is equivalent to these train.py / evaluate.py calls (the script runs them in-process):", "",
              "```"]
    for r in results:
        if not r.get("same_as"):
            lines.append(r["train_command"])
            lines.append(r["eval_command"])
    lines += ["```", "", "## Timings", "",
              "Seconds spent by the invocation that finished the row (a resumed row shows only the rest).", "",
              "| row | train s | eval s | steps |", "|---|---|---|---|"]
    for r in results:
        if not r.get("same_as"):
            lines.append(f"| {r['label']} | {_fmt(r.get('train_seconds'), '{:.0f}')} | "
                         f"{_fmt(r.get('eval_seconds'), '{:.0f}')} | {r.get('steps', '-')} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="workdirs/reproduce_digits", help="output directory (everything goes here)")
    p.add_argument("--model", choices=("digits", "tiny", "cifar"), default="digits",
                   help="digits: configs/digits.py (16x16); tiny: configs/tiny.py's UNet at 8x8 (CPU smoke runs); "
                        "cifar: the DDPM CIFAR-10 UNet on 32x32 digits in bfloat16 (GPU)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies configs/digits.py's training steps")
    p.add_argument("--steps", type=int, default=None, help="QAT steps per row (overrides --scale)")
    p.add_argument("--pretrain_steps", type=int, default=None, help="FP teacher steps (overrides --scale)")
    p.add_argument("--num_samples", type=int, default=None,
                   help="samples per model (default 5000, or less at scale < 1)")
    p.add_argument("--sample_steps", type=int, default=100, help="DDIM steps (paper: 100)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="samples per device per batch (default 500, 128 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default="all", help="comma-separated row names, 'comparison', 'ablation', "
                   "'investigation' or 'all' (= comparison and ablation)")
    p.add_argument("--docs", default=None, help="also write the Markdown report here (e.g. docs/results.md)")
    p.add_argument("--deterministic", action="store_true",
                   help="XLA_FLAGS=--xla_gpu_deterministic_ops=true: bit-reproducible GPU training (slower), so a "
                        "teacher retrained in another session is the same teacher")
    p.add_argument("--cache_dir", default=None, help="classifier / reference-stats cache (default <out>/cache)")
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.error(f"--scale={args.scale} must be > 0")
    for name in ("steps", "pretrain_steps", "num_samples", "sample_steps", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name}={v} must be >= 1")
    if args.num_samples is None:
        args.num_samples = max(128, round(5000 * min(args.scale, 1.0)))
    names = {r.name for r in ROWS}
    if args.rows == "all":  # the paper's rows; investigation rows only when named
        args.row_names = [r.name for r in ROWS if r.group != "investigation"]
    elif args.rows in ("comparison", "ablation", "investigation"):
        args.row_names = [r.name for r in ROWS if r.group == args.rows]
    else:
        args.row_names = [n.strip() for n in args.rows.split(",") if n.strip()]
        bad = [n for n in args.row_names if n not in names]
        if bad:
            p.error(f"--rows: unknown {bad}; allowed: {sorted(names)}, comparison, ablation, investigation, all")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.deterministic:  # must be set before JAX starts its backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()
    import jax

    from bdm_jax import evaluation
    from bdm_jax.cli import setup_logging
    from bdm_jax.trainer import train_and_evaluate

    setup_logging()
    t_all = time.time()
    out = os.path.abspath(args.out)
    runs_dir, grid_dir = os.path.join(out, "runs"), os.path.join(out, "grids")
    os.makedirs(runs_dir, exist_ok=True)
    os.makedirs(grid_dir, exist_ok=True)
    cache = args.cache_dir or os.path.join(out, "cache")
    on_cpu = jax.default_backend() == "cpu"
    bs = args.batch_size or (128 if on_cpu else 500)
    base, overrides = base_config(args)
    teacher_dir = os.path.join(runs_dir, "fp")
    wanted = [r for r in ROWS if r.name in args.row_names or (r.name == "fp")]  # every row needs the teacher

    results: list[dict] = []
    done_keys: dict[str, str] = {}
    for row in wanted:
        cfg = row_config(base, row, teacher_dir)
        key = run_key(cfg)
        rec = {"name": row.name, "label": row.label, "group": row.group, "overrides": list(row.overrides)}
        if key in done_keys:  # same experiment under another name: reuse its run
            src = next(r for r in results if r["name"] == done_keys[key])
            rec.update({k: v for k, v in src.items() if k not in ("name", "label", "group", "overrides")},
                       same_as=src["name"])
            results.append(rec)
            print(f"[reproduce] {row.name}: same run as {src['name']}", flush=True)
            continue
        wd = os.path.join(runs_dir, row.name)
        print(f"[reproduce] === {row.name} ({row.label}) -> {wd}", flush=True)
        t0 = time.time()
        train_and_evaluate(cfg, wd)
        t_train = time.time() - t0
        t0 = time.time()
        m = evaluation.evaluate_workdir(wd, args.num_samples, bs, steps=args.sample_steps, seed=args.seed,
                                        cache_dir=cache, progress=True)
        t_eval = time.time() - t0
        grid_copy = os.path.join(grid_dir, f"{row.name}.png")
        shutil.copyfile(m["grid"], grid_copy)
        rec.update({k: m[k] for k in ("fid", "sfid", "is", "is_std", "precision", "recall", "weight_bytes",
                                      "fp32_weight_bytes", "compression", "num_samples", "checkpoint_step")})
        rec.update(workdir=wd, steps=m["checkpoint_step"], train_seconds=t_train, eval_seconds=t_eval,
                   grid_copy=grid_copy, feature_extractor=m["feature_extractor"],
                   train_command=train_command(wd, overrides, row, teacher_dir, base),
                   eval_command=(f"python evaluate.py --workdir={wd} --num_samples={args.num_samples} "
                                 f"--batch_size={bs} --steps={args.sample_steps} --seed={args.seed} "
                                 f"--cache_dir={cache}"))
        results.append(rec)
        done_keys[key] = row.name
        print(f"[reproduce] {row.name}: FID {m['fid']:.3f} sFID {m['sfid']:.3f} IS {m['is']:.3f} "
              f"P {m['precision']:.3f} R {m['recall']:.3f} ({t_train:.0f}s train, {t_eval:.0f}s eval)", flush=True)
        _write_json(os.path.join(out, "results.json"), results)  # partial results survive a crash

    fe = results[0].get("feature_extractor", {})
    cmd = [os.path.relpath(__file__, os.getcwd())] + (argv if argv is not None else sys.argv[1:])
    env = {"command": "python " + " ".join(cmd),
           "devices": f"{len(jax.devices())} x {jax.devices()[0].device_kind}", "jax": jax.__version__,
           "minutes": (time.time() - t_all) / 60, "image_size": base.data.image_size, "pretrain_steps": base.pretrain.steps, "qat_steps": base.train.steps,
           "classifier_accuracy": f"{fe['test_accuracy']:.3f}" if fe.get("test_accuracy") else "-"}
    _write_json(os.path.join(out, "results.json"), {"env": env, "args": vars(args), "rows": results})
    report = markdown_report(results, args, overrides, "grids", env)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report)
    if args.docs:
        docs = os.path.abspath(args.docs)
        img_dir = os.path.splitext(docs)[0] + "_grids"
        os.makedirs(img_dir, exist_ok=True)
        for r in results:
            if r.get("grid_copy") and not r.get("same_as"):
                shutil.copyfile(r["grid_copy"], os.path.join(img_dir, os.path.basename(r["grid_copy"])))
        with open(docs, "w") as f:
            f.write(markdown_report(results, args, overrides, os.path.basename(img_dir), env))
        print(f"[reproduce] wrote {docs} (grids in {img_dir})")
    print(evaluation.compare_table([dict(r, name=r["label"]) for r in results]))
    print(f"[reproduce] wrote {os.path.join(out, 'results.md')} and results.json in {env['minutes']:.1f} min")
    return 0


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
