"""The BEV head (queries, positions, CAN-bus MLP, embeddings, encoder, occupancy) vs its twin."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import torch

from tests.reference.head_torch import BEVHeadTorch
from tests.test_bev_encoder import _rig
from uniscene_jax.convert import key_map
from uniscene_jax.models.bev_encoder import EncoderConfig
from uniscene_jax.models.heads import BEVHead, HeadConfig
from uniscene_jax.models.occupancy_head import OccupancyHeadConfig

MANIFEST = os.path.join(
  os.path.dirname(__file__), '..', '..', 'shared', 'reference', 'bevformer_occ_keys.json'
)
ENC = EncoderConfig(
  bev_h=8,
  bev_w=10,
  embed_dims=64,
  num_layers=2,
  ffn_dims=128,
  image_size=(64, 96),
  spatial_shapes=((8, 12), (4, 6)),
  dropout=0.0,
)
OCC = OccupancyHeadConfig(bev_h=8, bev_w=10, pillar_h=8, out_dim=16)
CFG = HeadConfig(encoder=ENC, occupancy=OCC)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  feats = [rng.normal(size=(1, 6, h, w, 64)).astype(np.float32) for h, w in ENC.spatial_shapes]
  lidar2img, ego2lidar = _rig(1)
  can = np.zeros((1, 18))
  can[0, :2] = [0.7, -0.4]
  can[0, 3:16] = rng.normal(size=13)
  can[0, 16], can[0, 17] = 1.1, 23.0
  prev = rng.normal(size=(1, 80, 64)).astype(np.float32)
  return feats, lidar2img, ego2lidar, can, prev


def _both(module, *args):
  bev, aux = module.bev(*args)
  return bev, module.occupancy(bev), aux


def test_head_and_occupancy_match_the_twin():
  feats, lidar2img, ego2lidar, can, prev = _inputs()
  head = BEVHead(CFG)
  args = (
    [jnp.asarray(f) for f in feats],
    jnp.asarray(lidar2img),
    jnp.asarray(ego2lidar),
    jnp.asarray(can, jnp.float32),
    jnp.asarray(prev),
    jnp.asarray([True]),
  )
  variables = head.init(jax.random.key(0), *args, method=_both)
  leaves, tree = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.key(2), len(leaves))
  noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  variables = {**variables, 'params': jax.tree.unflatten(tree, noisy)}
  bev, logits, aux = head.apply(variables, *args, method=_both)
  assert bev.shape == (1, 80, 64) and logits.shape == (1, 10, 8, 8, 2)

  twin = BEVHeadTorch(ENC, OCC)
  sd = {k: torch.from_numpy(v) for k, v in key_map.to_torch_arrays(variables).items()}
  twin.load_state_dict(sd, strict=True)
  twin.eval()
  with torch.no_grad():
    tfeats = [torch.from_numpy(f).permute(0, 1, 4, 2, 3) for f in feats]
    want = twin.bev(
      tfeats, torch.from_numpy(lidar2img), torch.from_numpy(ego2lidar), can, torch.from_numpy(prev)
    )
    want_logits = twin.occupancy(want)
  np.testing.assert_allclose(bev, want.numpy(), atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(logits, want_logits.numpy(), atol=2e-4, rtol=2e-4)


def test_base_head_keys_and_shapes_equal_the_manifest():
  cfg = HeadConfig()  # the reference's sizes
  head = BEVHead(cfg)
  b, n = 1, 6
  shapes = cfg.encoder.spatial_shapes
  abstract = jax.eval_shape(
    lambda: head.init(
      jax.random.key(0),
      [jnp.zeros((b, n, h, w, 256)) for h, w in shapes],
      jnp.zeros((b, n, 4, 4)),
      jnp.zeros((b, 4, 4)),
      jnp.zeros((b, 18)),
      jnp.zeros((b, 40000, 256)),
      jnp.ones((b,), bool),
      method=_both,
    )
  )
  got = {f'pts_bbox_head.{k}': v for k, v in key_map.to_torch_shapes(abstract).items()}
  manifest = json.loads(pathlib.Path(MANIFEST).read_text())
  want = {
    k: (tuple(v['shape']), v['dtype'])
    for k, v in manifest.items()
    if k.startswith('pts_bbox_head.')
  }
  assert len(want) == 183 and got == want
