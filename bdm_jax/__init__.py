"""bdm-jax: BinaryDM (weight-binarized diffusion models) in JAX/Flax."""

__version__ = "0.1.0"
