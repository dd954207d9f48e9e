"""From an ml_collections `config` (configs/*.py) to the typed configs of the modules."""

import math

from uniscene_jax.models.backbone import RESNET_STAGE_BLOCKS, ResNetConfig
from uniscene_jax.models.bev_encoder import EncoderConfig
from uniscene_jax.models.fpn import FPNConfig
from uniscene_jax.models.heads import HeadConfig
from uniscene_jax.models.occupancy_head import OccupancyHeadConfig
from uniscene_jax.models.uniscene import ModelConfig


def padded_size(image_size, divisor: int = 32) -> tuple[int, int]:
  return tuple(int(math.ceil(s / divisor) * divisor) for s in image_size)


def feature_shapes(padded_hw, num_levels: int = 4) -> tuple[tuple[int, int], ...]:
  """FPN level sizes of a padded image: strides 8, 16, 32, 64 with ceil at every stride-2 step."""
  h, w = padded_hw
  for _ in range(3):  # stem conv, max-pool, layer2
    h, w = -(-h // 2), -(-w // 2)
  shapes = []
  for _ in range(num_levels):
    shapes.append((h, w))
    h, w = -(-h // 2), -(-w // 2)
  return tuple(shapes)


def model_config(config) -> ModelConfig:
  """config: the whole experiment config (reads config.model and config.data.image_size)."""
  m = config.model
  padded = padded_size(config.data.image_size)
  blocks = tuple(m.backbone_blocks) or RESNET_STAGE_BLOCKS[m.backbone_depth]
  backbone = ResNetConfig(
    stage_blocks=blocks,
    base_width=m.backbone_base_width,
    stage_with_dcn=tuple(m.dcn_stages),
    frozen_stages=m.frozen_stages,
    remat=m.remat_backbone,
  )
  neck = FPNConfig(
    out_channels=m.embed_dims,
    num_outs=4,
    relu_before_first_extra_conv=m.fpn_relu_before_first_extra_conv,
  )
  encoder = EncoderConfig(
    bev_h=m.bev_h,
    bev_w=m.bev_w,
    embed_dims=m.embed_dims,
    num_layers=m.num_layers,
    num_heads=m.num_heads,
    ffn_dims=m.ffn_dims,
    num_points_in_pillar=m.num_points_in_pillar,
    dropout=m.dropout,
    pc_range=tuple(m.pc_range),
    image_size=padded,
    spatial_shapes=feature_shapes(padded),
    bev_frame=m.bev_frame,
    inplace_shift=m.inplace_shift,
    rotate_prev_bev=m.rotate_prev_bev,
    sca_capacity=m.sca_capacity,
    remat=m.remat_encoder,
  )
  occupancy = OccupancyHeadConfig(
    bev_h=m.bev_h,
    bev_w=m.bev_w,
    pillar_h=m.pillar_h,
    out_dim=m.occ_out_dim,
    num_classes=m.num_classes,
    bn_group_size=m.bn_group_size,
  )
  head = HeadConfig(encoder=encoder, occupancy=occupancy, num_cams=m.num_cams)
  return ModelConfig(backbone=backbone, neck=neck, head=head, dtype=m.dtype)
