"""Checkpoints round-trip state and data position; batches land sharded on the data mesh."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from uniscene_jax.checkpoint import Checkpoints


def test_checkpoints_round_trip_and_keep(tmp_path):
  state = {
    'params': {'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones(3, jnp.bfloat16)},
    'step': jnp.int32(0),
    'rng': jax.random.key_data(jax.random.key(3)),
  }
  ckpt = Checkpoints(str(tmp_path), every_steps=2, keep=2)
  for step in range(6):
    state = jax.tree.map(lambda x: x + 1, state)
    ckpt.save(step, state, data_state=f'{{"position": {step}}}'.encode())
  ckpt.wait()
  assert ckpt.all_steps() == [2, 4] and ckpt.latest_step() == 4
  ckpt.close()
  again = Checkpoints(str(tmp_path), every_steps=2, keep=2)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored, data = again.restore(4, abstract)
  want = jax.tree.map(lambda x: x - 1, state)  # the state saved at step 4
  jax.tree.map(np.testing.assert_array_equal, restored, want)
  assert restored['params']['b'].dtype == jnp.bfloat16
  assert data == b'{"position": 4}'
  again.close()


def test_device_batch_shards_over_four_devices():
  code = """
import numpy as np, jax
from uniscene_jax import sharding
mesh = sharding.make_mesh()
assert mesh.devices.size == 4
batch = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "token": np.array([b"a"] * 8)}
out = sharding.device_batch(batch, mesh)
assert set(out) == {"x"} and out["x"].sharding.spec == jax.sharding.PartitionSpec("data")
assert len(out["x"].addressable_shards) == 4 and out["x"].addressable_shards[1].data.shape == (2, 3)
total = jax.jit(lambda x: x.sum(0), out_shardings=sharding.replicated(mesh))(out["x"])
np.testing.assert_array_equal(total, batch["x"].sum(0))
"""
  flags = f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count=4'
  env = {'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu'}
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120, env={**os.environ, **env})
