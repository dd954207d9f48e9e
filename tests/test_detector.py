"""The BEVFormer-base detector: manifest at base size, twin parity, conversion, initialisation."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import pretrain
from tests.reference.detector_torch import UniSceneDetTorch
from tests.test_uniscene import _queue, twin_forward
from uniscene_jax import models, optim
from uniscene_jax.checkpoint import Checkpoints
from uniscene_jax.convert import from_torch, key_map, to_torch
from uniscene_jax.models.bev_attention import star_offsets
from uniscene_jax.models.detector import DetectorConfig, UniSceneDet

REFERENCE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'reference')
# fp32 parity with the twin: |JAX - torch| <= ATOL * max|torch| + RTOL * |torch|, per output.
ATOL, RTOL = 2e-5, 1e-5


def _manifest(name):
  return json.loads(pathlib.Path(REFERENCE, name).read_text())


def _small_config() -> DetectorConfig:
  """Tiny detector: 64 x 96 images, a 10 x 12 BEV of 32 channels, 2 encoder layers, 6 decoder
  layers over 24 queries (through the experiment-config path, as training builds it)."""
  cfg = pretrain.get_config('tiny')
  cfg.data.image_size = (60, 90)  # padded to 64 x 96
  m = cfg.model
  m.arch = 'det'
  m.bev_h, m.bev_w = 10, 12
  m.num_layers = 2
  m.bev_frame = 'lidar'
  m.inplace_shift = False
  m.detection = {'num_query': 24}
  return models.model_config_from(cfg)


def _perturbed(variables, seed):
  """Every tensor moved off its initial value, so that zero-initialised layers take part."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [
    x + 0.05 * jax.random.normal(k, x.shape) * (1 + jnp.abs(x).mean())
    for x, k in zip(leaves, keys, strict=True)
  ]
  out = jax.tree.unflatten(tree, leaves)
  out['batch_stats'] = jax.tree.map(jnp.abs, out['batch_stats'])
  return out


@pytest.fixture(scope='module')
def small():
  mc = _small_config()
  initial = jax.jit(lambda k: models.init_variables(mc, k))(jax.random.key(0))
  model = models.build_model(mc)
  apply = jax.jit(lambda v, *a: model.apply(v, *a))
  return mc, model, apply, initial, _perturbed(initial, 1)


def make_det_twin(mc: DetectorConfig, state_dict) -> UniSceneDetTorch:
  """The PyTorch twin of `mc`, strictly loaded with `state_dict`, in eval mode."""
  twin = UniSceneDetTorch(
    mc.backbone.stage_blocks,
    mc.backbone.base_width,
    mc.backbone.stage_with_dcn,
    mc.head.encoder,
    mc.detection,
  )
  twin.load_state_dict(state_dict, strict=True)
  return twin.eval()


def _close(got, want):
  want = np.asarray(want)
  np.testing.assert_allclose(got, want, atol=ATOL * float(np.abs(want).max()), rtol=RTOL)


def test_base_keys_shapes_and_count_equal_the_manifest():
  manifest = _manifest('bevformer_base_keys.json')
  abstract = jax.eval_shape(lambda: models.init_variables(DetectorConfig(), jax.random.key(0)))
  got = key_map.to_torch_shapes(abstract)
  assert got == {k: (tuple(v['shape']), v['dtype']) for k, v in manifest.items()}
  assert sum(x.size for x in jax.tree.leaves(abstract['params'])) == 69_034_947
  # code_weights is counted but frozen, like its requires_grad=False in the reference.
  labels = optim.path_labels(abstract['params'])
  assert labels['pts_bbox_head']['code_weights'] == 'frozen'
  assert labels['pts_bbox_head']['query_embedding']['embedding'] == 'head'
  # The twin at base size (no memory: meta tensors) has the manifest's keys and shapes, the
  # detection keys in the manifest's order.
  with torch.device('meta'):
    twin = UniSceneDetTorch((3, 4, 23, 3), 64, (False, False, True, True), *_base_cfgs())
  state = {k: list(v.shape) for k, v in twin.state_dict().items()}
  assert state == {k: v['shape'] for k, v in manifest.items()}
  occ = _manifest('bevformer_occ_keys.json')
  assert [k for k in state if k not in occ] == [k for k in manifest if k not in occ]
  assert not twin.pts_bbox_head.code_weights.requires_grad


def _base_cfgs():
  cfg = DetectorConfig()
  return cfg.head.encoder, cfg.detection


