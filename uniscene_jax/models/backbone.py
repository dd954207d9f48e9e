"""ResNet backbone, caffe style, with DCNv2 in chosen stages (mmdet `ResNet`, model spec 4).

Channel-last (NHWC), kernels HWIO, parameters float32, computation in `dtype`. Module names mirror
the PyTorch attribute paths with '.' -> '_' for indices (`layer3_0/conv2/conv_offset`,
`layer1_0/downsample_0`), so the checkpoint converter is a flat table. Every BatchNorm is frozen:
it always uses its running statistics (`batch_stats/mean`, `batch_stats/var`, never updated) and
keeps its affine `scale` / `bias` in `params`, where an optimiser mask can exclude them.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from uniscene_jax.models.remat import checkpointed_call, sequential_call
from uniscene_jax.ops import conv as conv_ops
from uniscene_jax.ops.deform_conv import modulated_deform_conv2d

# torch's kaiming_normal_(mode='fan_out', nonlinearity='relu'), mmdet's ResNet conv init.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

RESNET_STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class FrozenBatchNorm(nn.Module):
  """BatchNorm with running statistics only (eval mode, eps 1e-5).

  Attributes:
    scale_init: initialiser of the affine scale (zero for a zero-init residual branch).
    dtype: compute dtype; the affine fold is done in float32.
  """

  epsilon: float = 1e-5
  scale_init: Any = nn.initializers.ones
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    scale = self.param('scale', self.scale_init, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32).value
    var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32).value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return x * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype)


class ModulatedDeformConv(nn.Module):
  """mmcv `ModulatedDeformConv2dPack` (deform_groups 1, no bias): its own `kernel` plus
  `conv_offset`, a plain conv giving 18 offsets (2k = dy, 2k + 1 = dx) and 9 mask logits."""

  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k = self.kernel_size
    kernel = self.param('kernel', kaiming_fan_out, (k, k, x.shape[-1], self.features), jnp.float32)
    pad = ((self.padding, self.padding),) * 2
    offset_mask = nn.Conv(
      3 * k * k,
      (k, k),
      strides=self.stride,
      padding=pad,
      kernel_dilation=self.dilation,
      kernel_init=nn.initializers.zeros,
      dtype=self.dtype,
      conv_general_dilated=conv_ops.conv_general_dilated,
      name='conv_offset',
    )(x)
    offset = offset_mask[..., : 2 * k * k]
    mask = jax.nn.sigmoid(offset_mask[..., 2 * k * k :].astype(jnp.float32)).astype(self.dtype)
    return modulated_deform_conv2d(
      x, offset, mask, kernel.astype(self.dtype), self.stride, self.padding, self.dilation
    )


class Bottleneck(nn.Module):
  """Caffe-style bottleneck: the stride sits on conv1 (1x1); conv2 is 3x3 (deformable if `dcn`).

  Attributes:
    planes: width of conv1 / conv2; the block outputs 4 * planes.
    stride: of conv1 and of the downsample branch.
    downsample: whether the block has the 1x1 projection shortcut (first block of a stage).
  """

  planes: int
  stride: int = 1
  downsample: bool = False
  dcn: bool = False
  zero_init_residual: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      kernel_init=kaiming_fan_out,
      dtype=self.dtype,
      conv_general_dilated=conv_ops.conv_general_dilated,  # a fast backward inside the remat loop
    )
    bn = functools.partial(FrozenBatchNorm, dtype=self.dtype)
    out = conv(self.planes, (1, 1), strides=self.stride, padding='VALID', name='conv1')(x)
    out = nn.relu(bn(name='bn1')(out))
    if self.dcn:
      out = ModulatedDeformConv(self.planes, dtype=self.dtype, name='conv2')(out)
    else:
      out = conv(self.planes, (3, 3), padding=((1, 1), (1, 1)), name='conv2')(out)
    out = nn.relu(bn(name='bn2')(out))
    out = conv(4 * self.planes, (1, 1), padding='VALID', name='conv3')(out)
    zero = self.zero_init_residual
    out = bn(scale_init=nn.initializers.zeros if zero else nn.initializers.ones, name='bn3')(out)
    identity = x
    if self.downsample:
      identity = conv(
        4 * self.planes, (1, 1), strides=self.stride, padding='VALID', name='downsample_0'
      )(x)
      identity = bn(name='downsample_1')(identity)
    return nn.relu(out + identity)


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """ResNet configuration (mmdet names in brackets).

  Attributes:
    stage_blocks: blocks per stage (from `depth`); (3, 4, 23, 3) is ResNet-101.
    base_width: planes of stage 1, doubling per stage; a stage outputs 4 x planes.
    stem_width: channels of the stem conv; None = base_width (64 in every real ResNet).
    stage_strides: stride of each stage's first block [strides].
    stage_with_dcn: which stages use DCNv2 for conv2, in all their blocks [stage_with_dcn].
    frozen_stages: the stem and stages 1..frozen_stages get no gradient; -1 = none frozen.
    out_indices: 0-based stages whose outputs are returned; (1, 2, 3) = C3, C4, C5.
    zero_init_residual: bn3 scale starts at 0 (mmdet's default; irrelevant once weights load).
    remat: recompute each trainable block in the backward pass (saves activation memory).
  """

  stage_blocks: tuple[int, ...] = RESNET_STAGE_BLOCKS[101]
  base_width: int = 64
  stem_width: int | None = None
  stage_strides: tuple[int, ...] = (1, 2, 2, 2)
  stage_with_dcn: tuple[bool, ...] = (False, False, True, True)
  frozen_stages: int = 1
  out_indices: tuple[int, ...] = (1, 2, 3)
  zero_init_residual: bool = True
  remat: bool = False

  @classmethod
  def from_depth(cls, depth: int, **kwargs) -> 'ResNetConfig':
    if depth not in RESNET_STAGE_BLOCKS:
      raise ValueError(f'ResNet depth {depth} not in {sorted(RESNET_STAGE_BLOCKS)}')
    return cls(stage_blocks=RESNET_STAGE_BLOCKS[depth], **kwargs)

  @property
  def out_channels(self) -> tuple[int, ...]:
    """Channels of the returned stage outputs."""
    return tuple(4 * self.base_width * 2**s for s in self.out_indices)


class ResNet(nn.Module):
  """mmdet ResNet with caffe-style bottlenecks, frozen BN, optional DCNv2 per stage.

  Attributes:
    config: the architecture (ResNetConfig; the default is the reference's R101-DCN).
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
  """

  config: ResNetConfig = ResNetConfig()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, img: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
    """img [N, H, W, 3] (normalised BGR) -> stage outputs [N, H / s, W / s, 4 * planes] for
    each of out_indices (s = 8, 16, 32 for C3, C4, C5)."""
    cfg = self.config
    n_stages = len(cfg.stage_blocks)
    if len(cfg.stage_with_dcn) != n_stages or len(cfg.stage_strides) != n_stages:
      raise ValueError(
        f'ResNetConfig: stage_with_dcn {cfg.stage_with_dcn} and stage_strides '
        f'{cfg.stage_strides} need one entry per stage of {cfg.stage_blocks}'
      )
    x = img.astype(self.dtype)
    x = nn.Conv(
      cfg.stem_width or cfg.base_width,
      (7, 7),
      strides=2,
      padding=((3, 3), (3, 3)),
      use_bias=False,
      kernel_init=kaiming_fan_out,
      dtype=self.dtype,
      name='conv1',
    )(x)
    x = nn.relu(FrozenBatchNorm(dtype=self.dtype, name='bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    if cfg.frozen_stages >= 0:
      x = jax.lax.stop_gradient(x)
    outs = []
    for s, blocks in enumerate(cfg.stage_blocks):
      planes = cfg.base_width * 2**s
      stage = [
        Bottleneck(
          planes,
          stride=cfg.stage_strides[s] if i == 0 else 1,
          downsample=i == 0,
          dcn=cfg.stage_with_dcn[s],
          zero_init_residual=cfg.zero_init_residual,
          dtype=self.dtype,
          name=f'layer{s + 1}_{i}',
        )
        for i in range(blocks)
      ]
      # Frozen stages run no backward, so there is nothing to recompute there. With remat the
      # blocks after the first run as one loop (compiled once, one block's backward live at
      # a time: base float32 peak 10.4 GB instead of 30 GB unrolled); their convolutions'
      # backward is written out (ops.conv), since autodiff's runs 30x slower in a loop on
      # XLA:CPU.
      recompute = cfg.remat and s >= cfg.frozen_stages
      x = checkpointed_call(self, stage[0], x) if recompute else stage[0](x)
      if recompute and blocks > 1:
        x = sequential_call(self, stage[1:], x, remat=True)
      else:
        for block in stage[1:]:
          x = block(x)
      if s + 1 <= cfg.frozen_stages:
        # Frozen stages need no gradient at all, so backpropagation stops here (as in torch,
        # where their parameters have requires_grad=False and the image needs no gradient).
        x = jax.lax.stop_gradient(x)
      if s in cfg.out_indices:
        outs.append(x)
    return tuple(outs)
