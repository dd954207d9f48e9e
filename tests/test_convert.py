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
from uniscene_jax import models, train
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


def _warm_start(path, variables):
  return train.warm_start(str(path), variables['params'], variables['batch_stats'])


def test_a_checkpoint_of_another_architecture_names_the_file(small_variables, tmp_path):
  """Nothing (or almost nothing) of the file maps onto the model: an error, not a silent start."""
  _, variables = small_variables
  ours = to_torch.state_dict_from_variables(variables)
  # A torchvision ResNet: the backbone's tensors, but without the img_backbone. prefix.
  resnet = {
    k.removeprefix('img_backbone.'): v for k, v in ours.items() if k.startswith('img_backbone.')
  }
  resnet['fc.weight'] = torch.zeros(1000, 2048)
  torch.save(resnet, tmp_path / 'resnet.pth')
  n = sum(not k.endswith('num_batches_tracked') for k in resnet)
  with pytest.raises(ValueError) as e:
    _warm_start(tmp_path / 'resnet.pth', variables)
  message = str(e.value)
  assert message.startswith(f'{tmp_path / "resnet.pth"}: none of its {n} tensors maps onto')
  assert 'expects keys under img_backbone., img_neck., pts_bbox_head. (e.g. img_' in message
  assert f'the file has {", ".join(list(resnet)[:4])} ... ({n - 4} more)' in message

  # Almost nothing: one tensor of the right name and shape among many others of another model.
  other = {f'encoder.blocks.{i}.weight': torch.zeros(4) for i in range(40)}
  other['pts_bbox_head.transformer.cams_embeds'] = ours['pts_bbox_head.transformer.cams_embeds']
  torch.save({'state_dict': other, 'meta': {}}, tmp_path / 'other.pth')
  with pytest.raises(
    ValueError, match=r'other\.pth: only 1 of its 41 tensors map onto this model '
  ):
    _warm_start(tmp_path / 'other.pth', variables)

  # A container this importer does not unwrap, and a file without tensors.
  torch.save({'model': ours, 'optimizer': {}}, tmp_path / 'wrapped.pth')
  with pytest.raises(ValueError, match=r'wrapped\.pth: none of .* the file has model, optimizer$'):
    _warm_start(tmp_path / 'wrapped.pth', variables)
  with pytest.raises(ValueError, match=r'^state dict: none of its 0 tensors .* has no keys$'):
    from_torch.variables_from_state_dict({}, variables)

  # A file that holds only part of the model is legitimate: all of it maps.
  neck = {k: v for k, v in ours.items() if k.startswith('img_neck.')}
  _, report = from_torch.variables_from_state_dict(neck, variables)
  assert sorted(report.loaded) == sorted(neck) and not report.skipped


def _fcos3d_head(prefix: str) -> dict:
  """A representative mmdet3d FCOSMono3DHead (GN convs, DCN on the last stacked conv)."""
  z = torch.zeros
  head = {}
  for branch in ('cls_convs', 'reg_convs'):
    head[f'{branch}.0.conv.weight'] = z(256, 256, 3, 3)
    head[f'{branch}.1.conv.weight'] = z(256, 256, 3, 3)
    head[f'{branch}.1.conv.conv_offset.weight'] = z(27, 256, 3, 3)
    head[f'{branch}.1.conv.conv_offset.bias'] = z(27)
    for i in (0, 1):
      head[f'{branch}.{i}.gn.weight'] = head[f'{branch}.{i}.gn.bias'] = z(256)
  for name, out in (('cls', 10), ('dir_cls', 2), ('attr', 9)):
    head[f'conv_{name}_prev.0.conv.weight'] = z(256, 256, 3, 3)
    head[f'conv_{name}_prev.0.gn.weight'] = head[f'conv_{name}_prev.0.gn.bias'] = z(256)
    head[f'conv_{name}.weight'], head[f'conv_{name}.bias'] = z(out, 256, 1, 1), z(out)
  for i, out in enumerate((2, 1, 3, 1, 2)):  # offset, depth, size, rotation, velocity
    head[f'conv_regs.{i}.weight'], head[f'conv_regs.{i}.bias'] = z(out, 256, 1, 1), z(out)
  head['conv_centerness_prev.0.conv.weight'] = z(64, 256, 3, 3)
  head['conv_centerness.weight'], head['conv_centerness.bias'] = z(1, 64, 1, 1), z(1)
  for level in range(5):
    for j in range(3):
      head[f'scales.{level}.{j}.scale'] = z(())
  return {prefix + k: v for k, v in head.items()}


def _fcos3d(state_dict: dict, backbone: str, neck: str, head: str) -> dict:
  """An FCOS3D checkpoint around `state_dict`'s backbone and neck (pytorch_keys.md section 9)."""
  out = {}
  for k, v in state_dict.items():
    if k.startswith(('img_backbone.', 'img_neck.')):
      out[k.replace('img_backbone.', backbone, 1).replace('img_neck.', neck, 1)] = v
  out[f'{neck}fpn_convs.4.conv.weight'] = torch.zeros(256, 256, 3, 3)  # num_outs=5: P7
  out[f'{neck}fpn_convs.4.conv.bias'] = torch.zeros(256)
  return {**out, **_fcos3d_head(head)}


