"""ldm_jax/xla_cpu.py: YNNPACK's fusions are turned off before JAX starts, unless the user chose."""
import jax
import jax.numpy as jnp
import pytest
from jax import lax

from ldm_jax import xla_cpu

OFF = xla_cpu.FLAG + "="


def test_adds_the_flag_to_what_is_there():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_cpu.prefer_eigen_kernels(env, backends_started=False)
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {OFF}"
  env = {}
  assert xla_cpu.prefer_eigen_kernels(env, backends_started=False)
  assert env == {"XLA_FLAGS": OFF}


def test_keeps_the_users_choice_and_a_started_backend():
  env = {"XLA_FLAGS": f"{OFF}individual_dot"}
  assert not xla_cpu.prefer_eigen_kernels(env, backends_started=False)
  assert env["XLA_FLAGS"] == f"{OFF}individual_dot"
  env = {"XLA_FLAGS": f"{OFF}individual_dot {OFF}"}    # the last value counts, as in XLA
  assert xla_cpu.prefer_eigen_kernels(env, backends_started=False)
  env = {}
  assert not xla_cpu.prefer_eigen_kernels(env, backends_started=True)   # too late to apply
  assert env == {}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU backend")
def test_this_process_compiles_convolutions_without_ynnpack():
  """conftest.py imports ldm_jax before JAX starts, as the CLIs do: the flag is in effect."""
  assert xla_cpu.eigen_kernels()
  x, w = jnp.ones((4, 32, 32, 64)), jnp.ones((3, 3, 64, 64))   # YNNPACK takes this size
  hlo = jax.jit(lambda a, b: lax.conv_general_dilated(
      a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))).lower(
          x, w).compile().as_text()
  assert "convolution" in hlo and "ynn_fusion" not in hlo   # YNNPACK's is a ynn_fusion
