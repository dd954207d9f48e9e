"""The optimiser against the reference's formulas and torch's AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch

from uniscene_jax import optim


def test_schedule_equals_the_mmcv_formula():
  base, per_epoch, epochs = 2e-4, 100, 24
  sched = optim.lr_schedule(base, per_epoch, epochs)
  eta = base * 1e-3
  for step in [0, 1, 250, 499, 500, 501, 99, 100, 1234, 2399]:
    e = step // per_epoch
    regular = eta + 0.5 * (base - eta) * (1 + math.cos(math.pi * e / epochs))
    want = regular * (1 - (1 - step / 500) * (2 / 3)) if step < 500 else regular
    np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5)  # float32
  np.testing.assert_allclose(float(sched(0)), base / 3, rtol=1e-6)
  # Constant within an epoch after the warm-up, stepping down at epoch boundaries.
  np.testing.assert_allclose(float(sched(600)), float(sched(699)))
  assert float(sched(700)) < float(sched(699))


def _params():
  rng = np.random.default_rng(0)
  arr = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  return {
    'img_backbone': {
      'conv1': {'kernel': arr(3, 3)},
      'bn1': {'scale': arr(3), 'bias': arr(3)},
      'layer1_0': {'conv1': {'kernel': arr(3, 3)}},
      'layer2_0': {
        'conv1': {'kernel': arr(3, 3)},
        'bn1': {'scale': arr(3)},
        'downsample_0': {'kernel': arr(3, 3)},
        'downsample_1': {'scale': arr(3)},
      },
    },
    'img_neck': {'lateral_convs_0': {'conv': {'kernel': arr(3, 3), 'bias': arr(3)}}},
    'pts_bbox_head': {'bev_embedding': {'embedding': arr(4, 3)}},
  }


def test_labels_follow_the_reference_freezing():
  labels = optim.path_labels(_params())
  bb = labels['img_backbone']
  assert (
    bb['conv1']['kernel'] == bb['bn1']['scale'] == bb['layer1_0']['conv1']['kernel'] == 'frozen'
  )
  assert bb['layer2_0']['bn1']['scale'] == bb['layer2_0']['downsample_1']['scale'] == 'frozen'
  assert bb['layer2_0']['conv1']['kernel'] == bb['layer2_0']['downsample_0']['kernel'] == 'backbone'
  assert labels['img_neck']['lateral_convs_0']['conv']['bias'] == 'head'
  assert labels['pts_bbox_head']['bev_embedding']['embedding'] == 'head'


def test_updates_equal_torch_adamw_with_clip_and_groups():
  params = _params()
  cfg = optim.OptimConfig(warmup_steps=0, grad_clip_norm=1.0)
  tx = optim.make_optimizer(cfg, steps_per_epoch=10, params=params)
  state = tx.init(params)
  assert tx.sizes() == {'backbone': 18, 'head': 24}  # frozen tensors hold no state
  leaves = jax.tree.leaves(params)
  labels = jax.tree.leaves(optim.path_labels(params))
  tensors = [torch.tensor(np.asarray(x), requires_grad=True) for x in leaves]
  groups = [
    {'params': [t for t, lab in zip(tensors, labels, strict=True) if lab == 'head'], 'lr': 2e-4},
    {
      'params': [t for t, lab in zip(tensors, labels, strict=True) if lab == 'backbone'],
      'lr': 2e-5,
    },
  ]
  topt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(1)
  for i in range(3):
    grads = {
      k: rng.normal(size=x.shape).astype(np.float32) * 3 for k, x in tx.trainable(params).items()
    }
    if i == 2:
      grads = {k: g * 1e-3 for k, g in grads.items()}  # under the clip norm: not scaled
    params, state, norm = update({k: jnp.asarray(g) for k, g in grads.items()}, state, params)
    for t, path in zip(tensors, _paths(params), strict=True):
      t.grad = torch.from_numpy(grads[path]) if path in grads else None
    want = torch.nn.utils.clip_grad_norm_([t for t in tensors if t.grad is not None], 1.0)
    np.testing.assert_allclose(float(norm), float(want), rtol=1e-6)
    topt.step()
  assert int(state['count']) == 3
  for x, t, lab, x0 in zip(jax.tree.leaves(params), tensors, labels, leaves, strict=True):
    np.testing.assert_allclose(x, t.detach().numpy(), rtol=1e-5, atol=1e-7)
    if lab == 'frozen':
      np.testing.assert_array_equal(x, x0)
    else:
      assert np.abs(np.asarray(x) - np.asarray(x0)).max() > 1e-6


def test_trainable_and_merge_round_trip():
  params = _params()
  tx = optim.make_optimizer(optim.OptimConfig(), 10, params)
  trainable = tx.trainable(params)
  assert 'img_backbone/layer2_0/conv1/kernel' in trainable
  assert 'img_backbone/conv1/kernel' not in trainable and len(trainable) == 5
  doubled = tx.merge(params, {k: 2 * v for k, v in trainable.items()})
  for path, x in zip(_paths(params), jax.tree.leaves(params), strict=True):
    y = _leaf(doubled, path)
    np.testing.assert_array_equal(y, 2 * x if path in trainable else x)


def _paths(tree):
  return ['/'.join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _leaf(tree, path):
  for k in path.split('/'):
    tree = tree[k]
  return tree
