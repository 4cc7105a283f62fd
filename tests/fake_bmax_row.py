"""A stand-in for `benchmarks.train_step` in run_all's largest-batch test: the row is 'oom' above --limit."""

import argparse
import json
import os

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    for flag in ("--out", "--name", "--note"):
        p.add_argument(flag, default="")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--limit", type=int, required=True)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    fits = a.batch <= a.limit
    rec = dict(kind="train", name=a.name, model="cifar10", method="fp", act_bits=32, dtype="bf16", batch=a.batch,
               requested_batch=a.batch, note=a.note, pid=os.getpid(), status="ok" if fits else "oom",
               preallocate=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"))
    if not fits:
        rec["error"] = "RESOURCE_EXHAUSTED: Out of memory (fake)"
    os.makedirs(os.path.join(a.out, "train"), exist_ok=True)
    with open(os.path.join(a.out, "train", f"{a.name}.json"), "w") as f:
        json.dump(rec, f)
