"""ResNet-DCN backbone + FPN neck: parameter counts and shapes of the full model (eval_shape only),
and a small-depth twin run against the PyTorch reference network (tests/reference/backbone_torch.py)
with the same weights, loaded through a test-local Flax -> torch converter with strict key checking.

Tolerances (float32): outputs and gradients agree to rtol 1e-4 of each tensor's largest magnitude;
that is float32 accumulation order through ~20 convolutions (two libraries sum the same products
in different orders), far above any layout or indexing error, which would be O(1).
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference import backbone_torch
from uniscene_jax.models.backbone import ResNet, ResNetConfig
from uniscene_jax.models.fpn import FPN, FPNConfig, resize_nearest

# From the reference state_dict manifest: parameter elements of img_backbone / img_neck (BN
# running statistics are buffers there: 104 BNs x (mean + var) = 105,344 elements).
BACKBONE_PARAMS = 44_304_894
BACKBONE_BN_STATS = 105_344
NECK_PARAMS = 3_278_592

# Three DCN blocks in stage 3: with remat the two after the first run as one loop.
SMALL = ResNetConfig(stage_blocks=(2, 1, 3, 1), base_width=8)
NECK_WIDTH = 16


def _count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_full_size_counts_and_shapes():
  img = jax.ShapeDtypeStruct((6, 928, 1600, 3), jnp.float32)
  backbone, neck = ResNet(ResNetConfig.from_depth(101)), FPN()
  bb_vars = jax.eval_shape(backbone.init, jax.random.key(0), img)
  assert _count(bb_vars['params']) == BACKBONE_PARAMS
  assert _count(bb_vars['batch_stats']) == BACKBONE_BN_STATS
  feats = jax.eval_shape(backbone.apply, bb_vars, img)
  assert [f.shape for f in feats] == [(6, 116, 200, 512), (6, 58, 100, 1024), (6, 29, 50, 2048)]
  neck_vars = jax.eval_shape(neck.init, jax.random.key(0), feats)
  assert _count(neck_vars['params']) == NECK_PARAMS and 'batch_stats' not in neck_vars
  outs = jax.eval_shape(neck.apply, neck_vars, feats)
  assert [o.shape[1:3] for o in outs] == [(116, 200), (58, 100), (29, 50), (15, 25)]
  assert all(o.shape[-1] == 256 and o.dtype == jnp.float32 for o in outs)
  names = set(bb_vars['params'])
  assert {'conv1', 'bn1', 'layer1_0', 'layer3_22', 'layer4_2'} <= names and 'layer3_23' not in names
  assert set(bb_vars['params']['layer3_0']['conv2']) == {'kernel', 'conv_offset'}
  assert 'conv_offset' not in bb_vars['params']['layer2_0']['conv2']
  assert set(neck_vars['params']) == {f'lateral_convs_{i}' for i in range(3)} | {
    f'fpn_convs_{i}' for i in range(4)
  }


# ---------------------------------------------------------------------------------------------
# Small twin against torch


def _torch_key(path):
  """('params', 'img_backbone', 'layer3_0', 'conv2', 'conv_offset', 'kernel') ->
  'img_backbone.layer3.0.conv2.conv_offset.weight' (a trailing _<index> is a torch index)."""
  collection, *names, leaf = path
  names = [re.sub(r'_(\d+)$', r'.\1', n) for n in names]
  leaf = {
    ('params', 'kernel'): 'weight',
    ('params', 'bias'): 'bias',
    ('params', 'scale'): 'weight',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
  }[collection, leaf]
  return '.'.join(names + [leaf])


def _to_state_dict(variables):
  state = {}
  for path, x in jax.tree_util.tree_flatten_with_path(variables)[0]:
    key = _torch_key(tuple(p.key for p in path))
    x = np.asarray(x)
    if x.ndim == 4:
      x = x.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    state[key] = torch.tensor(x)
    if key.endswith('running_var'):
      state[key.replace('running_var', 'num_batches_tracked')] = torch.tensor(0)
  return state


def _randomise(variables, rng):
  """Random weights everywhere (BN statistics included), scaled to keep activations O(1) and
  the deformable offsets a few pixels."""

  def draw(path, x):
    names = [p.key for p in path]
    leaf = names[-1]
    if leaf == 'kernel':
      fan_in = math.prod(x.shape[:-1])
      std = (0.5 if 'conv_offset' in names else 1.0) / math.sqrt(fan_in)
      return rng.normal(0, std, x.shape)
    if leaf in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, x.shape)
    return rng.normal(0, 0.2, x.shape)  # bias, mean

  return jax.tree_util.tree_map_with_path(
    lambda p, x: jnp.asarray(draw(p, x), jnp.float32), variables
  )


class _Model:
  """Backbone + neck as one Flax apply, variables nested as img_backbone / img_neck."""

  def __init__(self, dtype=jnp.float32, remat=False):
    self.backbone = ResNet(dataclasses.replace(SMALL, remat=remat), dtype=dtype)
    self.neck = FPN(FPNConfig(out_channels=NECK_WIDTH), dtype=dtype)

  def init(self, img):
    # Shapes are all that is needed: every value is replaced by _randomise.
    bb = jax.eval_shape(self.backbone.init, jax.random.key(0), img)
    feats = jax.eval_shape(self.backbone.apply, bb, img)
    nk = jax.eval_shape(self.neck.init, jax.random.key(1), feats)
    return {
      'params': {'img_backbone': bb['params'], 'img_neck': nk['params']},
      'batch_stats': {'img_backbone': bb['batch_stats']},
    }

  def apply(self, variables, img):
    bb = {k: v['img_backbone'] for k, v in variables.items()}
    feats = self.backbone.apply(bb, img)
    return self.neck.apply({'params': variables['params']['img_neck']}, feats)


@pytest.fixture(scope='module')
def twin():
  rng = np.random.default_rng(0)
  img = rng.normal(0, 1, (2, 64, 96, 3)).astype(np.float32)
  model = _Model()
  variables = _randomise(model.init(jnp.asarray(img)), rng)
  net = backbone_torch.BackboneNeck(
    SMALL.stage_blocks, SMALL.base_width, SMALL.stage_with_dcn, NECK_WIDTH
  )
  net.load_state_dict(_to_state_dict(variables), strict=True)
  net.eval()
  return model, variables, net, img


def _close(a, b, what):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, what
  scale = np.abs(b).max()
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale, err_msg=what)


def test_small_backbone_and_neck_match_torch(twin):
  model, variables, net, img = twin
  outs = jax.jit(model.apply)(variables, img)
  with torch.no_grad():
    ref = net(torch.tensor(img).permute(0, 3, 1, 2))
  assert [o.shape[1:3] for o in outs] == [(8, 12), (4, 6), (2, 3), (1, 2)]
  for lvl, (o, r) in enumerate(zip(outs, ref, strict=True)):
    _close(o, r.permute(0, 2, 3, 1).numpy(), f'level {lvl}')
  # The DCN offsets really move the samples: zeroing conv_offset changes the output.
  still = jax.tree_util.tree_map_with_path(
    lambda p, x: x * 0 if 'conv_offset' in str(p) else x, variables
  )
  assert np.abs(np.asarray(jax.jit(model.apply)(still, img)[1] - outs[1])).max() > 1e-2


def test_small_backbone_and_neck_gradients_match_torch(twin):
  model, variables, net, img = twin
  rng = np.random.default_rng(1)
  outs = model.apply(variables, img)
  cots = [rng.normal(0, 1, o.shape).astype(np.float32) for o in outs]

  def loss(params):
    outs = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, img)
    return sum(jnp.sum(o * c) for o, c in zip(outs, cots, strict=True))

  grads = jax.jit(jax.grad(loss))(variables['params'])
  # Reference freezing: stem, layer1 and every BN affine have requires_grad=False.
  for name, p in net.named_parameters():
    frozen = name.startswith(('img_backbone.conv1', 'img_backbone.bn1', 'img_backbone.layer1'))
    is_bn = re.search(r'\.(bn\d|downsample\.1)\.', name) is not None
    p.requires_grad_(not (frozen or is_bn))
  ref_outs = net(torch.tensor(img).permute(0, 3, 1, 2))
  sum(
    (r * torch.tensor(c).permute(0, 3, 1, 2)).sum() for r, c in zip(ref_outs, cots, strict=True)
  ).backward()
  ref_grads = dict(net.named_parameters())
  checked = 0
  for path, g in jax.tree_util.tree_flatten_with_path({'params': grads})[0]:
    key = _torch_key(tuple(p.key for p in path))
    tg = ref_grads[key].grad
    g = np.asarray(g)
    if key.startswith(('img_backbone.conv1', 'img_backbone.bn1', 'img_backbone.layer1')):
      assert tg is None and not g.any(), key  # frozen stages: no gradient at all
      continue
    if tg is None:
      continue  # BN affine: frozen in the reference, masked from the optimiser here
    tg = tg.numpy()
    _close(g, tg.transpose(2, 3, 1, 0) if tg.ndim == 4 else tg, key)
    checked += 1
  assert checked >= 20


@pytest.mark.slow(seconds=30)
def test_bfloat16_and_remat_variants(twin):
  model, variables, _, img = twin
  ref = jax.jit(model.apply)(variables, img)
  remat = _Model(remat=True)
  for a, b in zip(jax.jit(remat.apply)(variables, img), ref, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

  def grads(m):
    def loss(params):
      outs = m.apply({'params': params, 'batch_stats': variables['batch_stats']}, img)
      return sum(jnp.sum(o * jnp.cos(o)) for o in outs)

    return jax.jit(jax.grad(loss))(variables['params'])

  def close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.abs(b).max()) + 1e-8)

  jax.tree.map(close, grads(remat), grads(model))
  half = _Model(dtype=jnp.bfloat16)
  for a, b in zip(jax.jit(half.apply)(variables, img), ref, strict=True):
    assert a.dtype == jnp.bfloat16
    b = np.asarray(b)
    # bfloat16 keeps 8 mantissa bits; through this depth errors reach a few percent of the range.
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.08 * np.abs(b).max())


def test_fpn_extra_conv_relu_flag_and_nearest_resize():
  rng = np.random.default_rng(2)
  feats = [jnp.asarray(rng.normal(0, 1, (1, s, s, 4)), jnp.float32) for s in (8, 4, 2)]
  plain = FPN(FPNConfig(out_channels=4))
  relu = FPN(FPNConfig(out_channels=4, relu_before_first_extra_conv=True))
  variables = plain.init(jax.random.key(0), feats)
  outs, outs_relu = plain.apply(variables, feats), relu.apply(variables, feats)
  for a, b in zip(outs[:3], outs_relu[:3], strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(outs[3] - outs_relu[3])).max() > 1e-3  # P6 takes P5 without ReLU
  x = jnp.arange(15.0).reshape(1, 3, 5, 1)
  t = torch.nn.functional.interpolate(torch.arange(15.0).reshape(1, 1, 3, 5), size=(7, 4))
  np.testing.assert_array_equal(np.asarray(resize_nearest(x, (7, 4)))[0, ..., 0], t[0, 0].numpy())


def test_config_variants_shapes():
  cfg = ResNetConfig(stage_blocks=(1, 1, 1, 1), base_width=8, stem_width=16, frozen_stages=-1)
  img = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  params = jax.eval_shape(ResNet(cfg).init, jax.random.key(0), img)['params']
  assert params['conv1']['kernel'].shape == (7, 7, 3, 16)
  assert params['layer1_0']['conv1']['kernel'].shape == (1, 1, 16, 8)
  assert params['layer1_0']['downsample_0']['kernel'].shape == (1, 1, 16, 32)
  assert cfg.out_channels == (64, 128, 256)
  assert ResNetConfig.from_depth(50).stage_blocks == (3, 4, 6, 3)
  with pytest.raises(ValueError, match='depth'):
    ResNetConfig.from_depth(34)
