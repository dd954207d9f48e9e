"""The BEVFormer encoder against its PyTorch twin (the reference's procedure), fp32."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference.encoder_torch import SCA, TSA, EncoderTorch
from uniscene_jax import geometry
from uniscene_jax.convert import key_map
from uniscene_jax.models.bev_attention import SpatialCrossAttention, TemporalSelfAttention
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
  return enc, _perturb(variables)


def _perturb(variables):
  """Every tensor + 0.1 N(0, 1), so that zero-initialised projections take part."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  return jax.tree.unflatten(tree, leaves)


def _load(twin, params):
  """The twin module (eval mode) holding the Flax params of the same module; strict keys."""
  arrays = key_map.to_torch_arrays({'params': params})
  twin.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
  return twin.eval()


def _twin(cfg, params):
  return _load(EncoderTorch(cfg), params)


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


# Each attention module against its twin, fp32. Both sides do the same arithmetic in another
# order: the largest differences seen are 2e-6 (TSA) and 4e-7 (SCA) on outputs up to about 5.
MODULE_TOL = dict(atol=1e-5, rtol=1e-5)
SCA_SHAPES = ((8, 12), (4, 6), (2, 3))  # three levels


def _torch(a):
  return torch.from_numpy(np.array(a, np.float32))


def _tsa_case(b, seed):
  """TSA and its perturbed variables; inputs x, pos, query (value slot 1), prev (slot 0), ref_2d."""
  rng = np.random.default_rng(seed)
  hw, c = CFG.bev_h * CFG.bev_w, CFG.embed_dims
  x, pos, query, prev = (rng.normal(size=(b, hw, c)).astype(np.float32) for _ in range(4))
  base = geometry.bev_reference_2d(CFG.bev_h, CFG.bev_w)
  # Slot 0 (the previous BEV) is read around cells shifted by a per-sample ego motion.
  shifted = base + rng.normal(0.0, 0.05, (b, 1, 2))
  ref = np.stack([shifted, np.broadcast_to(base, shifted.shape)], 1).astype(np.float32)
  tsa = TemporalSelfAttention(
    CFG.bev_h, CFG.bev_w, CFG.embed_dims, CFG.num_heads, CFG.tsa_points, dropout=0.0
  )
  variables = _perturb(tsa.init(jax.random.key(0), x, pos, np.stack([prev, query], 1), ref))
  return tsa, variables, x, pos, query, prev, ref


@pytest.mark.parametrize('b', [1, 2])
@pytest.mark.parametrize('with_prev', [True, False])
def test_temporal_self_attention_matches_twin(with_prev, b):
  tsa, variables, x, pos, query, prev, ref = _tsa_case(b, seed=11)
  hw, c = x.shape[1:]
  apply = jax.jit(tsa.apply)
  value = np.stack([prev, query], 1) if with_prev else None
  out = np.asarray(apply(variables, x, pos, value, ref))
  twin = _load(
    TSA(CFG.embed_dims, CFG.num_heads, CFG.tsa_points, CFG.bev_h, CFG.bev_w), variables['params']
  )

  def twin_apply(x, pos, value, ref):
    """value [B, 2, HW, C] or None, ref [B, 2, HW, 2] -> the twin's (2B, ...) interleaved stacks."""
    n = 2 * x.shape[0]
    with torch.no_grad():
      return twin(
        _torch(x),
        _torch(pos),
        None if value is None else _torch(value.reshape(n, hw, c)),
        _torch(ref.reshape(n, hw, 1, 2)),
      ).numpy()

  # The twin (the reference) is right for one sample only: compare each sample alone.
  for j in range(b):
    s = slice(j, j + 1)
    want = twin_apply(x[s], pos[s], None if value is None else value[s], ref[s])
    np.testing.assert_allclose(out[s], want, **MODULE_TOL)
  if b == 2:
    # Batched, the twin concatenates sample 0's slot 0 to every query (`value[:B]`); the module
    # pairs each sample with its own.
    batched = twin_apply(x, pos, value, ref)
    np.testing.assert_allclose(out[:1], batched[:1], **MODULE_TOL)
    assert np.abs(out[1] - batched[1]).max() > 0.1
  # The attention term is not trivial and every input takes part.
  assert np.abs(out - x).mean() > 0.1
  if with_prev:
    others = np.random.default_rng(12).normal(size=(2, b, hw, c)).astype(np.float32)
    for slot in range(2):
      changed = value.copy()
      changed[:, slot] = others[slot]
      assert np.abs(np.asarray(apply(variables, x, pos, changed, ref)) - out).mean() > 0.05
    moved = ref.copy()
    moved[:, 0] += 0.1
    assert np.abs(np.asarray(apply(variables, x, pos, value, moved)) - out).mean() > 0.05
    # The twin agrees on other inputs too: both slots replaced, slot 0 read elsewhere.
    new = others.transpose(1, 0, 2, 3)  # [B, 2, HW, C]
    want = twin_apply(x[:1], pos[:1], new[:1], moved[:1])
    got = apply(variables, x[:1], pos[:1], new[:1], moved[:1])
    np.testing.assert_allclose(got, want, **MODULE_TOL)
  else:
    # No history is the value (x, x), as the encoder passes it.
    same = apply(variables, x, pos, np.stack([x, x], 1), ref)
    np.testing.assert_allclose(same, out, atol=1e-6, rtol=1e-6)


