"""The train step and loop: compiled once, no host transfers, devices agree, exact resumption."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from uniscene_jax import models, optim, train


def _step_setup(bev=20, pool=10, image=(60, 90)):
  cfg = pretrain.get_config('tiny')
  cfg.data.image_size = image
  cfg.data.target_pool = pool
  cfg.model.bev_h = cfg.model.bev_w = bev
  mc = models.model_config_from(cfg)
  model = models.build_model(mc)
  abstract = jax.eval_shape(lambda: models.init_variables(mc, jax.random.key(0))['params'])
  tx = optim.make_optimizer(train.optim_config(cfg), 10, abstract)
  return cfg, mc, model, tx


def _batch(b, seed=0, hw=(64, 96), t=2):
  rng = np.random.default_rng(seed)
  eye = np.eye(4, dtype=np.float32)
  l2i = np.tile(eye, (b, t, 6, 1, 1))
  l2i[..., 0, 2] = 40.0  # a forward-looking pinhole so that some anchors project inside
  l2i[..., 1, 2] = 30.0
  l2i[..., 0, 0] = l2i[..., 1, 1] = 30.0
  return {
    'img': rng.integers(0, 256, (b, t, 6, *hw, 3)).astype(np.uint8),
    'lidar2img': l2i,
    'ego2lidar': np.tile(eye, (b, t, 1, 1)),
    'can_bus': rng.normal(0, 0.1, (b, t, 18)).astype(np.float32),
    'prev_bev_exists': np.array([[False, True]] * b),
    'occ_target': (rng.random((b, 200, 200, 16)) < 0.1).astype(np.uint8),
  }


@pytest.mark.slow(seconds=30)
def test_step_compiles_once_stays_on_device_and_skips_non_finite():
  cfg, mc, model, tx = _step_setup()
  state = jax.jit(lambda k: train.create_train_state(mc, tx, k))(jax.random.key(0))
  step = jax.jit(train.make_train_step(model, tx, cfg), donate_argnums=(0,))
  batches = [_batch(1, seed=s) for s in range(4)]
  batches[3]['can_bus'][0, 1, 5] = np.nan  # poisons the CAN-bus MLP, hence loss and gradients
  batches = [jax.device_put(b) for b in batches]
  metrics = []
  with jax.transfer_guard('disallow'):
    for batch in batches[:3]:
      state, m = step(state, batch)
      metrics.append(m)
  before = jax.tree.map(np.asarray, state.params)
  state, bad = step(state, batches[3])
  assert step._cache_size() == 1
  assert all(bool(m['finite']) for m in metrics) and int(state.step) == 3
  assert not bool(bad['finite'])  # not applied: same parameters, same step
  jax.tree.map(np.testing.assert_array_equal, state.params, before)
  with pytest.raises(train.NonFiniteError, match='step 7: loss or gradients are not finite'):
    train._check(7, bad)


_DEVICES = """
import sys
import jax, numpy as np
sys.path.insert(0, '.')
from uniscene_jax import sharding
sharding.maybe_initialize_distributed()
from tests.test_train import _step_setup, _batch
from uniscene_jax import train
cfg, mc, model, tx = _step_setup()
batch = _batch(4, seed=2)
step = train.make_train_step(model, tx, cfg)
mesh = sharding.make_mesh()
assert mesh.devices.size == 4 and jax.process_count() == 2
rep = sharding.replicated(mesh)
state = jax.jit(lambda k: train.create_train_state(mc, tx, k), out_shardings=rep)(jax.random.key(0))
i = jax.process_index()
local = {k: v[i * 2 : (i + 1) * 2] for k, v in batch.items()}  # this process's share
sharded = sharding.device_batch(local, mesh)
shardings = dict(in_shardings=(rep, sharding.data_sharding(mesh)), out_shardings=(rep, rep))
with jax.set_mesh(mesh):  # as train.py: the sampling ops run per device
  compiled = jax.jit(step, **shardings).lower(state, sharded).compile()
  four, m4 = compiled(state, sharded)
# Each device computes its own samples: XLA gathers no batch data across devices.
hlo = compiled.as_text()
gathers = hlo.count(' all-gather(') + hlo.count(' all-gather-start(')
if i == 0:  # the whole global batch through one device of this process, from the same state
  mine = jax.tree.map(lambda x: x.addressable_data(0), state)
  one, m1 = jax.jit(step, device=jax.local_devices()[0])(mine, batch)
  def first(tree):
    return [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(tree)]
  np.savez(
    sys.argv[1],
    loss4=np.asarray(m4['loss_occ'].addressable_data(0)),
    loss1=np.asarray(m1['loss_occ']),
    gathers=gathers,
    **{f'four_{j}': x for j, x in enumerate(first(four.params))},
    **{f'one_{j}': x for j, x in enumerate(first(one.params))},
  )