def test_detector_matches_the_twin(small):
  """All six layers' cls and box outputs, with a history frame that feeds prev_bev (fp32)."""
  mc, _, apply, _, variables = small
  img, lidar2img, ego2lidar, can, exists = _queue(1)  # exists [F, T, T]: history is used
  out, aux = apply(variables, img, lidar2img, ego2lidar, can, exists)
  assert out['cls'].shape == (6, 1, 24, 10) and out['box'].shape == (6, 1, 24, 10)
  state_dict = to_torch.state_dict_from_variables(variables, 'det')
  cls, box, bev = twin_forward(
    make_det_twin(mc, state_dict), img, lidar2img, ego2lidar, can, exists
  )
  _close(aux['bev_embed'], bev.numpy())
  for layer in range(6):
    _close(out['cls'][layer], cls[layer].numpy())
    _close(out['box'][layer], box[layer].numpy())
  # The queries sit inside the BEV and the history matters: a new scene changes the result.
  assert np.abs(np.asarray(out['box'])[..., :2]).max() < 51.2
  fresh, _ = apply(variables, img, lidar2img, ego2lidar, can, np.zeros_like(exists))
  assert np.abs(np.asarray(fresh['cls']) - np.asarray(out['cls'])).max() > 1e-3


def test_head_gradients_match_the_twin(small):
  """Gradients of the head (decoder, branches, queries, reference_points) and of the BEV agree
  with autograd's: the refined references are detached, the initial one is not."""
  mc, model, _, _, variables = small
  enc = mc.head.encoder
  rng = np.random.default_rng(5)
  bev = rng.normal(size=(1, enc.bev_h * enc.bev_w, enc.embed_dims)).astype(np.float32)
  w_cls = rng.normal(size=(6, 1, 24, 10)).astype(np.float32)
  w_box = rng.normal(size=(6, 1, 24, 10)).astype(np.float32)
  head = variables['params']['pts_bbox_head']

  def loss(head_params, bev):
    params = {**variables['params'], 'pts_bbox_head': head_params}
    out = model.apply({**variables, 'params': params}, bev, method=UniSceneDet.detect)
    return jnp.sum(out['cls'] * w_cls) + jnp.sum(out['box'] * w_box)

  g_head, g_bev = jax.jit(jax.grad(loss, argnums=(0, 1)))(head, bev)

  twin = make_det_twin(mc, to_torch.state_dict_from_variables(variables, 'det'))
  bev_t = torch.from_numpy(bev).requires_grad_(True)
  cls, box = twin.pts_bbox_head.detect(bev_t)
  (torch.sum(cls * torch.from_numpy(w_cls)) + torch.sum(box * torch.from_numpy(w_box))).backward()
  _close(g_bev, bev_t.grad.numpy())
  grads = key_map.to_torch_arrays({'params': {'pts_bbox_head': g_head}})
  named = dict(twin.named_parameters())
  checked = 0
  for key, g in grads.items():
    if named[key].grad is None:  # not on the path from the BEV to the outputs
      assert not g.any()
      continue
    _close(g, named[key].grad.numpy())
    checked += 1
  assert checked == 231  # every detection tensor (232) but code_weights
  assert np.abs(grads['pts_bbox_head.transformer.reference_points.weight']).max() > 0


def test_to_torch_det_round_trip_is_bit_exact(small, tmp_path):
  """Flax -> orbax checkpoint -> `to_torch --arch det` -> strict twin load -> Flax, bit-exact."""
  mc, _, _, _, variables = small
  ckpt = Checkpoints(str(tmp_path / 'run'), every_steps=1)
  ckpt.save(3, {**variables, 'step': jnp.int32(3)}, force=True)
  ckpt.close()
  out = tmp_path / 'det.pth'
  argv = ['--workdir', str(tmp_path / 'run'), '--output', str(out)]
  assert to_torch.main(argv + ['--arch', 'occ']) == 2 and not out.exists()  # wrong arch named
  assert to_torch.main(argv + ['--arch', 'det']) == 0
  saved = torch.load(out, weights_only=True)
  assert saved['meta']['arch'] == 'det' and not list(tmp_path.glob('*.tmp-*'))
  make_det_twin(mc, saved['state_dict'])  # strict=True
  in_proj = saved['state_dict'][
    'pts_bbox_head.transformer.decoder.layers.2.attentions.0.attn.in_proj_weight'
  ]
  kernel = variables['params']['pts_bbox_head']['transformer']['decoder']['layers_2']
  kernel = kernel['attentions_0']['attn']['in_proj_kernel']
  np.testing.assert_array_equal(in_proj.numpy(), np.asarray(kernel).T)  # rows q | k | v
  back, report = from_torch.variables_from_state_dict(
    from_torch.load_state_dict(str(out)), jax.tree.map(jnp.zeros_like, variables)
  )
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))
  assert not report.missing
  assert all(k.endswith('num_batches_tracked') for k in report.skipped)


