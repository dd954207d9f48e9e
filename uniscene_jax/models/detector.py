"""The fine-tuning detector (the reference's BEVFormer-base): cameras -> BEV -> 3-D boxes.

`UniSceneDet` is UniSceneOcc with the detection head: the same `img_backbone`, `img_neck` and BEV
encoder (so pre-training weights load by name), the same temporal queue (history frames through
backbone and encoder without gradients in one `nn.scan`), and a `pts_bbox_head` that decodes 900
object queries from the current frame's BEV (models/detection_head.py). The BEV is in the lidar
frame and only the previous slot's reference is shifted (EncoderConfig.bev_frame='lidar',
inplace_shift=False), as in BEVFormer.
"""

import dataclasses

from uniscene_jax.models.bev_encoder import EncoderConfig
from uniscene_jax.models.detection_head import BEVFormerHead, DetectionHeadConfig
from uniscene_jax.models.heads import HeadConfig
from uniscene_jax.models.uniscene import ModelConfig, UniSceneOcc

_DET_HEAD = HeadConfig(
  encoder=EncoderConfig(bev_frame='lidar', inplace_shift=False), occupancy=None
)


@dataclasses.dataclass(frozen=True)
class DetectorConfig(ModelConfig):
  """ModelConfig of the detector; the defaults are BEVFormer-base (69,034,947 parameters)."""

  head: HeadConfig = _DET_HEAD
  detection: DetectionHeadConfig = DetectionHeadConfig()


class UniSceneDet(UniSceneOcc):
  config: DetectorConfig

  def make_head(self, dtype):
    cfg = self.config
    if cfg.head.occupancy is not None:
      raise ValueError('DetectorConfig.head.occupancy must be None (the detector has no occ head)')
    return BEVFormerHead(cfg.head, dtype=dtype, det=cfg.detection)

  def detect(self, bev, train: bool = False) -> dict:
    return self.pts_bbox_head.detect(bev, train)

  def __call__(self, img, lidar2img, ego2lidar, can_bus, prev_bev_exists, train=False):
    """A batch of queues -> (outputs, aux).

    Args:
      img: [B, T, N, H, W, 3] normalised (augmented) images, frames in time order.
      lidar2img: [B, T, N, 4, 4] lidar -> padded-image pixels; ego2lidar: [B, T, 4, 4] (unused in
        the lidar-frame BEV); can_bus: [B, T, 18] with the queue's deltas; prev_bev_exists: [B, T].
    Returns:
      outputs: 'cls' [L, B, Q, classes] logits and 'box' [L, B, Q, 10] codes (centres in metres,
        lidar frame) for every decoder layer L, float32.
      aux: 'bev_embed' [B, HW, C] of the current frame, 'sca_overflow' [B].
    """
    bev, aux = self.queue_bev(img, lidar2img, ego2lidar, can_bus, prev_bev_exists, train)
    return self.detect(bev, train), aux


def detector_config(config) -> DetectorConfig:
  """A DetectorConfig from an experiment config (config.model.arch == 'det').

  Backbone, neck, encoder and dtype are read as for the pre-training model (the same fields; set
  `model.bev_frame='lidar'` and `model.inplace_shift=False` for BEVFormer's behaviour); the
  detection head takes embed dims, heads, FFN width, dropout and pc_range from `config.model` and
  any DetectionHeadConfig field from the optional sub-dict `config.model.detection`
  (num_query, num_classes, num_layers, code_weights, ...).
  """
  from uniscene_jax.models.config import model_config

  base = model_config(config)
  m = config.model
  fields = {f.name for f in dataclasses.fields(DetectionHeadConfig)}
  overrides = dict(m.get('detection', None) or {})
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'config.model.detection: unknown fields {unknown}; known: {sorted(fields)}')
  detection = DetectionHeadConfig(
    num_heads=m.num_heads,
    ffn_dims=m.ffn_dims,
    dropout=m.dropout,
    pc_range=tuple(m.pc_range),
  )
  overrides = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in overrides.items()}
  detection = dataclasses.replace(detection, **overrides)
  head = dataclasses.replace(base.head, occupancy=None)
  return DetectorConfig(
    backbone=base.backbone, neck=base.neck, head=head, dtype=base.dtype, detection=detection
  )
