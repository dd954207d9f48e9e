"""The pre-training model (the reference's BEVFormerOcc): cameras -> BEV -> occupancy logits.

`UniSceneOcc` holds `img_backbone` (ResNet-101-DCN), `img_neck` (FPN) and `pts_bbox_head` (BEV
queries, encoder, occupancy layers). A training sample is a queue of T frames: the first T - 1 run
through backbone and encoder without gradients and in inference mode, each passing its BEV to the
next (reset where prev_bev_exists is False), inside one `nn.scan`; the last frame runs with
gradients and gives the occupancy logits.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniscene_jax.models import backbone as backbone_lib
from uniscene_jax.models import fpn as fpn_lib
from uniscene_jax.models.heads import BEVHead, HeadConfig
from uniscene_jax.ops.data_zero import data_zero

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  backbone: backbone_lib.ResNetConfig = backbone_lib.ResNetConfig()
  neck: fpn_lib.FPNConfig = fpn_lib.FPNConfig()
  head: HeadConfig = HeadConfig()
  dtype: str = 'float32'  # compute dtype; parameters stay float32


class UniSceneOcc(nn.Module):
  config: ModelConfig

  def setup(self):
    cfg = self.config
    if cfg.dtype not in DTYPES:
      raise ValueError(f'model dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}')
    dtype = DTYPES[cfg.dtype]
    self.img_backbone = backbone_lib.ResNet(cfg.backbone, dtype=dtype)
    self.img_neck = fpn_lib.FPN(cfg.neck, dtype=dtype)
    self.pts_bbox_head = self.make_head(dtype)

  def make_head(self, dtype):
    """The `pts_bbox_head` submodule (the detector returns its own)."""
    return BEVHead(self.config.head, dtype=dtype)

  def features(self, img: jnp.ndarray) -> list[jnp.ndarray]:
    """img [B, N, H, W, 3] normalised BGR -> per FPN level [B, N, h, w, C]."""
    b, n = img.shape[:2]
    feats = self.img_neck(self.img_backbone(img.reshape(b * n, *img.shape[2:])))
    return [f.reshape(b, n, *f.shape[1:]) for f in feats]

  def frame(self, img, lidar2img, ego2lidar, can_bus, prev_bev, prev_exists, train=False):
    """One frame -> (bev [B, HW, C], aux)."""
    return self.pts_bbox_head.bev(
      self.features(img), lidar2img, ego2lidar, can_bus, prev_bev, prev_exists, train
    )

  def occupancy(self, bev, train=False):
    return self.pts_bbox_head.occupancy(bev, train)

  def __call__(self, img, lidar2img, ego2lidar, can_bus, prev_bev_exists, train=False):
    """A batch of queues -> (logits [B, X, Y, Z, classes] float32, aux).

    Args:
      img: [B, T, N, H, W, 3] normalised (augmented) images, frames in time order.
      lidar2img: [B, T, N, 4, 4]; ego2lidar: [B, T, 4, 4]; can_bus: [B, T, 18] with the queue's
        deltas; prev_bev_exists: [B, T] bool.
    aux: 'bev_embed' [B, HW, C] of the current frame, 'sca_overflow' [B].
    """
    bev, aux = self.queue_bev(img, lidar2img, ego2lidar, can_bus, prev_bev_exists, train)
    return self.occupancy(bev, train), aux

  def queue_bev(self, img, lidar2img, ego2lidar, can_bus, prev_bev_exists, train=False):
    """The queue's last frame -> (bev [B, HW, C], aux {'bev_embed', 'sca_overflow'}), with the
    BEV its history passes on (arguments as __call__)."""
    prev = self.history(img, lidar2img, ego2lidar, can_bus, prev_bev_exists)
    # The last frame's image starts once the history's BEV exists (a zero from it), so that its
    # backbone activations are not made early and held through the history's loop.
    last = img[:, -1]
    if img.shape[1] > 1:
      last = last + data_zero(prev).astype(last.dtype)
    bev, aux = self.frame(
      last,
      lidar2img[:, -1],
      ego2lidar[:, -1],
      can_bus[:, -1],
      prev,
      prev_bev_exists[:, -1],
      train,
    )
    return bev, {'bev_embed': bev, 'sca_overflow': aux['sca_overflow']}

  def history(self, img, lidar2img, ego2lidar, can_bus, prev_bev_exists):
    """The BEV [B, HW, C] float32 that the queue's first T - 1 frames pass to the last one (zeros
    for T = 1): each history frame in inference mode, without gradient (arguments as __call__)."""
    enc = self.config.head.encoder
    b, t = img.shape[:2]
    prev = jnp.zeros((b, enc.bev_h * enc.bev_w, enc.embed_dims), jnp.float32)
    if t > 1:
      # Frame i is sliced out of the queue axis in the loop: scanning over swapped axes would
      # copy all history images first (320 MB at base sizes).
      def history(module, prev, i, queue):
        frame = [jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False) for x in queue]
        bev, _ = module.frame(*frame[:4], prev, frame[4], False)
        return jax.lax.stop_gradient(bev).astype(jnp.float32), None

      scan = nn.scan(
        history,
        variable_broadcast=('params', 'batch_stats'),
        split_rngs={'params': False, 'dropout': False},
        in_axes=(0, nn.broadcast),
      )
      queue = (img, lidar2img, ego2lidar, can_bus, prev_bev_exists)
      prev, _ = scan(self, prev, jnp.arange(t - 1), queue)
    return prev
