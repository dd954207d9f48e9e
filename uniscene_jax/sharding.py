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


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value else None


def maybe_initialize_distributed() -> bool:
  """Calls jax.distributed.initialize() when the environment describes several processes.

  JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID), or a Slurm or Open MPI
  job of more than one task (detected by JAX itself). Returns whether it initialised.
  """
  explicit = bool(os.environ.get('JAX_COORDINATOR_ADDRESS'))
  tasks = max(_int_env('SLURM_NTASKS') or 1, _int_env('OMPI_COMM_WORLD_SIZE') or 1)
  if not explicit and tasks <= 1:
    return False
  # Affects only the CPU backend, whose cross-process collectives need gloo.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {}
  if explicit:
    kwargs = dict(
      num_processes=_int_env('JAX_NUM_PROCESSES'), process_id=_int_env('JAX_PROCESS_ID')
    )
  jax.distributed.initialize(**kwargs)
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
