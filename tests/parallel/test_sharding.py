"""Partition rules as data, applied to whole train states on an 8-device (4, 2) mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax.config import ConfigError
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding


@pytest.fixture
def mesh():
  import ml_collections  # pylint: disable=g-import-not-at-top
  return mesh_lib.create_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 2}))


def test_mesh_shape_and_errors(mesh):
  import ml_collections  # pylint: disable=g-import-not-at-top
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  with pytest.raises(ConfigError, match=r"mesh.fsdp: 3 does not divide the 8"):
    mesh_lib.create_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 3}))
  with pytest.raises(ConfigError, match=r"data x fsdp = 2 x 2 = 4 but 8 devices"):
    mesh_lib.create_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2}))


def test_rules_pick_trailing_axes_and_respect_divisibility(mesh):
  rules = sharding.DEFAULT_RULES
  assert sharding.spec_for("params/enc/conv/kernel", (3, 3, 16, 64), mesh, rules) == \
      P(None, None, None, "fsdp")
  assert sharding.spec_for("params/dense/kernel", (16, 64), mesh, rules) == P(None, "fsdp")
  assert sharding.spec_for("params/emb/embedding", (10, 8), mesh, rules) == P("fsdp", None)
  # 63 output channels do not split over 2 devices: that dimension stays whole.
  assert sharding.spec_for("params/conv/kernel", (3, 3, 16, 63), mesh, rules) == \
      P(None, None, None, None)
  assert sharding.spec_for("params/conv/bias", (64,), mesh, rules) == P()
  assert sharding.spec_for("params/conv/kernel", (3, 3, 4, 4), mesh, rules, min_size=1000) == P()
  custom = ((r"decoder/.*kernel$", ("fsdp", None)),)
  assert sharding.spec_for("p/decoder/c/kernel", (3, 3, 16, 8), mesh, custom) == \
      P(None, None, "fsdp", None)
  assert sharding.spec_for("p/encoder/c/kernel", (3, 3, 16, 8), mesh, custom) == P()


def test_optimizer_state_shards_like_params(mesh):
  params = {"conv": {"kernel": jnp.ones((3, 3, 8, 32)), "bias": jnp.ones((32,))}}
  state = {"params": params, "opt": optax.adam(1e-3).init(params)}
  shardings = sharding.tree_shardings(state, mesh)
  adam = shardings["opt"][0]
  assert shardings["params"]["conv"]["kernel"].spec == P(None, None, None, "fsdp")
  assert adam.mu["conv"]["kernel"].spec == P(None, None, None, "fsdp")
  assert adam.nu["conv"]["kernel"].spec == P(None, None, None, "fsdp")
  assert adam.count.spec == P()
  placed = jax.device_put(state, shardings)
  kernel = placed["params"]["conv"]["kernel"]
  # Each device holds half of the output channels.
  assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 8, 16)}
  np.testing.assert_array_equal(np.asarray(kernel), np.ones((3, 3, 8, 32)))
