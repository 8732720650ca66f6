"""ldm_jax: Latent Diffusion Models in JAX/Flax.

Importing it before JAX's backends start gives YNNPACK the CPU reductions and Eigen the
convolutions (ldm_jax/xla_cpu.py: each the faster here; XLA_FLAGS naming the flag keeps the
user's choice)."""
from ldm_jax import xla_cpu as _xla_cpu

_xla_cpu.choose_cpu_kernels()
