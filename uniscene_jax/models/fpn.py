"""Feature pyramid neck (mmdet 2.x `FPN`, model spec 5), channel-last.

Names mirror the PyTorch attributes: `lateral_convs_{i}/conv` and `fpn_convs_{i}/conv` (mmcv
ConvModules without norm or activation, all with bias).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import linen as nn
from jax import numpy as jnp

from uniscene_jax.ops import conv as conv_ops

EXTRA_CONV_SOURCES = ('on_input', 'on_lateral', 'on_output')


class ConvModule(nn.Module):
  """mmcv ConvModule with no norm and no activation: a conv named `conv`."""

  features: int
  kernel_size: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    pad = self.kernel_size // 2
    return nn.Conv(
      self.features,
      (self.kernel_size, self.kernel_size),
      strides=self.stride,
      padding=((pad, pad), (pad, pad)),
      kernel_init=nn.initializers.xavier_uniform(),
      dtype=self.dtype,
      conv_general_dilated=conv_ops.conv_general_dilated,  # 1 x 1 as dots, faster backward
      name='conv',
    )(x)


def resize_nearest(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """torch `F.interpolate(mode='nearest', size=size)` for x [B, H, W, C]: source index
  floor(dst * (in / out)) computed in float32 as torch does, clamped to the last pixel."""
  idx = []
  for n_in, n_out in zip(x.shape[1:3], size, strict=True):
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32)
    idx.append(np.minimum(src, n_in - 1))
  return x[:, idx[0]][:, :, idx[1]]


@dataclasses.dataclass(frozen=True)
class FPNConfig:
  """FPN configuration (start_level 0, no norm, no activation).

  Attributes:
    out_channels: width of every output level.
    num_outs: number of outputs; levels beyond the inputs come from stride-2 extra convs.
    add_extra_convs: source of the first extra conv: 'on_input' (last input), 'on_lateral',
      'on_output' (the last FPN output, P5) or '' (max-pool instead of convs).
    relu_before_extra_convs: ReLU before the second and later extra convs (mmdet 2.x).
    relu_before_first_extra_conv: also before the first one. False reproduces the reference,
      whose P6 = fpn_convs[3](P5) has no ReLU (quirk 1 of the model spec).
  """

  out_channels: int = 256
  num_outs: int = 4
  add_extra_convs: str = 'on_output'
  relu_before_extra_convs: bool = True
  relu_before_first_extra_conv: bool = False


class FPN(nn.Module):
  """FPN on backbone outputs [C3, C4, C5].

  Attributes:
    config: FPNConfig (the default is the reference's neck).
    dtype: compute dtype.
  """

  config: FPNConfig = FPNConfig()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[jnp.ndarray]) -> tuple[jnp.ndarray, ...]:
    """feats: [B, H_i, W_i, C_i] per input level -> num_outs maps [B, h_l, w_l, out_channels]."""
    cfg = self.config
    if cfg.add_extra_convs and cfg.add_extra_convs not in EXTRA_CONV_SOURCES:
      raise ValueError(
        f'FPNConfig.add_extra_convs {cfg.add_extra_convs!r} not in {EXTRA_CONV_SOURCES}'
      )
    n_in = len(feats)
    if cfg.num_outs < n_in:
      raise ValueError(f'FPNConfig.num_outs {cfg.num_outs} < number of inputs {n_in}')
    module = lambda k, s, name: ConvModule(cfg.out_channels, k, s, self.dtype, name=name)
    laterals = [
      module(1, 1, f'lateral_convs_{i}')(f.astype(self.dtype)) for i, f in enumerate(feats)
    ]
    for i in range(n_in - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + resize_nearest(laterals[i], laterals[i - 1].shape[1:3])
    outs = [module(3, 1, f'fpn_convs_{i}')(lat) for i, lat in enumerate(laterals)]
    for i in range(n_in, cfg.num_outs):
      if not cfg.add_extra_convs:
        outs.append(outs[-1][:, ::2, ::2])  # max_pool2d(kernel 1, stride 2)
        continue
      if i == n_in:
        source = {'on_input': feats[-1], 'on_lateral': laterals[-1], 'on_output': outs[-1]}[
          cfg.add_extra_convs
        ].astype(self.dtype)
        relu = cfg.relu_before_first_extra_conv
      else:
        source, relu = outs[-1], cfg.relu_before_extra_convs
      outs.append(module(3, 2, f'fpn_convs_{i}')(nn.relu(source) if relu else source))
    return tuple(outs)
