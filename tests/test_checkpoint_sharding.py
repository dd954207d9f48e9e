"""Checkpoints round-trip state and data position; batches land sharded on the data mesh."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  other = dict(abstract, opt_state={'count': jax.ShapeDtypeStruct((), jnp.int32)})
  with pytest.raises(ValueError, match=r'checkpoints/4: the saved train state is laid out differ'):
    again.restore(4, other)
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


def test_sampling_ops_run_per_device_under_a_mesh():
  """With the batch sharded over four devices, DCN and MSDA (values and gradients) equal the
  one-device result and communicate only sums (no device gathers another's samples)."""
  code = """
import re
import numpy as np, jax, jax.numpy as jnp
from uniscene_jax import sharding
from uniscene_jax.ops.deform_conv import modulated_deform_conv2d
from uniscene_jax.ops.deformable_attention import ms_deform_attn
mesh = sharding.make_mesh()
data, rep = sharding.data_sharding(mesh), sharding.replicated(mesh)
rng = np.random.default_rng(0)
arr = lambda *shape: jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
shapes = ((4, 8), (2, 4))
cases = {
  'dcn': (lambda x, o, m, k: modulated_deform_conv2d(x, o, m, k),
          (arr(8, 6, 7, 5), 2 * arr(8, 6, 7, 18), arr(8, 6, 7, 9), arr(3, 3, 5, 4)), 3),
  'msda': (lambda v, l, a: ms_deform_attn(v, shapes, l, a),
           (arr(8, 40, 2, 4), arr(8, 9, 2, 2, 3, 2) + 0.5, arr(8, 9, 2, 2, 3)), 3),
}
for name, (fn, args, batched) in cases.items():
  loss = lambda *a: jnp.sum(fn(*a) ** 2)
  grad = jax.value_and_grad(loss, argnums=tuple(range(len(args))))
  want = jax.jit(grad)(*args)
  shard = tuple(data if i < batched else rep for i in range(len(args)))
  with jax.set_mesh(mesh):
    compiled = jax.jit(grad, in_shardings=shard).lower(*args).compile()
  got = compiled(*args)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)
  kinds = r' (all-gather|all-reduce|all-to-all|collective-permute)(?:-start)?[(]'
  colls = re.findall(kinds, compiled.as_text())
  # Only sums: the loss over the batch, and for the DCN its kernel gradient.
  assert colls == ['all-reduce'] * {'dcn': 2, 'msda': 1}[name], (name, colls)
print("ok")
"""
  flags = f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count=4'
  env = {'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run(
    [sys.executable, '-c', code],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, **env},
  )
  assert out.returncode == 0 and 'ok' in out.stdout, out.stderr[-3000:]
