"""Semantic occupancy fine-tuning: the Occ3D grid, its loss, coarse targets, warm starts, a run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import common, finetune_occ, pretrain
from uniscene_jax import losses, models, targets, train
from uniscene_jax.checkpoint import Checkpoints
from uniscene_jax.convert import to_torch


def test_base_config_puts_the_logits_on_the_occ3d_voxels():
  cfg = finetune_occ.get_config()
  m = cfg.model
  x0, y0, z0, x1, y1, z1 = m.pc_range
  # The logits' x, y, z cells are the Occ3D voxels: 0.4 m, same origin, same count.
  np.testing.assert_allclose(((x1 - x0) / m.bev_w, (y1 - y0) / m.bev_h), (0.4, 0.4))
  np.testing.assert_allclose((z1 - z0) / m.pillar_h, common.OCC3D_VOXEL_SIZE)
  assert (m.bev_w, m.bev_h, m.pillar_h) == common.OCC3D_SHAPE
  assert tuple(m.pc_range) == common.OCC3D_RANGE and m.num_classes == 18
  assert cfg.data.target == 'occ3d' and cfg.loss.use_camera_mask
  assert cfg.loss.kind == 'cross_entropy' and cfg.init_fresh == ('predicter_2',)
  # The rest of the network is the pre-training one, so its weights load.
  base = pretrain.get_config()
  for k in ('embed_dims', 'num_layers', 'bev_h', 'backbone_depth', 'ffn_dims', 'occ_out_dim'):
    assert m[k] == base.model[k], k
  assert pretrain.get_config('semantic').model.pc_range == common.OCC3D_RANGE
  with pytest.raises(ValueError, match='unknown preset'):
    finetune_occ.get_config('huge')


def test_cross_entropy_matches_torch_with_and_without_the_camera_mask():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (2, 4, 5, 3, 18)).astype(np.float32)
  labels = rng.integers(0, 18, (2, 4, 5, 3))
  mask = (rng.random((2, 4, 5, 3)) < 0.4).astype(np.uint8)
  t_logits, t_labels = torch.tensor(logits.reshape(-1, 18)), torch.tensor(labels.reshape(-1))
  ce = torch.nn.functional.cross_entropy(t_logits, t_labels, reduction='none')
  want_masked = (ce * torch.tensor(mask.reshape(-1)).float()).sum() / mask.sum()
  got = losses.occupancy_loss('cross_entropy', jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(got, ce.mean().item(), rtol=1e-5)
  got = losses.occupancy_loss(
    'cross_entropy', jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)
  )
  np.testing.assert_allclose(got, want_masked.item(), rtol=1e-5)
  with pytest.raises(ValueError, match='config.loss.kind'):
    losses.occupancy_loss('dice', jnp.asarray(logits), jnp.asarray(labels))


def _pool_reference(target, mask, f, free=17):
  b, x, y, z = target.shape
  out = np.full((b, x // f, y // f, z), free, target.dtype)
  out_mask = np.zeros((b, x // f, y // f, z), np.uint8)
  for i in np.ndindex(out.shape):
    n, cx, cy, cz = i
    cells = target[n, cx * f : cx * f + f, cy * f : cy * f + f, cz].ravel()
    vis = mask[n, cx * f : cx * f + f, cy * f : cy * f + f, cz].ravel()
    counts = np.bincount(cells[(vis > 0) & (cells != free)], minlength=free)
    if counts.sum():
      out[i] = np.argmax(counts)
    out_mask[i] = vis.max()
  return out, out_mask


def test_semantic_pooling_takes_the_most_frequent_visible_class():
  rng = np.random.default_rng(1)
  target = np.where(rng.random((2, 8, 12, 3)) < 0.5, 17, rng.integers(0, 4, (2, 8, 12, 3)))
  target = target.astype(np.uint8)
  mask = (rng.random(target.shape) < 0.7).astype(np.uint8)
  got, got_mask = targets.model_targets(jnp.asarray(target), jnp.asarray(mask), 4, 'occ3d')
  want, want_mask = _pool_reference(target, mask, 4)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_mask, want_mask)
  # Binary: a coarse cell is occupied if any of its cells is.
  binary = (rng.random((1, 8, 8, 2)) < 0.05).astype(np.uint8)
  pooled, _ = targets.model_targets(jnp.asarray(binary), None, 2, 'binary')
  np.testing.assert_array_equal(pooled, binary.reshape(1, 4, 2, 4, 2, 2).max((2, 4)))


def _tiny_variables(cfg, seed):
  return jax.jit(lambda k: models.init_variables(cfg, k))(jax.random.key(seed))


def test_warm_start_from_a_pth_keeps_the_new_class_layer_fresh(tmp_path):
  source = _tiny_variables(pretrain.get_config('tiny'), 0)
  path = str(tmp_path / 'pretrained.pth')
  to_torch.save_pth(to_torch.state_dict_from_variables(source), path, {})
  cfg = finetune_occ.get_config('tiny')
  fresh = _tiny_variables(cfg, 1)
  params, stats = train.warm_start(path, fresh['params'], fresh['batch_stats'], cfg.init_fresh)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  src = dict(jax.tree_util.tree_flatten_with_path(source['params'])[0])
  init = dict(jax.tree_util.tree_flatten_with_path(fresh['params'])[0])
  for path_, value in flat:
    name = jax.tree_util.keystr(path_)
    expected = init[path_] if 'predicter_2' in name else src[path_]
    np.testing.assert_array_equal(value, expected, err_msg=name)
  assert any('predicter_2' in jax.tree_util.keystr(p) for p, _ in flat)
  jax.tree.map(np.testing.assert_array_equal, stats, source['batch_stats'])
  with pytest.raises(ValueError, match=r'predicter\.2\.bias: shape \(2,\) in the checkpoint'):
    train.warm_start(path, fresh['params'], fresh['batch_stats'])


@pytest.mark.slow(seconds=60)
def test_fine_tune_from_a_pretraining_workdir_and_evaluate_miou(tfds_dir, tmp_path, capsys):
  # A pre-training workdir: a checkpoint of the tiny pre-training model's state.
  pretrained = _tiny_variables(pretrain.get_config('tiny'), 0)
  ckpt = Checkpoints(str(tmp_path / 'pre'))
  ckpt.save(7, {'step': np.int32(7), **pretrained}, force=True)
  ckpt.close()

  cfg = finetune_occ.get_config('tiny')
  cfg.num_steps = 2
  cfg.init_from = str(tmp_path / 'pre')
  run = train.train_and_evaluate(cfg, str(tmp_path / 'ft'), str(tfds_dir))
  out = capsys.readouterr().out
  assert 'kept as initialised: pts_bbox_head/transformer/predicter_2/kernel' in out
  assert 'params: 114 loaded, 2 kept as initialised, 0 in the checkpoint skipped' in out
  assert all(np.isfinite(m['loss_occ']) for m in run.metrics)
  # Loaded: a backbone tensor that the fine-tuning steps cannot have moved (frozen stem).
  stem = ('img_backbone', 'conv1', 'kernel')
  pick = lambda p: p[stem[0]][stem[1]][stem[2]]  # noqa: E731
  np.testing.assert_array_equal(pick(run.state.params), pick(pretrained['params']))
  result = json.loads((tmp_path / 'ft' / 'eval_val_step2.json').read_text())
  assert result['frames'] == 9 and 0 <= result['miou'] <= 100
  assert len(result['iou']) == 18 and 'driveable_surface' in result['table']


def test_warm_start_from_a_workdir_of_another_model_names_it(tmp_path):
  ckpt = Checkpoints(str(tmp_path / 'other'))
  ckpt.save(
    3,
    {'step': np.int32(3), 'params': {'encoder': {'kernel': np.ones((2, 2), np.float32)}}},
    force=True,
  )
  ckpt.close()
  fresh = _tiny_variables(finetune_occ.get_config('tiny'), 1)
  with pytest.raises(ValueError, match=r"init_from=.*other'.*step 3.*encoder/kernel"):
    train.warm_start(str(tmp_path / 'other'), fresh['params'], fresh['batch_stats'])
