"""The device mesh: `data` x `fsdp` axes over all devices of all hosts, and multi-host start-up."""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax.errors import ConfigError

AXES = ("data", "fsdp")
# The batch is split over both axes: every device sees a different slice of every batch.
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed():
  """Calls jax.distributed.initialize() on multi-host jobs, before any other JAX call.

  Multi-host is detected from the environment: a coordinator address set explicitly
  (JAX_COORDINATOR_ADDRESS), a TPU pod (TPU_WORKER_HOSTNAMES with several hosts), or SLURM/MPI
  launchers with more than one task. On one host this does nothing.
  """
  env = os.environ
  multi = (
      bool(env.get("JAX_COORDINATOR_ADDRESS"))
      or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
      or int(env.get("SLURM_NTASKS", "1")) > 1
      or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
  )
  if multi:
    jax.distributed.initialize()
  return multi


def create_mesh(mesh_config, devices=None) -> Mesh:
  """A Mesh of shape (data, fsdp) from `config.mesh`; mesh.data = -1 takes the rest."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  fsdp = int(mesh_config.fsdp)
  data = int(mesh_config.data)
  if fsdp < 1 or n % fsdp:
    raise ConfigError(f"mesh.fsdp: {fsdp} does not divide the {n} available devices")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ConfigError(f"mesh: data x fsdp = {data} x {fsdp} = {data * fsdp} but {n} devices "
                      f"are available (set mesh.data=-1 to use all of them)")
  if len(devices) == len(jax.devices()) and jax.process_count() == 1:
    grid = mesh_utils.create_device_mesh((data, fsdp), devices)
  else:
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
  return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over every device; the other axes whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