print('ok')
"""


def _run_devices(out, processes, devices_each, port):
  env = {
    **os.environ,
    'XLA_FLAGS': f'{os.environ.get("XLA_FLAGS", "")} '
    f'--xla_force_host_platform_device_count={devices_each}',
    'JAX_PLATFORMS': 'cpu',
    'JAX_COORDINATOR_ADDRESS': f'localhost:{port}',
    'JAX_NUM_PROCESSES': str(processes),
  }
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', _DEVICES, str(out)],
      env={**env, 'JAX_PROCESS_ID': str(p)},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for p in range(processes)
  ]
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0 and 'ok' in stdout, stderr[-3000:]
  with np.load(out) as z:
    return {k: z[k] for k in z.files}


@pytest.mark.slow(seconds=110)
def test_devices_and_processes_agree(tmp_path):
  """2 processes x 2 devices (gloo collectives over jax.distributed on localhost), the batch
  split over the four devices, give one device's step on the whole batch; the step gathers no
  batch data across devices."""
  import socket

  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  got = _run_devices(tmp_path / 'out.npz', 2, 2, port)
  np.testing.assert_allclose(got['loss4'], got['loss1'], rtol=1e-5)
  assert got['gathers'] == 0
  n = sum(k.startswith('one_') for k in got)
  assert n > 10 and n == sum(k.startswith('four_') for k in got)
  for j in range(n):
    # Adam normalises near-zero gradients, so summation order shows at ~1e-7 there.
    np.testing.assert_allclose(got[f'four_{j}'], got[f'one_{j}'], rtol=2e-4, atol=2e-6)


@pytest.mark.slow(seconds=75)
def test_resumed_run_equals_uninterrupted_run(tfds_dir, tmp_path, monkeypatch):
  def run(workdir, steps, evaluate=False):
    cfg = pretrain.get_config('tiny')
    cfg.num_steps = steps
    cfg.checkpoint_every_steps = 2
    cfg.log_every_steps = 3  # steps 1, 2 and 4 are checked one step late, or before their save
    cfg.eval_at_end = evaluate
    cfg.eval_every_steps = 3 if evaluate else 0
    return train.train_and_evaluate(cfg, str(workdir), str(tfds_dir))

  full = run(tmp_path / 'full', 4, evaluate=True)
  assert [m['step'] for m in full.metrics] == [1, 2, 3, 4]

  # The interrupted run: its 4th batch is poisoned (NaN CAN bus), so the run stops at step 4 and
  # keeps the checkpoint of step 2; step 4 (a save step) is never saved.
  from uniscene_jax import sharding

  device_batch, calls = sharding.device_batch, []

  def poison_fourth(batch, mesh):
    calls.append(1)
    if len(calls) == 4:
      batch = {**batch, 'can_bus': np.full_like(batch['can_bus'], np.nan)}
    return device_batch(batch, mesh)

  monkeypatch.setattr(sharding, 'device_batch', poison_fourth)
  with pytest.raises(train.NonFiniteError, match='step 4: loss or gradients are not finite'):
    run(tmp_path / 'cut', 5)
  monkeypatch.setattr(sharding, 'device_batch', device_batch)
  from uniscene_jax.checkpoint import Checkpoints

  assert Checkpoints(str(tmp_path / 'cut')).all_steps() == [2]
  kept = json.loads((tmp_path / 'cut' / 'metrics.json').read_text())
  assert [m['step'] for m in kept] == [1, 2, 3]

  resumed = run(tmp_path / 'cut', 4)
  assert [m['step'] for m in resumed.metrics] == [3, 4]
  np.testing.assert_allclose(
    [m['loss_occ'] for m in full.metrics[2:]], [m['loss_occ'] for m in resumed.metrics], rtol=1e-6
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    full.state.params,
    resumed.state.params,
  )
  assert jnp.all(jnp.isfinite(full.state.params['pts_bbox_head']['bev_embedding']['embedding']))
  # The uninterrupted run evaluated the val split in video mode and logged to TensorBoard.
  result = json.loads((tmp_path / 'full' / 'eval_val_step4.json').read_text())
  assert result['frames'] == 9 and 0 <= result['iou_occupied'] <= 1
  assert 0 < result['all_free_miou'] < 50 and 'mIoU' in result['table']
  assert list((tmp_path / 'full' / 'tensorboard').glob('events.out.tfevents.*'))
  # ... and at step 3 on the way (eval_every_steps), from a checkpoint saved for it.
  mid = json.loads((tmp_path / 'full' / 'eval_val_step3.json').read_text())
  assert mid['step'] == 3 and mid['frames'] == 9
  assert 3 in Checkpoints(str(tmp_path / 'full')).all_steps()  # not on checkpoint_every_steps
  assert not (tmp_path / 'cut' / 'eval_val_step4.json').exists()
