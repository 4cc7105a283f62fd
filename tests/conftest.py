import os

# Tests run on the CPU backend with float32 defaults; keep XLA from grabbing every core's threads twice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
