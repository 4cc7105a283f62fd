"""GPU/TPU/CPU benchmarks of bdm-jax training and sampling (issue 9); `python -m benchmarks.run_all --out=DIR`."""
