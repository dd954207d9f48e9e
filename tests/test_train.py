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
from tests.test_train import _step_setup, _batch
from uniscene_jax import sharding, train
cfg, mc, model, tx = _step_setup()
state0 = jax.jit(lambda k: train.create_train_state(mc, tx, k))(jax.random.key(0))
batch = _batch(4, seed=2)
step = train.make_train_step(model, tx, cfg)
one, m1 = jax.jit(step, device=jax.devices()[0])(state0, batch)
mesh = sharding.make_mesh()
rep = sharding.replicated(mesh)
state = jax.device_put(state0, rep)
sharded = sharding.device_batch(batch, mesh)
shardings = dict(in_shardings=(rep, sharding.data_sharding(mesh)), out_shardings=(rep, rep))
four, m4 = jax.jit(step, **shardings)(state, sharded)
assert len(sharded['img'].addressable_shards) == 4
np.testing.assert_allclose(m4['loss_occ'], m1['loss_occ'], rtol=1e-5)
close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)  # noqa: E731
jax.tree.map(close, four.params, one.params)
print('ok', float(m1['loss_occ']))
"""


def test_four_devices_equal_one_device():
  env = {
    **os.environ,
    'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
    'JAX_PLATFORMS': 'cpu',
  }
  out = subprocess.run(
    [sys.executable, '-c', _DEVICES], env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0 and 'ok' in out.stdout, out.stderr[-3000:]


def test_resumed_run_equals_uninterrupted_run(tfds_dir, tmp_path):
  def run(workdir, steps, evaluate=False):
    cfg = pretrain.get_config('tiny')
    cfg.num_steps = steps
    cfg.checkpoint_every_steps = 2
    cfg.log_every_steps = 1
    cfg.eval_at_end = evaluate
    return train.train_and_evaluate(cfg, str(workdir), str(tfds_dir))

  full = run(tmp_path / 'full', 4, evaluate=True)
  run(tmp_path / 'cut', 2)
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
  assert not (tmp_path / 'cut' / 'eval_val_step4.json').exists()
