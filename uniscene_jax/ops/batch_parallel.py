"""Per-device execution of sampling ops over a batch sharded across a mesh.

The sampling ops gather rows of a table and loop over (sample, head) maps. With the batch sharded
over devices (data parallelism in one `jax.jit`), XLA's partitioner cannot see that a sample only
reads its own rows: it gathers every device's table and indices and runs the whole global batch
on each device. Under a mesh context (`jax.set_mesh`) `over_batch` runs the op instead as a
`shard_map` over the leading axis, each device on its own samples, with no communication.
"""

import functools

import jax
from jax.sharding import PartitionSpec


def over_batch(fn):
  """fn(*arrays) -> array(s), computed independently per index of every argument's and result's
  leading axis. Under a mesh whose size divides that axis, each device computes its own slice of
  it; otherwise (no mesh, one device, or a batch the mesh does not divide) it is fn itself."""

  @functools.wraps(fn)
  def wrapped(*args):
    mesh = jax.sharding.get_abstract_mesh()
    size = 1 if mesh.empty else mesh.size
    if size == 1 or any(a.shape[0] % size for a in jax.tree.leaves(args)):
      return fn(*args)
    spec = PartitionSpec(mesh.axis_names)
    # check_vma off: the ops start loop buffers from constants, which it would ask to mark.
    return jax.shard_map(fn, in_specs=spec, out_specs=spec, check_vma=False)(*args)

  return wrapped
