"""The whole pre-training model: the manifest at base size, the twin, batching, camera order."""

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import pretrain
from tests.reference.uniscene_torch import UniSceneOccTorch
from tests.test_bev_encoder import _rig
from uniscene_jax import models
from uniscene_jax.convert import key_map

MANIFEST = os.path.join(
  os.path.dirname(__file__), '..', '..', 'shared', 'reference', 'bevformer_occ_keys.json'
)


def test_base_model_keys_shapes_and_count_equal_the_manifest():
  abstract = jax.eval_shape(lambda: models.init_variables(pretrain.get_config(), jax.random.key(0)))
  got = key_map.to_torch_shapes(abstract)
  manifest = json.loads(pathlib.Path(MANIFEST).read_text())
  assert got == {k: (tuple(v['shape']), v['dtype']) for k, v in manifest.items()}
  assert sum(x.size for x in jax.tree.leaves(abstract['params'])) == 62_897_984


def _small_config():
  cfg = pretrain.get_config('tiny')
  cfg.data.image_size = (60, 90)  # padded to 64 x 96
  cfg.model.bev_h, cfg.model.bev_w = 10, 12
  cfg.model.num_layers = 2
  return models.model_config_from(cfg)


@pytest.fixture(scope='module')
def small():
  mc = _small_config()
  variables = jax.jit(lambda k: models.init_variables(mc, k))(jax.random.key(0))
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [
    x + 0.05 * jax.random.normal(k, x.shape) * (1 + jnp.abs(x).mean())
    for x, k in zip(leaves, keys, strict=True)
  ]
  variables = jax.tree.unflatten(tree, leaves)
  variables['batch_stats'] = jax.tree.map(jnp.abs, variables['batch_stats'])
  return mc, models.build_model(mc), variables


def _queue(b, seed=0):
  rng = np.random.default_rng(seed)
  t = 3
  img = rng.normal(0, 30, (b, t, 6, 64, 96, 3)).astype(np.float32)
  lidar2img, ego2lidar = _rig(b)
  lidar2img = np.repeat(lidar2img[:, None], t, 1)
  ego2lidar = np.repeat(ego2lidar[:, None], t, 1)
  can = np.zeros((b, t, 18), np.float32)
  can[:, :, :2] = rng.normal(0, 1, (b, t, 2))
  can[:, :, 16] = 0.4
  can[:, :, 17] = rng.uniform(-20, 20, (b, t))
  exists = np.array([[False, True, True]] * b)
  return img, lidar2img, ego2lidar, can, exists


def make_twin(mc, state_dict) -> UniSceneOccTorch:
  """The PyTorch twin of ModelConfig `mc`, strictly loaded with `state_dict`, in eval mode."""
  twin = UniSceneOccTorch(
    mc.backbone.stage_blocks,
    mc.backbone.base_width,
    mc.backbone.stage_with_dcn,
    mc.head.encoder,
    mc.head.occupancy,
  )
  twin.load_state_dict(state_dict, strict=True)
  return twin.eval()


def twin_forward(twin, img, lidar2img, ego2lidar, can, exists):
  """(logits, bev) of the twin on a queue of batch 1 in this file's numpy layout."""
  with torch.no_grad():
    return twin(
      torch.from_numpy(img).permute(0, 1, 2, 5, 3, 4),
      torch.from_numpy(lidar2img),
      torch.from_numpy(ego2lidar),
      can.astype(np.float64),
      list(exists[0]),
    )


def test_model_matches_the_twin(small):
  mc, model, variables = small
  img, lidar2img, ego2lidar, can, exists = _queue(1)
  logits, aux = jax.jit(lambda v, *a: model.apply(v, *a))(
    variables, img, lidar2img, ego2lidar, can, exists
  )
  sd = {k: torch.from_numpy(v) for k, v in key_map.to_torch_arrays(variables).items()}
  want, bev = twin_forward(make_twin(mc, sd), img, lidar2img, ego2lidar, can, exists)
  scale = float(np.abs(want.numpy()).max())
  np.testing.assert_allclose(aux['bev_embed'], bev.numpy(), atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(logits, want.numpy(), atol=2e-4 * scale, rtol=1e-4)


def test_batch_of_two_and_camera_order(small):
  mc, model, variables = small
  img, lidar2img, ego2lidar, can, exists = _queue(2, seed=1)
  exists[1, 1] = False  # the second sample starts a new scene at its middle frame
  fn = jax.jit(lambda v, *a: model.apply(v, *a)[0])
  both = fn(variables, img, lidar2img, ego2lidar, can, exists)
  for j in range(2):
    one = fn(variables, *(x[j : j + 1] for x in (img, lidar2img, ego2lidar, can, exists)))
    np.testing.assert_allclose(both[j : j + 1], one, atol=1e-4, rtol=1e-4)
  # Cameras are told apart by their matrices and embeddings: permuting images, matrices and the
  # camera embedding table together leaves the prediction unchanged.
  perm = np.array([3, 0, 5, 1, 4, 2])
  swapped = jax.tree.map(lambda x: x, variables)
  cams = variables['params']['pts_bbox_head']['transformer']['cams_embeds']
  swapped['params']['pts_bbox_head']['transformer']['cams_embeds'] = cams[perm]
  out = fn(swapped, img[:, :, perm], lidar2img[:, :, perm], ego2lidar, can, exists)
  np.testing.assert_allclose(out, both, atol=1e-4, rtol=1e-4)
  assert dataclasses.is_dataclass(mc)


def test_twin_checkpointing_keeps_loss_and_gradients(small):
  # The benchmark's twin recomputes each block and layer in the backward pass to fit at base
  # size; that must not change what it computes.
  mc, _, variables = small
  img, lidar2img, ego2lidar, can, exists = _queue(1, seed=2)
  sd = {k: torch.from_numpy(v) for k, v in key_map.to_torch_arrays(variables).items()}
  args = (
    torch.from_numpy(img).permute(0, 1, 2, 5, 3, 4),
    torch.from_numpy(lidar2img),
    torch.from_numpy(ego2lidar),
    can.astype(np.float64),
    list(exists[0]),
  )
  grads = []
  for on in (False, True):
    twin = make_twin(mc, sd)
    twin.set_checkpointing(on)
    recomputed = []
    for layer in twin.pts_bbox_head.transformer.encoder.layers:
      layer.attentions[0].register_forward_hook(lambda *_, r=recomputed: r.append(1))
    block_runs = []
    twin.img_backbone.layer2[0].conv1.register_forward_hook(lambda *_, r=block_runs: r.append(1))
    logits, _ = twin(*args)
    (logits.square().mean()).backward()
    grads.append({n: p.grad.clone() for n, p in twin.named_parameters() if p.grad is not None})
    # with checkpointing the current frame's encoder layers and trainable blocks run twice
    frames, layers = img.shape[1], mc.head.encoder.num_layers
    assert len(recomputed) == frames * layers + (layers if on else 0)
    assert len(block_runs) == frames + on
  assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
  for name, g in grads[0].items():
    np.testing.assert_allclose(
      grads[1][name].numpy(), g.numpy(), rtol=1e-5, atol=1e-7, err_msg=name
    )
