"""Data resolution with the embedded default, TensorBoard files, occupancy pictures.

Evaluation itself runs at the end of the uninterrupted run in test_train.py.
"""

import numpy as np
import pytest

from configs import pretrain
from uniscene_jax import summary, train


def test_summary_writer_round_trip(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  writer = summary.SummaryWriter(str(tmp_path))
  writer.scalars(3, {'train/loss': 0.25, 'train/lr': 1e-4})
  grid = np.zeros((20, 10, 4), np.uint8)
  grid[2, 3, 1] = 1
  writer.image(3, 'eval/top', summary.top_view(grid))
  writer.close()
  acc = EventAccumulator(str(tmp_path), size_guidance={'images': 0})
  acc.Reload()
  assert [e.value for e in acc.Scalars('train/loss')] == [0.25]
  image = acc.Images('eval/top')[0]
  assert (image.width, image.height) == (20, 10)


def test_top_view_shows_the_highest_voxel():
  grid = np.zeros((4, 3, 8), np.uint8)
  grid[1, 2, 1] = grid[1, 2, 5] = 1  # x = 1, y = 2: highest voxel z = 5
  grid[3, 0, 0] = 1
  pic = summary.top_view(grid)
  assert pic.shape == (3, 4, 3)
  assert pic[0, 1].sum() > pic[2, 3].sum() > 0  # row 0 = largest y; brighter = higher
  assert not pic[1].any()


def test_dataset_status_and_half_built_data(tmp_path):
  assert train.dataset_status(str(tmp_path), 'nuscenes_occ/mini') == 'missing'
  (tmp_path / 'nuscenes_occ' / 'mini' / 'incomplete.ABC_1.0.0').mkdir(parents=True)
  assert train.dataset_status(str(tmp_path), 'nuscenes_occ/mini') == 'incomplete'
  cfg = pretrain.get_config('tiny')
  with pytest.raises(ValueError, match='half-built dataset'):
    train.prepare_data(cfg, str(tmp_path))


def test_missing_build_falls_back_to_the_synthetic_world(tmp_path, monkeypatch, capsys):
  built = []
  monkeypatch.setenv(train.CACHE_ENV, str(tmp_path / 'cache'))
  monkeypatch.setattr(train, '_build_synthetic', lambda cache, out: built.append(out))
  cfg = pretrain.get_config()  # base preset, trainval, nothing built here
  cfg.batch_size = 2  # set by the user: kept
  data_dir = train.prepare_data(cfg, str(tmp_path / 'nothing'))
  out = capsys.readouterr().out
  assert 'No nuscenes_occ/trainval build' in out and ':local preset' in out
  assert data_dir == str(tmp_path / 'cache' / 'tfds') and built == [data_dir]
  assert cfg.data.name == 'nuscenes_occ/mini' and cfg.model.embed_dims == 32
  assert cfg.batch_size == 2


def test_workdir_of_another_model_is_refused(tmp_path):
  cfg = pretrain.get_config('tiny')
  train.check_workdir_config(str(tmp_path), cfg, resuming=False)
  train.check_workdir_config(str(tmp_path), cfg, resuming=True)  # same model: fine
  other = pretrain.get_config('tiny')
  other.model.embed_dims = 64
  before = (tmp_path / 'config.json').read_text()
  with pytest.raises(ValueError, match=r'another model config.*model.embed_dims: checkpoint 32'):
    train.check_workdir_config(str(tmp_path), other, resuming=True)
  assert (tmp_path / 'config.json').read_text() == before  # nothing overwritten


def test_semantic_preset_falls_back_to_a_semantic_local_run(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(train.CACHE_ENV, str(tmp_path / 'cache'))
  monkeypatch.setattr(train, '_build_synthetic', lambda cache, out: None)
  cfg = pretrain.get_config('semantic')
  train.prepare_data(cfg, str(tmp_path / 'nothing'))
  assert cfg.data.target == 'occ3d' and cfg.model.num_classes == 18 and cfg.loss.use_camera_mask
  assert cfg.model.bev_h == 50 and cfg.data.target_pool == 4 and cfg.model.embed_dims == 32
  assert cfg.model.pc_range == pretrain.get_config('semantic').model.pc_range
  assert cfg.data.nuscenes_root == str(tmp_path / 'cache' / 'synthetic_world' / 'nuscenes')
