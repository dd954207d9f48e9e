"""Weights both ways: checkpoint -> .pth loading strictly into the twin, and back bit-exactly."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import pretrain
from tests.test_uniscene import _queue, _small_config, make_twin, twin_forward
from uniscene_jax import models
from uniscene_jax.checkpoint import Checkpoints
from uniscene_jax.convert import from_torch, to_torch

REFERENCE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'reference')


@pytest.fixture(scope='module')
def small_variables():
  mc = _small_config()
  variables = jax.jit(lambda k: models.init_variables(mc, k))(jax.random.key(0))
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  variables = jax.tree.unflatten(tree, leaves)
  variables['batch_stats'] = jax.tree.map(jnp.abs, variables['batch_stats'])
  return mc, variables


def test_checkpoint_to_pth_loads_strictly_and_predicts_the_same(small_variables, tmp_path):
  mc, variables = small_variables
  ckpt = Checkpoints(str(tmp_path / 'run'), every_steps=1)
  ckpt.save(7, {**variables, 'step': jnp.int32(7)}, force=True)
  ckpt.close()
  out = tmp_path / 'model.pth'
  assert to_torch.main(['--workdir', str(tmp_path / 'run'), '--output', str(out)]) == 0
  saved = torch.load(out, weights_only=True)
  assert saved['meta']['step'] == 7 and not list(tmp_path.glob('*.tmp-*'))
  twin = make_twin(mc, saved['state_dict'])
  img, lidar2img, ego2lidar, can, exists = _queue(1, seed=4)
  logits, _ = jax.jit(lambda v, *a: models.build_model(mc).apply(v, *a))(
    variables, img, lidar2img, ego2lidar, can, exists
  )
  want, _ = twin_forward(twin, img, lidar2img, ego2lidar, can, exists)
  scale = float(np.abs(want.numpy()).max())
  np.testing.assert_allclose(logits, want.numpy(), atol=2e-4 * scale, rtol=1e-4)  # fp32


def test_round_trip_is_bit_exact_and_reports(small_variables, tmp_path):
  _, variables = small_variables
  state_dict = to_torch.state_dict_from_variables(variables)
  state_dict['img_neck.fpn_convs.4.conv.weight'] = torch.zeros(3)  # FCOS3D's extra level
  path = tmp_path / 'ddp.pth'  # saved from a DistributedDataParallel module: 'module.' prefixes
  torch.save({'state_dict': {f'module.{k}': v for k, v in state_dict.items()}}, path)
  back, report = from_torch.variables_from_state_dict(
    from_torch.load_state_dict(str(path)), jax.tree.map(jnp.zeros_like, variables)
  )
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))
  assert not report.missing
  assert report.skipped['img_neck.fpn_convs.4.conv.weight'] == 'no such tensor in this model'


def test_base_state_dict_equals_the_manifest():
  abstract = jax.eval_shape(lambda: models.init_variables(pretrain.get_config(), jax.random.key(0)))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  manifest = json.loads(pathlib.Path(REFERENCE, 'bevformer_occ_keys.json').read_text())
  state_dict = to_torch.state_dict_from_variables(zeros, 'occ', manifest)  # raises on a mismatch
  assert list(state_dict) and len(state_dict) == 873
  assert state_dict['img_backbone.bn1.num_batches_tracked'].dtype == torch.int64
  bad = dict(manifest)
  bad.pop('img_neck.lateral_convs.0.conv.bias')
  with pytest.raises(ValueError, match=r'unexpected \[.img_neck.lateral_convs.0.conv.bias'):
    to_torch.state_dict_from_variables(zeros, 'occ', bad)


def test_bad_input_names_the_file_or_key(small_variables, tmp_path):
  _, variables = small_variables
  state_dict = to_torch.state_dict_from_variables(variables)
  path = tmp_path / 'x.pth'
  torch.save({'state_dict': state_dict}, path)
  path.write_bytes(path.read_bytes()[:1000])  # truncated
  with pytest.raises(ValueError, match='x.pth: not a readable PyTorch checkpoint'):
    from_torch.load_state_dict(str(path))
  key = 'pts_bbox_head.transformer.cams_embeds'
  state_dict[key] = torch.zeros(5, 7)
  with pytest.raises(ValueError, match=f'{key}: shape \\(5, 7\\)'):
    from_torch.variables_from_state_dict(state_dict, variables)
  with pytest.raises(ValueError, match='--arch det'):
    to_torch.state_dict_from_variables(variables, 'det')


def test_detection_checkpoint_into_the_pretraining_model():
  """A BEVFormer-base state dict (the manifest's keys and shapes) maps its 857 shared tensors."""
  manifest = json.loads(pathlib.Path(REFERENCE, 'bevformer_base_keys.json').read_text())
  dtypes = {'float32': torch.float32, 'int64': torch.int64}
  state_dict = {k: torch.ones(v['shape'], dtype=dtypes[v['dtype']]) for k, v in manifest.items()}
  abstract = jax.eval_shape(lambda: models.init_variables(pretrain.get_config(), jax.random.key(0)))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  variables, report = from_torch.variables_from_state_dict(state_dict, zeros)
  shared_buffers = sum(k.endswith('num_batches_tracked') for k in state_dict)
  assert len(report.loaded) + shared_buffers == 857
  assert sorted({k.split('.')[2] for k in report.missing}) == ['decoder', 'predicter']
  assert len(report.missing) == 14  # the occupancy head's tensors (2 counters not counted)
  skipped = [k for k in report.skipped if not k.endswith('num_batches_tracked')]
  assert len(skipped) == 232 and any(k.startswith('pts_bbox_head.cls_branches') for k in skipped)
  assert float(variables['params']['img_backbone']['conv1']['kernel'].min()) == 1.0
