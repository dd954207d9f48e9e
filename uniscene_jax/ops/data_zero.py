"""A zero that XLA cannot treat as a constant.

XLA allocates buffers initialised from constants (zeros for loop carries and scatter targets) at
the start of a program and keeps them alive until their use; a zero computed from data only
exists once that data does. It also makes a recomputation differ from the forward computation it
repeats, so that common-subexpression elimination cannot merge them (models.remat).
"""

import jax
import jax.numpy as jnp


def data_zero(*trees):
  """A float32 zero computed from every non-empty inexact array leaf of `trees` (None if there
  is none), so that it exists only once all of them do. (x * 0 is not folded: it is NaN for
  non-finite x.)"""
  leaves = [x for x in jax.tree.leaves(trees) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  zeros = [x.reshape(-1)[0].astype(jnp.float32) * 0 for x in leaves if x.size]
  return sum(zeros[1:], zeros[0]) if zeros else None