def _sca_case(seed):
  """SCA on three levels with the encoder's projection of the pillar anchors into the _rig
  cameras, at B = 1: (module, variables, x, feats, ref_cam, bev_mask)."""
  rng = np.random.default_rng(seed)
  hw, c = CFG.bev_h * CFG.bev_w, CFG.embed_dims
  length = sum(h * w for h, w in SCA_SHAPES)
  lidar2img, ego2lidar = _rig(1)
  ref_3d = geometry.bev_reference_3d(CFG.bev_h, CFG.bev_w, CFG.num_points_in_pillar, CFG.pc_range)
  ref_cam, bev_mask = geometry.project_to_cameras(
    jnp.asarray(ref_3d),
    jnp.asarray(lidar2img),
    CFG.image_size,
    jnp.asarray(ego2lidar),
    CFG.pc_range,
  )
  x = rng.normal(size=(1, hw, c)).astype(np.float32)
  feats = rng.normal(size=(1, 6, length, c)).astype(np.float32)
  sca = SpatialCrossAttention(
    SCA_SHAPES, CFG.embed_dims, CFG.num_heads, CFG.sca_points, dropout=0.0
  )
  variables = _perturb(sca.init(jax.random.key(0), x, feats, ref_cam, bev_mask))
  return sca, variables, x, feats, np.asarray(ref_cam), np.asarray(bev_mask)


def test_spatial_cross_attention_matches_twin():
  sca, variables, x, feats, ref_cam, bev_mask = _sca_case(seed=21)
  apply = jax.jit(sca.apply)
  out, overflow = apply(variables, x, feats, ref_cam, bev_mask)
  out = np.asarray(out)
  twin = _load(
    SCA(CFG.embed_dims, CFG.num_heads, len(SCA_SHAPES), CFG.sca_points), variables['params']
  )
  with torch.no_grad():
    want = twin(
      _torch(x),
      _torch(feats.transpose(1, 2, 0, 3)),  # (N, L, B, C)
      _torch(ref_cam.transpose(1, 0, 2, 3, 4)),  # (N, B, HW, P, 2)
      torch.from_numpy(bev_mask.transpose(1, 0, 2, 3).copy()),
      SCA_SHAPES,
    ).numpy()
  np.testing.assert_allclose(out, want, **MODULE_TOL)
  assert int(overflow[0]) == 0
  # The case covers queries seen by one and by two cameras, and visible queries with anchors that
  # are not (some behind a camera, at huge coordinates).
  visible = bev_mask.any(-1)  # [B, N, HW]
  seen_by = visible.sum(1)
  assert (seen_by == 1).any() and (seen_by == 2).any()
  assert (visible & ~bev_mask.all(-1)).any() and np.abs(ref_cam).max() > 1e3
  assert np.abs(out - x).mean() > 0.05
  # Camera 0's features reach exactly the queries camera 0 sees.
  other = feats.copy()
  other[:, 0] = np.random.default_rng(22).normal(size=other.shape[2:])
  diff = np.abs(np.asarray(apply(variables, x, other, ref_cam, bev_mask)[0]) - out).max(-1)
  assert diff[visible[:, 0]].min() > 1e-3 and diff[~visible[:, 0]].max() == 0.0


def test_spatial_cross_attention_capacity():
  sca, variables, x, feats, ref_cam, bev_mask = _sca_case(seed=23)
  full, _ = jax.jit(sca.apply)(variables, x, feats, ref_cam, bev_mask)
  visible = bev_mask.any(-1)  # [B, N, HW]
  need = int(visible.sum(-1).max())
  assert need < CFG.bev_h * CFG.bev_w  # the capacity path, not the full one

  def capped(capacity):
    module = sca.clone(capacity=capacity)
    out, overflow = jax.jit(module.apply)(variables, x, feats, ref_cam, bev_mask)
    return np.asarray(out), np.asarray(overflow)

  out, overflow = capped(need)
  np.testing.assert_allclose(out, full, atol=1e-6, rtol=1e-6)
  np.testing.assert_array_equal(overflow, [0])
  small = need - 5
  out, overflow = capped(small)
  np.testing.assert_array_equal(overflow, np.maximum(visible.sum(-1) - small, 0).sum(-1))
  assert overflow[0] >= 5
  # The queries left out are each camera's last visible ones; only their results change.
  dropped = (visible & (np.cumsum(visible, -1) > small)).any(1)  # [B, HW]
  diff = np.abs(out - np.asarray(full)).max(-1)
  assert dropped.any() and diff[dropped].min() > 1e-3 and diff[~dropped].max() < 1e-6
