"""ldm_jax/xla_cpu.py: YNNPACK runs reductions only (not convolutions) once ldm_jax is imported
before JAX starts, unless the user chose."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ldm_jax import xla_cpu

OFF = xla_cpu.FLAG + "="
SET = OFF + xla_cpu.CHOICE


def test_adds_the_flag_to_what_is_there():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_cpu.choose_cpu_kernels(env, backends_started=False)
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {SET}"
  env = {}
  assert xla_cpu.choose_cpu_kernels(env, backends_started=False)
  assert env == {"XLA_FLAGS": SET}


def test_keeps_the_users_choice_and_a_started_backend():
  mine = f"{OFF}individual_dot,individual_convolution"
  env = {"XLA_FLAGS": mine}
  assert not xla_cpu.choose_cpu_kernels(env, backends_started=False)
  assert env["XLA_FLAGS"] == mine
  env = {"XLA_FLAGS": f"{mine} {OFF}"}    # the last value counts, as in XLA
  assert xla_cpu.choose_cpu_kernels(env, backends_started=False)
  env = {}
  assert not xla_cpu.choose_cpu_kernels(env, backends_started=True)   # too late to apply
  assert env == {}


@pytest.mark.parametrize("value,eigen", [
    ("", True), ("reduce", True), ("individual_dot", True),
    ("individual_dot,individual_convolution", False),
    ("-individual_convolution", True), ("+individual_convolution", False),
    ("-individual_dot", False)])
def test_reads_which_kernels_convolutions_get(value, eigen):
  assert xla_cpu.eigen_kernels({"XLA_FLAGS": f"--foo=1 {OFF}{value}"}) is eigen
  assert not xla_cpu.eigen_kernels({"XLA_FLAGS": "--foo=1"})


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU backend")
def test_this_process_compiles_convolutions_without_ynnpack_and_reductions_with_it():
  """conftest.py imports ldm_jax before JAX starts, as the CLIs do: the flag is in effect
  (unless the developer's own XLA_FLAGS chose YNNPACK's fusions)."""
  if xla_cpu._value(os.environ.get("XLA_FLAGS", "")) != xla_cpu.CHOICE:  # pylint: disable=protected-access
    pytest.skip("XLA_FLAGS chooses YNNPACK's fusions itself")
  assert xla_cpu.eigen_kernels()
  x, w = jnp.ones((4, 32, 32, 64)), jnp.ones((3, 3, 64, 64))   # YNNPACK takes this size
  hlo = jax.jit(lambda a, b: lax.conv_general_dilated(
      a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))).lower(
          x, w).compile().as_text()
  assert "convolution" in hlo and "ynn_fusion" not in hlo   # YNNPACK's is a ynn_fusion
  sums = jax.jit(lambda a: jnp.sum(a * a, axis=(0, 1, 2)))      # a bias gradient's shape of sum
  hlo = sums.lower(x).compile().as_text()
  assert "ynn_fusion" in hlo and " reduce(" in hlo
  np.testing.assert_allclose(sums(x * 0.5), np.full(64, 4 * 32 * 32 * 0.25), rtol=1e-6)
