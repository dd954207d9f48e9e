"""Occupancy head: the BEV feature map split into height pillars, two 3-D convolutions, a predictor.

The BEV channel c is read as c = 16 a + z (a: 3-D conv input channel, z: height index), exactly the
reference's view of [B, 256, H, W] as [B, 16, 16, H, W]. Logits come out as [B, X, Y, Z, classes]
with X the BEV column (w) and Y the BEV row (h), lined up with the label grid's [x, y, z] axes.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniscene_jax.models.initializers import torch_default_bias, xavier
from uniscene_jax.ops import conv as conv_ops


class GroupBatchNorm(nn.Module):
  """BatchNorm over channel-last inputs whose statistics are taken per group of samples.

  `group_size` samples share statistics in training (1: per sample, as the reference's one sample
  per GPU; 0: the whole batch, as SyncBN). Running statistics move by `momentum` towards the mean
  over groups of the group statistics (variance unbiased, as torch). Parameters mirror torch's
  BatchNorm: `scale`, `bias` in params; `mean`, `var` in batch_stats.
  """

  group_size: int = 1
  momentum: float = 0.1  # torch convention: weight of the new statistics
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    if train:
      b = x.shape[0]
      g = b if self.group_size <= 0 else self.group_size
      if b % g:
        raise ValueError(f'GroupBatchNorm: batch {b} is not a multiple of group_size {g}')
      grouped = xf.reshape(b // g, -1, c)
      mean = grouped.mean(1)  # [groups, C]
      var = jnp.mean(jnp.square(grouped - mean[:, None]), 1)
      n = grouped.shape[1]
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean.mean(0)
        ra_var.value = (1 - m) * ra_var.value + m * (var * n / max(n - 1, 1)).mean(0)
      shape = (b // g, g) + x.shape[1:-1] + (c,)
      bshape = (b // g, 1) + (1,) * (x.ndim - 2) + (c,)
      y = (xf.reshape(shape) - mean.reshape(bshape)) * jax.lax.rsqrt(
        var.reshape(bshape) + self.epsilon
      )
      y = y.reshape(x.shape)
    else:
      y = (xf - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    return (y * scale + bias).astype(self.dtype)


class ConvBnRelu3d(nn.Module):
  """mmcv ConvModule: Conv3d 3x3x3 without bias, BatchNorm3d, ReLU (names `conv`, `bn`)."""

  features: int
  bn_group_size: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = nn.Conv(
      self.features,
      (3, 3, 3),
      padding=1,
      use_bias=False,
      kernel_init=xavier,  # the reference's transformer init_weights
      dtype=self.dtype,
      param_dtype=jnp.float32,
      conv_general_dilated=conv_ops.conv_general_dilated,  # forward as 2-D: 2-10x faster
      name='conv',
    )(x)
    x = GroupBatchNorm(group_size=self.bn_group_size, dtype=self.dtype, name='bn')(x, train)
    return nn.relu(x)


@dataclasses.dataclass(frozen=True)
class OccupancyHeadConfig:
  bev_h: int = 200
  bev_w: int = 200
  pillar_h: int = 16  # height cells: the BEV channels split as (embed_dims / pillar_h, pillar_h)
  out_dim: int = 32
  num_classes: int = 2
  bn_group_size: int = 1


def occupancy_logits(bev, decoder, predicter, config: OccupancyHeadConfig, train: bool, dtype):
  """bev [B, H * W, C] -> float32 logits [B, X = W, Y = H, Z, classes] with the given layers.

  decoder: the two ConvBnRelu3d; predicter: the two Dense layers (Softplus between them).
  """
  b, hw, c = bev.shape
  if hw != config.bev_h * config.bev_w or c % config.pillar_h:
    raise ValueError(
      f'occupancy head: bev {bev.shape} does not fit bev_h x bev_w = '
      f'{config.bev_h} x {config.bev_w} with channels divisible by pillar_h = {config.pillar_h}'
    )
  x = bev.astype(dtype).reshape(
    b, config.bev_h, config.bev_w, c // config.pillar_h, config.pillar_h
  )
  x = x.transpose(0, 4, 1, 2, 3)  # [B, Z, H, W, a]: conv kernel axes (z, y, x)
  for conv in decoder:
    x = conv(x, train)
  x = x.transpose(0, 3, 2, 1, 4)  # [B, X, Y, Z, out_dim]
  x = predicter[1](nn.softplus(predicter[0](x)))
  return x.astype(jnp.float32)


def occupancy_layers(config: OccupancyHeadConfig, dtype) -> dict:
  """The head's layers by attribute name: the reference's `decoder.{0,1}`, `predicter.{0,2}`."""
  dense = dict(dtype=dtype, param_dtype=jnp.float32, kernel_init=xavier)
  hidden = config.out_dim * 2
  return {
    'decoder_0': ConvBnRelu3d(config.out_dim, config.bn_group_size, dtype),
    'decoder_1': ConvBnRelu3d(config.out_dim, config.bn_group_size, dtype),
    'predicter_0': nn.Dense(hidden, bias_init=torch_default_bias(config.out_dim), **dense),
    'predicter_2': nn.Dense(config.num_classes, bias_init=torch_default_bias(hidden), **dense),
  }


class OccupancyHead(nn.Module):
  """bev [B, H * W, C] -> logits [B, X = W, Y = H, Z = pillar_h, num_classes] (float32).

  Standalone form of the head; the pre-training model creates the same layers inside its
  `transformer` module, which gives the PyTorch paths `transformer.decoder.0...`.
  """

  config: OccupancyHeadConfig = OccupancyHeadConfig()
  dtype: Any = jnp.float32

  def setup(self):
    for name, layer in occupancy_layers(self.config, self.dtype).items():
      setattr(self, name, layer)

  def __call__(self, bev: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    decoder = (self.decoder_0, self.decoder_1)
    predicter = (self.predicter_0, self.predicter_2)
    return occupancy_logits(bev, decoder, predicter, self.config, train, self.dtype)
