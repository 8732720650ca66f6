"""GroupNorm + SiLU as one layer (models/norms.py): flax's values, gradients and parameters."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.norms import GroupNormSiLU


class _FlaxReference(nn.Module):
  groups: int
  eps: float

  @nn.compact
  def __call__(self, x):
    return nn.silu(nn.GroupNorm(num_groups=self.groups, epsilon=self.eps, dtype=jnp.float32,
                                name="norm")(x))


@pytest.mark.parametrize("own_vjp", [True, False])
@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 64), 32), ((3, 4, 4, 96), 32),
                                          ((2, 7, 48), 8)])
def test_values_and_gradients_equal_flax_groupnorm_then_silu(shape, groups, own_vjp):
  eps = 1e-5
  kx, kg, ks, kb = jax.random.split(jax.random.PRNGKey(0), 4)
  x = 3.0 * jax.random.normal(kx, shape) + 1.5         # an offset mean tests the centring
  g = jax.random.normal(kg, shape)
  c = shape[-1]
  params = {"scale": 1.0 + 0.3 * jax.random.normal(ks, (c,)),
            "bias": 0.5 * jax.random.normal(kb, (c,))}
  ours = GroupNormSiLU(num_groups=groups, epsilon=eps, own_vjp=own_vjp)
  ref = _FlaxReference(groups, eps)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)["params"]) == \
      jax.tree.map(jnp.shape, ref.init(jax.random.PRNGKey(1), x)["params"]["norm"])
  loss = lambda mod, p, x: jnp.sum(mod.apply({"params": p}, x) * g)  # noqa: E731
  want = jax.grad(lambda p, x: loss(ref, {"norm": p}, x), (0, 1))(params, x)
  got = jax.grad(lambda p, x: loss(ours, p, x), (0, 1))(params, x)
  np.testing.assert_allclose(ours.apply({"params": params}, x),
                             ref.apply({"params": {"norm": params}}, x), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(a))))


def test_channels_that_do_not_split_into_the_groups_are_refused():
  with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
    GroupNormSiLU(num_groups=32).init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 48)))
