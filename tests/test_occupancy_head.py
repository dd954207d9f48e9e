"""Occupancy head and focal loss against PyTorch twins written from the spec."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from tests.reference.occupancy_torch import OccupancyHeadTorch, focal_loss_torch
from uniscene_jax import losses
from uniscene_jax.models.occupancy_head import GroupBatchNorm, OccupancyHead, OccupancyHeadConfig


def _load_into_torch(variables, model):
  p, s = variables['params'], variables['batch_stats']
  sd = {}
  for i in range(2):
    k = np.asarray(p[f'decoder_{i}']['conv']['kernel'])  # DHWIO
    sd[f'decoder.{i}.conv.weight'] = torch.tensor(k.transpose(4, 3, 0, 1, 2).copy())
    sd[f'decoder.{i}.bn.weight'] = torch.tensor(np.asarray(p[f'decoder_{i}']['bn']['scale']))
    sd[f'decoder.{i}.bn.bias'] = torch.tensor(np.asarray(p[f'decoder_{i}']['bn']['bias']))
    sd[f'decoder.{i}.bn.running_mean'] = torch.tensor(np.asarray(s[f'decoder_{i}']['bn']['mean']))
    sd[f'decoder.{i}.bn.running_var'] = torch.tensor(np.asarray(s[f'decoder_{i}']['bn']['var']))
    sd[f'decoder.{i}.bn.num_batches_tracked'] = torch.tensor(0)
  for i in (0, 2):
    sd[f'predicter.{i}.weight'] = torch.tensor(np.asarray(p[f'predicter_{i}']['kernel']).T.copy())
    sd[f'predicter.{i}.bias'] = torch.tensor(np.asarray(p[f'predicter_{i}']['bias']))
  model.load_state_dict(sd, strict=True)


def test_head_matches_torch_in_train_and_eval_mode():
  cfg = OccupancyHeadConfig(bev_h=12, bev_w=10, bn_group_size=1)
  head = OccupancyHead(cfg)
  rng = np.random.default_rng(0)
  bev = rng.normal(size=(1, 120, 256)).astype(np.float32)
  variables = head.init(jax.random.key(0), jnp.asarray(bev), train=False)
  variables = jax.tree.map(
    lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), variables
  )
  variables['batch_stats'] = jax.tree.map(jnp.abs, variables['batch_stats'])
  twin = OccupancyHeadTorch(bev_h=12, bev_w=10)
  _load_into_torch(variables, twin)
  twin.eval()
  out = head.apply(variables, jnp.asarray(bev), train=False)
  assert out.shape == (1, 10, 12, 16, 2)  # [B, X = W, Y = H, Z, classes]
  with torch.no_grad():
    want = twin(torch.tensor(bev)).numpy()
  np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)
  # Train mode: batch statistics, and running statistics moved as torch moves them.
  out, updates = head.apply(variables, jnp.asarray(bev), train=True, mutable=['batch_stats'])
  twin.train()
  with torch.no_grad():
    want = twin(torch.tensor(bev)).numpy()
  np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)
  for i in range(2):
    bn = twin.decoder[i].bn
    got = updates['batch_stats'][f'decoder_{i}']['bn']
    np.testing.assert_allclose(got['mean'], bn.running_mean.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got['var'], bn.running_var.numpy(), atol=1e-5, rtol=1e-5)


def test_group_batch_norm_groups():
  x = jax.random.normal(jax.random.key(0), (4, 3, 5, 7)) * jnp.arange(1, 5)[:, None, None, None]
  bn = GroupBatchNorm(group_size=1)
  v = bn.init(jax.random.key(1), x, train=False)
  per_sample = bn.apply(v, x, train=True, mutable=['batch_stats'])[0]
  # Each sample normalised by its own statistics equals running it alone.
  for i in range(4):
    alone = bn.apply(v, x[i : i + 1], train=True, mutable=['batch_stats'])[0]
    np.testing.assert_allclose(per_sample[i : i + 1], alone, atol=1e-5)
  sync = GroupBatchNorm(group_size=0).apply(v, x, train=True, mutable=['batch_stats'])[0]
  flat = np.asarray(x).reshape(-1, 7)
  want = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
  np.testing.assert_allclose(np.asarray(sync).reshape(-1, 7), want, atol=1e-4)


def test_focal_loss_matches_mmdet_formula():
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(2, 6, 5, 4, 2)) * 4).astype(np.float32)
  logits[0, 0, 0, 0] = [60.0, -60.0]  # saturated sigmoids stay finite
  labels = rng.integers(0, 2, size=(2, 6, 5, 4))
  got = losses.occupancy_focal_loss(jnp.asarray(logits), jnp.asarray(labels))
  want = focal_loss_torch(torch.tensor(logits.reshape(-1, 2)), torch.tensor(labels.reshape(-1)))
  np.testing.assert_allclose(got, want.item(), rtol=1e-6)
  mask = rng.integers(0, 2, size=labels.shape)
  logits18 = rng.normal(size=(2, 6, 5, 4, 18)).astype(np.float32)
  labels18 = rng.integers(0, 18, size=labels.shape)
  got = losses.occupancy_focal_loss(jnp.asarray(logits18), jnp.asarray(labels18), jnp.asarray(mask))
  want = focal_loss_torch(
    torch.tensor(logits18.reshape(-1, 18)),
    torch.tensor(labels18.reshape(-1)),
    weight=torch.tensor(mask.reshape(-1).astype(np.float32)),
  )
  np.testing.assert_allclose(got, want.item(), rtol=1e-6)
  grad = jax.grad(lambda x: losses.occupancy_focal_loss(x, jnp.asarray(labels)))(
    jnp.asarray(logits)
  )
  assert np.all(np.isfinite(grad))
