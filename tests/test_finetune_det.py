"""Detection fine-tuning: ground truth as trained on, the train step, evaluation with the devkit."""

import json

import jax
import numpy as np
import pytest

from configs import finetune_det
from uniscene_jax import evaluate, models, optim, train
from uniscene_jax.checkpoint import Checkpoints
from uniscene_jax.data import input_pipeline as ip


def _record(boxes, labels, valid):
  return {
    'sample_token': 'tok',
    'gt_boxes': np.asarray(boxes, np.float32),
    'gt_labels': np.asarray(labels),
    'gt_valid': np.asarray(valid),
  }


def test_detection_targets_filter_and_pad_as_the_reference_loads():
  boxes = np.zeros((5, 9), np.float32)
  boxes[:, 0] = [0.0, 51.2, 10.0, -51.1, 3.0]  # x; 51.2 is on the border: out (strict)
  boxes[:, 3:6] = 1.0
  rec = _record(boxes, [0, 1, -1, 9, 4], [True, True, True, True, False])
  out = ip.detection_targets(rec, 4, (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0))
  # Kept: box 0 (class 0) and box 3 (class 9); dropped: outside, not a class, no points.
  np.testing.assert_array_equal(out['gt_labels'], [0, 9, -1, -1])
  np.testing.assert_array_equal(out['gt_boxes'][:2], boxes[[0, 3]])
  assert not out['gt_boxes'][2:].any() and out['gt_boxes'].dtype == np.float32
  with pytest.raises(ValueError, match=r'sample tok: 2 ground-truth boxes.*data.max_boxes=1'):
    ip.detection_targets(rec, 1, (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0))


def test_config_checks_name_the_fields():
  cfg = finetune_det.get_config('tiny')
  assert cfg.model.arch == 'det' and cfg.model.bev_frame == 'lidar' and not cfg.model.inplace_shift
  base = finetune_det.get_config()
  assert (base.model.detection.num_query, base.model.detection.num_layers) == (900, 6)
  cfg.data.max_boxes = cfg.model.detection.num_query + 1
  with pytest.raises(ValueError, match='config.data.max_boxes=65 exceeds'):
    train.check_config(cfg)
  cfg = finetune_det.get_config('tiny')
  cfg.loss.kind = 'focal'
  with pytest.raises(ValueError, match="config.loss.kind='focal'"):
    train.check_config(cfg)


def _tiny_det(image=(60, 90), bev=20):
  cfg = finetune_det.get_config('tiny')
  cfg.data.image_size = image
  cfg.model.bev_h = cfg.model.bev_w = bev
  return cfg


@pytest.mark.slow(seconds=35)
def test_detection_step_compiles_once_and_fits_one_batch():
  cfg = _tiny_det()
  mc = models.model_config_from(cfg)
  model = models.build_model(mc)
  abstract = jax.eval_shape(lambda: models.init_variables(mc, jax.random.key(0))['params'])
  cfg.optim.warmup_steps = 0
  tx = optim.make_optimizer(train.optim_config(cfg), 10, abstract)
  state = jax.jit(lambda k: train.create_train_state(mc, tx, k))(jax.random.key(0))
  rng = np.random.default_rng(0)
  eye = np.eye(4, dtype=np.float32)
  l2i = np.tile(eye, (1, 2, 6, 1, 1))
  l2i[..., 0, 0] = l2i[..., 1, 1] = 30.0
  l2i[..., 0, 2], l2i[..., 1, 2] = 40.0, 30.0
  gt = np.zeros((1, cfg.data.max_boxes, 9), np.float32)
  gt[0, :3] = [
    [5, 2, -1, 2, 4, 1.5, 0.3, 1, 0],
    [-10, 8, -1, 0.6, 0.6, 1.7, 1, 0, 0],
    [20, -4, -1, 2, 5, 2, 2, 0, 0],
  ]
  labels = np.full((1, cfg.data.max_boxes), -1, np.int32)
  labels[0, :3] = [0, 5, 1]
  batch = jax.device_put(
    {
      'img': rng.integers(0, 256, (1, 2, 6, 64, 96, 3)).astype(np.uint8),
      'lidar2img': l2i,
      'ego2lidar': np.tile(eye, (1, 2, 1, 1)),
      'can_bus': np.zeros((1, 2, 18), np.float32),
      'prev_bev_exists': np.array([[False, True]]),
      'gt_boxes': gt,
      'gt_labels': labels,
    }
  )
  cfg.augment.photometric = cfg.augment.grid_mask = False  # the same inputs every step
  step = jax.jit(train.make_train_step(model, tx, cfg), donate_argnums=(0,))
  history = []
  with jax.transfer_guard('disallow'):
    for _ in range(6):
      state, m = step(state, batch)
      history.append(m)
  assert step._cache_size() == 1
  loss = [float(m['loss']) for m in history]
  assert all(np.isfinite(loss)) and all(bool(m['finite']) for m in history)
  np.testing.assert_allclose(
    loss[0], float(history[0]['loss_cls']) + float(history[0]['loss_bbox']), rtol=1e-6
  )
  assert loss[-1] < 0.8 * loss[0], loss  # it fits the one batch


@pytest.mark.slow(seconds=45)
def test_detection_evaluation_writes_results_and_devkit_metrics(
  tfds_dir, synthetic_world_dir, tmp_path
):
  cfg = finetune_det.get_config('tiny')
  cfg.data.nuscenes_root = str(synthetic_world_dir / 'nuscenes')
  variables = jax.jit(lambda k: models.init_variables(cfg, k))(jax.random.key(0))
  ckpt = Checkpoints(str(tmp_path))
  ckpt.save(5, {'step': np.int32(5), **variables}, force=True)
  ckpt.close()
  result = evaluate.evaluate(cfg, str(tmp_path), str(tfds_dir))
  saved = json.loads((tmp_path / 'eval_val_step5.json').read_text())
  assert saved['frames'] == 9 and 0 <= saved['NDS'] <= 1 and 0 <= saved['mAP'] <= 1
  assert 'NDS:' in result['table'] and 'traffic_cone' in result['table']
  submitted = json.loads((tmp_path / 'eval_val_step5' / 'results_nusc.json').read_text())
  assert len(submitted['results']) == 9  # every val sample, as the devkit requires
  assert result['boxes'] == sum(len(v) for v in submitted['results'].values()) > 0
  assert (tmp_path / 'eval_val_step5' / 'metrics_summary.json').is_file()
  cfg.data.nuscenes_root = str(tmp_path / 'nothing')
  with pytest.raises(ValueError, match='config.data.nuscenes_root=.*no v1.0-mini/ tables'):
    evaluate.evaluate(cfg, str(tmp_path), str(tfds_dir))
