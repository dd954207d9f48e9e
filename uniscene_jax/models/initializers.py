"""Initialisers that reproduce the reference's (torch / mmcv) parameter initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

xavier = nn.initializers.xavier_uniform()
normal = nn.initializers.normal(stddev=1.0)  # torch Embedding / nn.init.normal_


def torch_default_bias(fan_in: int):
  """torch Linear's default bias init, U(-1 / sqrt(fan_in), 1 / sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init
