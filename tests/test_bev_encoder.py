"""The BEVFormer encoder against its PyTorch twin (the reference's procedure), fp32."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference.encoder_torch import EncoderTorch
from uniscene_jax.convert import key_map
from uniscene_jax.models.bev_encoder import BEVFormerEncoder, EncoderConfig

CFG = EncoderConfig(
  bev_h=12,
  bev_w=16,
  embed_dims=64,
  num_layers=2,
  ffn_dims=128,
  image_size=(64, 96),
  spatial_shapes=((8, 12), (4, 6)),
  dropout=0.0,
)


def _rig(b):
  """lidar2img [B, 6, 4, 4] of six cameras around the car; ego2lidar [B, 4, 4]."""
  mats = []
  for s in range(b):
    cams = []
    for yaw in np.linspace(0, 2 * np.pi, 6, endpoint=False) + 0.2 * s:
      c, si = np.cos(yaw), np.sin(yaw)
      cam2lidar = np.eye(4)
      cam2lidar[:3, :3] = np.stack([[si, -c, 0], [0, 0, -1], [c, si, 0]], 1)
      cam2lidar[:3, 3] = [0.5, 0, 0.3]
      k = np.eye(4)
      k[:3, :3] = [[50, 0, 48], [0, 50, 32], [0, 0, 1]]
      cams.append(k @ np.linalg.inv(cam2lidar))
    mats.append(cams)
  ego2lidar = np.stack([np.eye(4)] * b)
  ego2lidar[:, :3, 3] = [-0.9, 0.0, -1.8]
  return np.asarray(mats, np.float32), ego2lidar.astype(np.float32)


def _inputs(b, seed=0):
  rng = np.random.default_rng(seed)
  hw, c = CFG.bev_h * CFG.bev_w, CFG.embed_dims
  length = sum(h * w for h, w in CFG.spatial_shapes)
  lidar2img, ego2lidar = _rig(b)
  can = np.zeros((b, 18), np.float32)
  can[:, :2] = rng.normal(0, 1.5, (b, 2))
  can[:, 16] = rng.uniform(0, 2 * np.pi, b)
  can[:, 17] = rng.uniform(10, 40, b) * rng.choice([-1, 1], b)  # yaw change, degrees
  return dict(
    bev_query=rng.normal(size=(b, hw, c)).astype(np.float32),
    bev_pos=rng.normal(size=(b, hw, c)).astype(np.float32),
    feats=rng.normal(size=(b, 6, length, c)).astype(np.float32),
    lidar2img=lidar2img,
    ego2lidar=ego2lidar,
    can_bus=can,
    prev_bev=rng.normal(size=(b, hw, c)).astype(np.float32),
  )


def _variables(cfg, inputs):
  enc = BEVFormerEncoder(cfg)
  b = inputs['bev_query'].shape[0]
  args = {k: jnp.asarray(v) for k, v in inputs.items()}
  variables = enc.init(jax.random.key(0), **args, prev_exists=jnp.ones(b, bool))
  # Perturb every tensor so that zero-initialised projections take part.
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  return enc, jax.tree.unflatten(tree, leaves)


def _twin(cfg, params):
  twin = EncoderTorch(cfg)
  arrays = key_map.to_torch_arrays({'params': params})
  twin.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
  return twin.eval()


@pytest.mark.parametrize('with_prev', [True, False])
@pytest.mark.parametrize('inplace_shift', [True, False])
def test_encoder_matches_twin(with_prev, inplace_shift):
  cfg = dataclasses.replace(CFG, inplace_shift=inplace_shift)
  inputs = _inputs(1)
  if not with_prev:
    inputs['can_bus'][:, :2] = 0.0  # the queue zeroes the deltas without history
  enc, variables = _variables(cfg, inputs)
  args = {k: jnp.asarray(v) for k, v in inputs.items()}
  out, aux = enc.apply(variables, **args, prev_exists=jnp.asarray([with_prev]))
  twin = _twin(cfg, variables['params'])
  t = {k: torch.from_numpy(v) for k, v in inputs.items()}
  with torch.no_grad():
    want = twin(
      t['bev_query'],
      t['bev_pos'],
      t['feats'],
      t['lidar2img'],
      t['ego2lidar'],
      inputs['can_bus'].astype(np.float64),
      t['prev_bev'] if with_prev else None,
    ).numpy()
  np.testing.assert_allclose(out, want, atol=2e-4, rtol=2e-4)
  mask = np.asarray(aux['bev_mask'])
  assert mask.any(-1).mean() > 0.1 and int(aux['sca_overflow'][0]) == 0


def test_batch_of_two_equals_each_sample_alone_and_capacity():
  inputs = _inputs(2, seed=3)
  enc, variables = _variables(CFG, {k: v[:1] for k, v in inputs.items()})
  args = {k: jnp.asarray(v) for k, v in inputs.items()}
  exists = jnp.asarray([True, False])
  full, aux = enc.apply(variables, **args, prev_exists=exists)
  for j in range(2):
    alone, _ = enc.apply(
      variables, **{k: v[j : j + 1] for k, v in args.items()}, prev_exists=exists[j : j + 1]
    )
    np.testing.assert_allclose(full[j : j + 1], alone, atol=1e-5)
  # A per-camera capacity equal to the largest selection gives the same result and no overflow.
  visible = np.asarray(aux['bev_mask']).any(-1).sum(-1)  # [B, N]
  cap = int(visible.max())
  assert cap < CFG.bev_h * CFG.bev_w
  capped = BEVFormerEncoder(dataclasses.replace(CFG, sca_capacity=cap))
  out, caux = jax.jit(lambda v, a: capped.apply(v, **a, prev_exists=exists))(variables, args)
  np.testing.assert_allclose(out, full, atol=1e-5)
  assert np.all(np.asarray(caux['sca_overflow']) == 0)
  small = BEVFormerEncoder(dataclasses.replace(CFG, sca_capacity=cap - 5))
  _, saux = small.apply(variables, **args, prev_exists=exists)
  np.testing.assert_array_equal(saux['sca_overflow'], np.maximum(visible - (cap - 5), 0).sum(-1))


def test_gradients_flow_through_capacity_selection():
  inputs = _inputs(1, seed=5)
  enc, variables = _variables(CFG, inputs)
  args = {k: jnp.asarray(v) for k, v in inputs.items()}
  visible = int(
    np.asarray(enc.apply(variables, **args, prev_exists=jnp.ones(1, bool))[1]['bev_mask'])
    .any(-1)
    .sum(-1)
    .max()
  )
  capped = BEVFormerEncoder(dataclasses.replace(CFG, sca_capacity=visible))

  def loss(model, feats):
    out, _ = model.apply(variables, **{**args, 'feats': feats}, prev_exists=jnp.ones(1, bool))
    return jnp.sum(out * args['bev_pos'])

  g_full = jax.grad(lambda f: loss(enc, f))(args['feats'])
  g_cap = jax.grad(lambda f: loss(capped, f))(args['feats'])
  np.testing.assert_allclose(g_cap, g_full, atol=1e-4, rtol=1e-4)
  assert np.abs(np.asarray(g_full)).sum() > 0


def test_remat_and_bfloat16():
  inputs = _inputs(1, seed=7)
  enc, variables = _variables(CFG, inputs)
  args = {k: jnp.asarray(v) for k, v in inputs.items()}
  exists = jnp.ones(1, bool)

  def loss(model, params):
    out, _ = model.apply({'params': params}, **args, prev_exists=exists)
    return jnp.sum(out.astype(jnp.float32) * args['bev_pos'])

  remat = BEVFormerEncoder(dataclasses.replace(CFG, remat=True))
  g = jax.grad(lambda p: loss(enc, p))(variables['params'])
  g_remat = jax.grad(lambda p: loss(remat, p))(variables['params'])

  # Recomputation fuses differently: float32 rounding, within 1e-4 of each tensor's largest value.
  def close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.abs(b).max()) + 1e-8)

  jax.tree.map(close, g_remat, g)
  out32, _ = enc.apply(variables, **args, prev_exists=exists)
  out16, _ = BEVFormerEncoder(CFG, dtype=jnp.bfloat16).apply(variables, **args, prev_exists=exists)
  assert out16.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out16, np.float32) - np.asarray(out32))
  assert (
    err.mean() < 0.05
    and np.corrcoef(np.asarray(out16, np.float32).ravel(), out32.ravel())[0, 1] > 0.99
  )
