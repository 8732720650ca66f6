"""models/cpu_conv.py: the CPU convolution's values and gradients (im2col matmuls, the
flipped-map input gradient) equal XLA's own, each kernel choice's rules (ldm_jax/xla_cpu.py)
send it the convolutions they name, and the others go to XLA unchanged."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ldm_jax import xla_cpu
from ldm_jax.models import cpu_conv, layers

NHWC = ("NHWC", "HWIO", "NHWC")
C = cpu_conv.MIN_CHANNELS


def _grads(conv, x, w, strides, padding):
  def loss(a, b):
    return jnp.sum(jnp.sin(conv(a, b, strides, padding, dimension_numbers=NHWC)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)


def _jaxpr(x, w, strides=(1, 1), padding="SAME") -> str:
  return str(jax.make_jaxpr(lambda a: cpu_conv.conv_general_dilated(
      a, w, strides, padding, dimension_numbers=NHWC))(x))


def _takes_it(x, w, strides=(1, 1), padding="SAME"):
  return "custom_vjp" in _jaxpr(x, w, strides, padding)


@pytest.fixture
def ynn_rules(monkeypatch):
  """The rules measured under YNNPACK's kernels (XLA_FLAGS naming its fusion flag)."""
  monkeypatch.setattr(xla_cpu, "eigen_kernels", lambda: False)


@pytest.fixture
def eigen_rules(monkeypatch):
  monkeypatch.setattr(xla_cpu, "eigen_kernels", lambda: True)


def _check_equal_xla(x, w, padding):
  assert _takes_it(x, w, padding=padding)
  (got, got_g), (want, want_g) = (_grads(f, x, w, (1, 1), padding) for f in
                                  (cpu_conv.conv_general_dilated, lax.conv_general_dilated))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, r in zip(got_g, want_g):
    np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(r))))


@pytest.mark.parametrize("kernel,padding,size", [
    (3, "SAME", (7, 9)), (3, ((1, 1), (1, 1)), (12, 10)), (3, "VALID", (7, 9)),
    (3, ((0, 1), (2, 0)), (7, 9)), (4, "SAME", (9, 9))])
def test_value_and_gradients_equal_xla(kernel, padding, size, ynn_rules):
  """YNNPACK's rules: maps of at most MAX_MATMUL_FORWARD_PIXELS outputs (7x9) take the matmul
  forward too; larger ones (12x10, 9x9) XLA's forward."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, *size, C)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, C, 6)) / np.sqrt(C), jnp.float32)
  _check_equal_xla(x, w, padding)


@pytest.mark.parametrize("padding,size", [("SAME", (2, 2)), ("SAME", (1, 2)),
                                          ("VALID", (4, 3)), (((0, 1), (2, 0)), (2, 1))])
def test_tiny_maps_equal_xla_under_eigen_rules(padding, size, eigen_rules):
  """Eigen's rules: outputs of at most TINY_MAP_PIXELS (2x2) take the matmul, any width."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, *size, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 5, 4)) / np.sqrt(5), jnp.float32)
  _check_equal_xla(x, w, padding)


@pytest.mark.parametrize("kernel,padding,size", [
    (3, "SAME", (4, 5)), (3, "VALID", (5, 4)), (3, ((0, 1), (2, 0)), (4, 3)),
    (4, "SAME", (4, 4)), (3, ((2, 2), (1, 0)), (3, 6))])
def test_flipped_gradient_form_equals_xla_under_eigen_rules(kernel, padding, size, eigen_rules):
  """Eigen's rules: a kernel with more elements than the input and output maps together (here
  k*k*64*48 against 2*h*w*112) keeps XLA's forward and kernel gradient; its input gradient
  flips the maps instead of the kernel. Asymmetric pads and an even kernel check the pads of the
  flipped side."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, *size, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 64, 48)) / 8.0, jnp.float32)
  assert "conv_general_dilated" in _jaxpr(x, w, padding=padding)       # XLA's forward
  _check_equal_xla(x, w, padding)


def test_eigen_rules_leave_larger_maps_to_xla(eigen_rules):
  w = jnp.ones((3, 3, C, 2))
  assert "conv_general_dilated" in _jaxpr(jnp.ones((1, 2, 3, C)), w)   # 6 outputs: XLA's
  assert not _takes_it(jnp.ones((1, 8, 8, C)), w)     # what YNNPACK's rules take
  wide = jnp.ones((3, 3, C, C))                         # it outweighs 2x8x8 maps, not 4x16x16
  assert _takes_it(jnp.ones((2, 8, 8, C)), wide)
  assert not _takes_it(jnp.ones((4, 16, 16, C)), wide)
  assert not _takes_it(jnp.ones((2, 8, 8, C)), wide, padding=((3, 0), (1, 1)))   # pad > k - 1
  assert not _takes_it(jnp.ones((1, 2, 2, C)), w, strides=(2, 2))
  assert not _takes_it(jnp.ones((1, 2, 2, C)), jnp.ones((1, 1, C, 2)))


def test_strided_1x1_and_narrow_convolutions_keep_xla(ynn_rules):
  x = jnp.ones((1, 4, 4, C))
  assert not _takes_it(x, jnp.ones((3, 3, C, 2)), strides=(2, 2))
  assert not _takes_it(x, jnp.ones((1, 1, C, 2)))
  big = jnp.ones((1, 16, 17, C - 1))      # 272 input pixels: over SMALL_MAP_PIXELS
  assert not _takes_it(big, jnp.ones((3, 3, C - 1, 2)))
  assert _takes_it(jnp.ones((1, 16, 17, C)), jnp.ones((3, 3, C, 2)))


def test_narrower_convolutions_take_it_on_small_maps(ynn_rules):
  n = cpu_conv.SMALL_MAP_CHANNELS
  small = jnp.ones((1, 16, 16, n))        # 256 input pixels
  assert _takes_it(small, jnp.ones((3, 3, n, 2)))
  assert not _takes_it(small[..., :n - 1], jnp.ones((3, 3, n - 1, 2)))
  assert not _takes_it(jnp.ones((1, 16, 17, n)), jnp.ones((3, 3, n, 2)))


def test_model_convs_use_it_on_the_cpu():
  assert jax.default_backend() == "cpu"
  conv = layers.conv(4)
  assert isinstance(conv, nn.Conv)
  assert conv.conv_general_dilated is cpu_conv.conv_general_dilated


def test_forward_form_follows_the_output_size(ynn_rules):
  w = jnp.ones((3, 3, C, 2))
  assert "conv_general_dilated" not in _jaxpr(jnp.ones((1, 8, 8, C)), w)   # 64 outputs: matmul
  assert "conv_general_dilated" in _jaxpr(jnp.ones((1, 8, 9, C)), w)       # 72: XLA's conv