@pytest.mark.parametrize(
  'prefixes',
  [
    ('img_backbone.', 'img_neck.', 'bbox_head.'),  # as pytorch_keys.md infers BEVFormer's file
    ('backbone.', 'neck.', 'bbox_head.'),  # mmdet3d's FCOSMono3D as trained
  ],
)
def test_fcos3d_loads_the_backbone_and_neck_and_skips_the_rest(small_variables, prefixes, tmp_path):
  _, variables = small_variables
  backbone, neck, head = prefixes
  ours = to_torch.state_dict_from_variables(variables)
  fcos3d = _fcos3d(ours, *prefixes)
  path = tmp_path / 'r101_dcn_fcos3d_pretrain.pth'
  torch.save({'state_dict': fcos3d, 'meta': {}}, path)
  zeros = jax.tree.map(jnp.zeros_like, variables)
  back, report = from_torch.variables_from_state_dict(
    from_torch.load_state_dict(str(path)), zeros, source=str(path)
  )
  for name in ('img_backbone', 'img_neck'):
    for collection in ('params', 'batch_stats'):
      if name in variables[collection]:
        jax.tree.map(
          np.testing.assert_array_equal, back[collection][name], variables[collection][name]
        )
  jax.tree.map(
    np.testing.assert_array_equal, back['params']['pts_bbox_head'], zeros['params']['pts_bbox_head']
  )
  tensors = [k for k in ours if not k.endswith('num_batches_tracked')]
  image_keys = [k for k in ours if k.startswith(('img_backbone.', 'img_neck.'))]
  counters = [k for k in image_keys if k.endswith('num_batches_tracked')]
  assert len(report.loaded) == len(image_keys) - len(counters)
  assert all(k.startswith((backbone, neck)) for k in report.loaded)
  assert sorted(report.missing) == sorted(k for k in tensors if k.startswith('pts_bbox_head.'))
  head_keys = [k for k in fcos3d if k.startswith(head)]
  assert len(report.skipped) == len(counters) + 2 + len(head_keys)
  assert report.skipped[f'{neck}fpn_convs.4.conv.weight'] == 'no such tensor in this model'
  assert report.skipped[f'{head}conv_cls.weight'] == 'no such tensor in this model'
  assert report.skipped[f'{backbone}bn1.num_batches_tracked'].startswith('step counter')
  if backbone == 'backbone.':
    assert report.renamed == {'backbone.': 'img_backbone.', 'neck.': 'img_neck.'}
    assert 'backbone.* read as img_backbone.*, neck.* read as img_neck.*' in report.summary()
  else:
    assert not report.renamed
  # A shape mismatch in the raw format names the key as the file spells it.
  bad = dict(fcos3d)
  bad[f'{neck}lateral_convs.0.conv.weight'] = torch.zeros(256, 3, 1, 1)
  with pytest.raises(ValueError, match=rf'^{neck}lateral_convs\.0\.conv\.weight: shape \(256, 3'):
    from_torch.variables_from_state_dict(bad, variables)


@pytest.fixture(scope='module')
def pretraining_zeros():
  """The full-size pre-training model's variables, as zeros."""
  abstract = jax.eval_shape(lambda: models.init_variables(pretrain.get_config(), jax.random.key(0)))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)


def _manifest_state_dict(name: str, keep=lambda k: True) -> dict:
  """Ones of the shapes and dtypes of a reference manifest's keys (those `keep` accepts)."""
  manifest = json.loads(pathlib.Path(REFERENCE, name).read_text())
  dtypes = {'float32': torch.float32, 'int64': torch.int64}
  return {
    k: torch.ones(v['shape'], dtype=dtypes[v['dtype']]) for k, v in manifest.items() if keep(k)
  }


def test_detection_checkpoint_into_the_pretraining_model(pretraining_zeros):
  """A BEVFormer-base state dict (the manifest's keys and shapes) maps its 857 shared tensors."""
  state_dict = _manifest_state_dict('bevformer_base_keys.json')
  variables, report = from_torch.variables_from_state_dict(state_dict, pretraining_zeros)
  shared_buffers = sum(k.endswith('num_batches_tracked') for k in state_dict)
  assert len(report.loaded) + shared_buffers == 857
  assert sorted({k.split('.')[2] for k in report.missing}) == ['decoder', 'predicter']
  assert len(report.missing) == 14  # the occupancy head's tensors (2 counters not counted)
  skipped = [k for k in report.skipped if not k.endswith('num_batches_tracked')]
  assert len(skipped) == 232 and any(k.startswith('pts_bbox_head.cls_branches') for k in skipped)
  assert float(variables['params']['img_backbone']['conv1']['kernel'].min()) == 1.0


def test_full_size_fcos3d_checkpoint_into_the_pretraining_model(pretraining_zeros):
  """R101-DCN + FPN as mmdet3d's FCOS3D names them: the 676 + 14 keys of the reference's backbone
  and neck (sections 2, 3 of pytorch_keys.md), the FPN's P7 conv and the head; none under img_."""
  image = _manifest_state_dict('bevformer_occ_keys.json', lambda k: k.startswith('img_'))
  assert len(image) == 676 + 14
  fcos3d = _fcos3d(image, 'backbone.', 'neck.', 'bbox_head.')
  variables, report = from_torch.variables_from_state_dict(fcos3d, pretraining_zeros)
  assert len(report.loaded) == 572 + 14  # the 104 BN counters have no Flax tensor
  assert len(report.missing) == 181 and all(k.startswith('pts_bbox_head.') for k in report.missing)
  counters = [k for k, why in report.skipped.items() if why.startswith('step counter')]
  assert len(counters) == 104 and all(k.startswith('backbone.') for k in counters)
  rest = {k for k in report.skipped if k not in counters}
  assert rest == {k for k in fcos3d if k.startswith(('neck.fpn_convs.4.', 'bbox_head.'))}
  params = variables['params']
  assert float(params['img_backbone']['layer3_22']['conv2']['conv_offset']['kernel'].min()) == 1.0
  assert float(params['img_neck']['fpn_convs_3']['conv']['bias'].min()) == 1.0
  assert float(np.abs(params['pts_bbox_head']['bev_embedding']['embedding']).max()) == 0.0
