"""One data-parallel mesh over every device of every process, and host batches onto it.

The train step is one `jax.jit` over the 1-D mesh ('data',): the batch is sharded on its leading
axis, the train state replicated. Each process feeds its own shard of the records; arrays are
assembled with `jax.make_array_from_process_local_data`.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = 'data'
# Environment variables that mean "this is one process of several".
_MULTIHOST_ENV = ('JAX_COORDINATOR_ADDRESS', 'COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES')


def maybe_initialize_distributed() -> bool:
  """Calls jax.distributed.initialize() when the usual environment asks for several processes.

  Returns whether it initialised.
  """
  if not any(os.environ.get(k) for k in _MULTIHOST_ENV):
    return False
  # Affects only the CPU backend, whose cross-process collectives need gloo.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize()
  return True


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def device_batch(batch: dict, mesh: Mesh) -> dict:
  """Numeric arrays of this process's batch -> global arrays sharded on 'data'.

  Strings (tokens) stay behind on the host; every process passes the same number of samples.
  """
  sharding = data_sharding(mesh)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.dtype.kind in 'SUO':
      continue
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out