def test_pretraining_weights_into_the_detector():
  """A UniScene pre-training state dict fills the 857 shared tensors of BEVFormer-base; the 232
  detection tensors stay as initialised and are reported so; the occupancy head is skipped."""
  occ = _manifest('bevformer_occ_keys.json')
  base = _manifest('bevformer_base_keys.json')
  dtypes = {'float32': torch.float32, 'int64': torch.int64}
  state_dict = {k: torch.ones(v['shape'], dtype=dtypes[v['dtype']]) for k, v in occ.items()}
  abstract = jax.eval_shape(lambda: models.init_variables(DetectorConfig(), jax.random.key(0)))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  variables, report = from_torch.variables_from_state_dict(state_dict, zeros)
  counters = [k for k in state_dict if k.endswith('num_batches_tracked') and k in base]
  assert len(report.loaded) + len(counters) == 857
  assert sorted(report.missing) == sorted(set(base) - set(occ))  # the 232 detection tensors
  assert len(report.missing) == 232 and '232 kept as initialised' in report.summary()
  skipped = {k for k, why in report.skipped.items() if not why.startswith('step counter')}
  occ_only = {k for k in set(occ) - set(base) if not k.endswith('num_batches_tracked')}
  assert skipped == occ_only and len(skipped) == 14  # the occupancy decoder and predicter
  params = variables['params']
  assert (
    float(params['pts_bbox_head']['transformer']['encoder']['layers_5']['norms_2']['scale'].min())
    == 1.0
  )
  assert not params['pts_bbox_head']['query_embedding']['embedding'].any()


def test_initialisation_as_the_reference(small):
  """model_spec 11: identical branches at torch's default init, cls prior bias, star offsets,
  zero attention weights, xavier MHA with zero biases, frozen code_weights."""
  mc, _, _, initial, _ = small
  head = jax.tree.map(np.asarray, initial['params']['pts_bbox_head'])
  c, n = mc.head.encoder.embed_dims, mc.detection.num_layers
  for kind, layers in (('cls', (0, 1, 3, 4, 6)), ('reg', (0, 2, 4))):
    first = {i: head[f'{kind}_branches_0_{i}'] for i in layers}
    for lvl in range(1, n):
      for i in layers:
        jax.tree.map(np.testing.assert_array_equal, head[f'{kind}_branches_{lvl}_{i}'], first[i])
    for i in layers:
      if 'kernel' in first[i]:  # torch Linear default: U(+-1/sqrt(fan_in)) for weight and bias
        bound = 1 / np.sqrt(first[i]['kernel'].shape[0])
        assert 0.9 * bound < np.abs(first[i]['kernel']).max() <= bound
      else:  # LayerNorm
        assert (first[i]['scale'] == 1).all() and (first[i]['bias'] == 0).all()
  np.testing.assert_allclose(head['cls_branches_3_6']['bias'], -4.59512, atol=1e-5)
  bound = 1 / np.sqrt(c)
  assert 0.5 * bound < np.abs(head['reg_branches_0_4']['bias']).max() <= bound
  np.testing.assert_array_equal(head['code_weights'], np.float32([1] * 8 + [0.2] * 2))
  assert abs(head['query_embedding']['embedding'].std() - 1) < 0.1
  tr = head['transformer']
  assert (tr['reference_points']['bias'] == 0).all()
  for i in range(n):
    layer = tr['decoder'][f'layers_{i}']
    msda = layer['attentions_1']
    np.testing.assert_array_equal(msda['sampling_offsets']['bias'], star_offsets(4, 1, 4))
    assert not msda['sampling_offsets']['kernel'].any()
    assert not msda['attention_weights']['kernel'].any()
    assert not msda['attention_weights']['bias'].any()
    assert not msda['value_proj']['bias'].any() and not msda['output_proj']['bias'].any()
    attn = layer['attentions_0']['attn']
    assert not attn['in_proj_bias'].any() and not attn['out_proj']['bias'].any()
    xavier = np.sqrt(6 / (c + 3 * c))  # over the packed [3C, C] in_proj_weight
    assert 0.9 * xavier < np.abs(attn['in_proj_kernel']).max() <= xavier
  # Star grid at the reference's size: head h along angle h * 45 degrees, point k at k + 1.
  star = star_offsets(8, 1, 4).reshape(8, 4, 2)
  np.testing.assert_allclose(star[1, 2], [3, 3], atol=1e-6)
  np.testing.assert_allclose(star[6, 0], [0, -1], atol=1e-6)


def test_bad_config_names_the_field():
  cfg = pretrain.get_config('tiny')
  cfg.model.arch = 'detr'
  with pytest.raises(ValueError, match="config.model.arch must be 'occ' or 'det', got 'detr'"):
    models.model_config_from(cfg)
  cfg.model.arch = 'det'
  cfg.model.detection = {'num_queries': 10}
  with pytest.raises(ValueError, match=r"config.model.detection: unknown fields \['num_queries'\]"):
    models.model_config_from(cfg)
  cfg.model.detection = {'num_query': 10, 'code_weights': [1.0] * 10}
  mc = models.model_config_from(cfg)
  assert mc.detection.num_query == 10 and mc.detection.code_weights == (1.0,) * 10
  assert mc.head.occupancy is None and isinstance(models.build_model(mc), UniSceneDet)
