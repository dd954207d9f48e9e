"""Rematerialisation that also holds on XLA:CPU.

`jax.checkpoint` marks the values to recompute with optimisation barriers. XLA:CPU removes those
barriers early in its pipeline, after which common-subexpression elimination merges the
recomputation with the forward pass: the program keeps every activation as if there were no
remat (measured: identical buffer sizes with and without it). Here the recomputation runs in a
custom VJP on inputs that carry a zero computed from the output cotangent, so it is a different
computation that cannot start before the backward reaches it, on every backend.

Values that depend on no input (constants, random bits drawn from a key) would still be computed
once, early, and kept until the backward. So integer arguments get the same kind of zero (their
recomputation then differs too), and `checkpointed_call` folds its random keys with an integer
zero derived from the inputs: the dropout masks are drawn when the layer runs, in the forward
and again in the backward, and live only there.

`recompute(fn)` does this for a pure function; `checkpointed_call` for a Flax submodule: during
`init` the submodule is called as usual, during `apply` its variables are read from the parent
and it runs as a pure function under `recompute`, with the same parameter paths either way.
"""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from uniscene_jax.ops.data_zero import data_zero


def _inexact(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _int_zero(zero):
  """An int32 zero that XLA cannot fold to a constant (x * 0 is not 1 for any float x)."""
  return (zero == 1).astype(jnp.int32)


def _salt(*trees):
  """An int32 zero computed from the inputs (a constant when they hold no float array)."""
  zero = data_zero(*trees)
  return jnp.zeros((), jnp.int32) if zero is None else _int_zero(zero)


def _pure_apply(module: nn.Module, rng_names: tuple[str, ...], static_kwargs: dict):
  """(variables, keys, salt, *args) -> module.apply(variables, *args), each key folded with the
  salt: the same numbers wherever the salt is a zero, drawn only once it exists."""

  def apply(variables, keys, salt, *args):
    keys = [jax.random.fold_in(k, salt) for k in keys]
    rngs = dict(zip(rng_names, keys, strict=True))
    return module.apply(variables, *args, rngs=rngs, **static_kwargs)

  return apply


def recompute(fn: Callable) -> Callable:
  """fn(*args) -> outputs, with the same values and gradients, whose backward keeps only `args`
  and reruns `fn` from them. Arguments of integer, boolean or key type get no gradient, nor do
  arguments the caller does not differentiate (stop_gradient, constants): their cotangents are
  not computed."""

  @jax.custom_vjp
  def wrapped(*args):
    return fn(*args)

  def fwd(*args):
    primals = jax.tree.leaves(args, is_leaf=_is_primal)
    values = jax.tree.unflatten(
      jax.tree.structure(args, is_leaf=_is_primal), [p.value for p in primals]
    )
    # Which leaves need a gradient, kept in the residuals' structure (None: no, (): yes).
    wanted = tuple(() if p.perturbed and _inexact(p.value) else None for p in primals)
    return fn(*values), (_as_bits(values), wanted)

  def bwd(residuals, g):
    args, wanted = residuals
    args = _from_bits(args)
    g = jax.tree.map(_materialise, g, is_leaf=lambda x: isinstance(x, SymbolicZero))
    zero = data_zero(g)
    leaves, treedef = jax.tree.flatten(args)
    if zero is not None:
      ints = [i for i, x in enumerate(leaves) if jnp.issubdtype(jnp.result_type(x), jnp.integer)]
      for i in ints:
        leaves[i] = leaves[i] + _int_zero(zero).astype(leaves[i].dtype)
    diff = [i for i, w in enumerate(wanted) if w is not None]

    def partial_fn(*diff_leaves):
      full = list(leaves)
      for i, x in zip(diff, diff_leaves, strict=True):
        full[i] = x
      return fn(*jax.tree.unflatten(treedef, full))

    primals = [leaves[i] for i in diff]
    if zero is not None:
      primals = [x + zero.astype(x.dtype) for x in primals]
    _, vjp = jax.vjp(partial_fn, *primals)
    # All cotangents leave together, so that no gradient is deferred with this recomputation's
    # intermediates kept alive until then.
    grads = dict(zip(diff, jax.lax.optimization_barrier(vjp(g)), strict=True))
    return tuple(jax.tree.unflatten(treedef, [grads.get(i) for i in range(len(leaves))]))

  wrapped.defvjp(fwd, bwd, symbolic_zeros=True)
  return wrapped


def _as_bits(tree):
  """Half-precision leaves as same-width integers (kept in `_Bits`), others unchanged.

  Where a loop saves a bfloat16 residual per step, XLA:CPU moves the float32 conversion that
  the backward's first operation needs out of the loop, onto the whole stack of saved steps: a
  float32 copy of every step's input, twice the size of the stack itself (3.1 GB for ResNet-101's
  layer3 at base sizes). Saved as integers there is no conversion to move.
  """
  return jax.tree.map(lambda x: _Bits(x) if _half(x) else x, tree)


def _half(x) -> bool:
  return jnp.result_type(x) in _HALF


def _from_bits(tree):
  return jax.tree.map(lambda x: x.value if isinstance(x, _Bits) else x, tree, is_leaf=_is_bits)


_HALF = {jnp.dtype(jnp.bfloat16): jnp.uint16, jnp.dtype(jnp.float16): jnp.uint16}


@jax.tree_util.register_pytree_node_class
class _Bits:
  """A half-precision array stored as its bits; `value` restores it. The dtype rides in the
  tree's structure, so it is static."""

  def __init__(self, value, dtype=None):
    if dtype is None:  # wrapping a float array
      self.bits = jax.lax.bitcast_convert_type(value, _HALF[jnp.result_type(value)])
      self.dtype = jnp.result_type(value)
    else:  # rebuilt from its leaves
      self.bits, self.dtype = value, dtype

  @property
  def value(self):
    return jax.lax.bitcast_convert_type(self.bits, self.dtype)

  def tree_flatten(self):
    return (self.bits,), self.dtype

  @classmethod
  def tree_unflatten(cls, dtype, leaves):
    return cls(leaves[0], dtype)


def _is_bits(x) -> bool:
  return isinstance(x, _Bits)


def _is_primal(x) -> bool:
  return isinstance(x, CustomVJPPrimal)


def _materialise(x):
  """A symbolic zero cotangent as an array (float0 for integer outputs)."""
  if not isinstance(x, SymbolicZero):
    return x
  if x.dtype == jax.dtypes.float0:
    return np.zeros(x.shape, jax.dtypes.float0)
  return jnp.zeros(x.shape, x.dtype)


def checkpointed_call(
  parent: nn.Module,
  child: nn.Module,
  *args,
  rng_names: Sequence[str] = ('dropout',),
  **static_kwargs,
):
  """child(*args, **static_kwargs), recomputed in the backward pass.

  Call from the parent's compact `__call__` with a child built there (its `name` set). The
  child's variables must not be mutated by the call (frozen statistics are fine). Random streams
  in `rng_names` that the parent has are split off the parent and passed in, so the forward and
  its recomputation draw the same numbers (not the numbers a plain call would draw).
  """
  if parent.is_initializing():
    return child(*args, **static_kwargs)
  name = child.name
  variables = {col: tree[name] for col, tree in parent.variables.items() if name in tree}
  names = tuple(n for n in rng_names if parent.has_rng(n))
  keys = tuple(parent.make_rng(n) for n in names)
  apply = _pure_apply(child.clone(parent=None), names, static_kwargs)
  return recompute(apply)(variables, keys, _salt(args), *args)


def sequential_call(
  parent: nn.Module,
  children: Sequence[nn.Module],
  carry,
  *shared,
  remat: bool = False,
  rng_names: Sequence[str] = ('dropout',),
  **static_kwargs,
):
  """Applies identical children in turn, carry = child(carry, *shared, **static_kwargs), as one
  `lax.scan` over their stacked variables.

  The children must share a definition (same class and attributes, hence same variable shapes);
  each keeps its own variables at its own path, read from the parent and stacked per call. A
  child may return carry or (carry, aux); the aux of all children come back stacked on a leading
  axis. One loop body compiles once whatever the depth, and the gradients of the shared inputs
  are summed in the loop's carry, so each layer's contribution is added as soon as it exists.
  With `remat` each step is recomputed in the backward pass (`recompute`). Random streams as in
  `checkpointed_call`, one per child.
  """
  if parent.is_initializing() or len(children) == 1:
    outs = []
    for child in children:
      out = (
        checkpointed_call(parent, child, carry, *shared, rng_names=rng_names, **static_kwargs)
        if remat
        else child(carry, *shared, **static_kwargs)
      )
      carry, aux = out if isinstance(out, tuple) else (out, None)
      outs.append(aux)
    aux = None if outs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
  else:
    names = [child.name for child in children]
    variables = {
      col: jax.tree.map(lambda *a: jnp.stack(a), *[tree[n] for n in names])
      for col, tree in parent.variables.items()
      if names[0] in tree
    }
    rngs = tuple(n for n in rng_names if parent.has_rng(n))
    keys = tuple(jax.random.split(parent.make_rng(n), len(children)) for n in rngs)
    apply = _pure_apply(children[0].clone(parent=None), rngs, static_kwargs)

    def step(xs, carry, shared):
      out = apply(*xs, _salt(carry, shared), carry, *shared)
      return out if isinstance(out, tuple) else (out, None)

    if remat:
      carry, aux = recomputed_scan(step)((variables, keys), carry, shared)
    else:
      carry, aux = jax.lax.scan(lambda c, xs: step(xs, c, shared), carry, (variables, keys))
  return carry if aux is None else (carry, aux)


def recomputed_scan(step: Callable) -> Callable:
  """step(x, carry, shared) -> (carry, aux) into run(xs, carry, shared) -> (carry, stacked aux):
  a `lax.scan` over the leading axis of xs whose backward keeps only each step's input carry and
  reruns that step from it, last step first.

  `carry` is one array. The saved inputs go into one buffer made from the carry itself (zeros plus
  a zero computed from it), so that it is allocated when the loop starts: a scan's own stacked
  outputs start from constant zeros, which XLA:CPU allocates at program start and keeps through
  everything that runs before the loop (for the current frame's backbone: the history frames,
  2 GB of bfloat16 at base sizes). Half-precision inputs are saved as their bits (see
  `_as_bits`). Gradients of `shared` are summed in the backward loop's carry. Integer, boolean
  and key leaves get no gradient, nor do leaves the caller does not differentiate.
  """

  def forward(xs, carry, shared, save: bool):
    n = jax.tree.leaves(xs)[0].shape[0]
    half = _half(carry)
    kept = _HALF[jnp.result_type(carry)] if half else carry.dtype
    buf = None
    if save:  # a zero from the carry: the buffer cannot exist before the loop's input does
      buf = jnp.zeros((n, *carry.shape), kept) + _int_zero(data_zero(carry)).astype(kept)

    def body(state, x):
      c, buf, i = state
      if save:
        kept_c = jax.lax.bitcast_convert_type(c, kept) if half else c
        buf = jax.lax.dynamic_update_index_in_dim(buf, kept_c, i, 0)
      c, aux = step(x, c, shared)
      return (c, buf, i + 1), aux

    (carry, buf, _), aux = jax.lax.scan(body, (carry, buf, jnp.int32(0)), xs)
    return (carry, aux), buf

  @jax.custom_vjp
  def run(xs, carry, shared):
    return forward(xs, carry, shared, save=False)[0]

  def fwd(xs, carry, shared):
    args = (xs, carry, shared)
    primals = jax.tree.leaves(args, is_leaf=_is_primal)
    xs, carry, shared = jax.tree.unflatten(
      jax.tree.structure(args, is_leaf=_is_primal), [p.value for p in primals]
    )
    # Which leaves need a gradient, kept in the residuals' structure (None: no, (): yes).
    wanted = tuple(() if p.perturbed and _inexact(p.value) else None for p in primals)
    out, buf = forward(xs, carry, shared, save=True)
    if _half(carry):  # the carry's dtype rides in the residuals' structure
      buf = _Bits(buf, jnp.result_type(carry))
    return out, (xs, buf, shared, wanted)

  def bwd(residuals, g):
    xs, buf, shared, wanted = residuals
    half = buf.dtype if isinstance(buf, _Bits) else None
    buf = buf.bits if half is not None else buf
    g_carry, g_aux = jax.tree.map(_materialise, g, is_leaf=lambda x: isinstance(x, SymbolicZero))
    x_leaves, x_def = jax.tree.flatten(xs)
    sh_leaves, sh_def = jax.tree.flatten(shared)
    n_x = len(x_leaves)
    want_carry = wanted[n_x] is not None
    x_diff = [i for i, w in enumerate(wanted[:n_x]) if w is not None]
    sh_diff = [i for i, w in enumerate(wanted[n_x + 1 :]) if w is not None]
    # Integer aux (counts) have float0 cotangents, made per step instead of sliced.
    aux_leaves, aux_def = jax.tree.flatten(g_aux)
    aux_float = [i for i, a in enumerate(aux_leaves) if a.dtype != jax.dtypes.float0]

    def body(state, per_step):
      g_c, acc = state
      x_leaf, i, aux_f = per_step
      zero = data_zero(g_c)
      c = buf[i]
      c = jax.lax.bitcast_convert_type(c, half) if half is not None else c
      c = c + zero.astype(c.dtype)  # a recomputation that starts once g_c exists

      def partial_fn(c, x_d, sh_d):
        xl, sl = list(x_leaf), list(sh_leaves)
        for j, v in zip(x_diff, x_d, strict=True):
          xl[j] = v
        for j, v in zip(sh_diff, sh_d, strict=True):
          sl[j] = v
        return step(jax.tree.unflatten(x_def, xl), c, jax.tree.unflatten(sh_def, sl))

      _, vjp = jax.vjp(partial_fn, c, [x_leaf[j] for j in x_diff], [sh_leaves[j] for j in sh_diff])
      g_aux_i = list(aux_leaves)
      for j, a in zip(aux_float, aux_f, strict=True):
        g_aux_i[j] = a
      for j, a in enumerate(aux_leaves):
        if a.dtype == jax.dtypes.float0:
          g_aux_i[j] = np.zeros(a.shape[1:], jax.dtypes.float0)
      # All cotangents leave together (see `recompute`).
      g_out = (g_c, jax.tree.unflatten(aux_def, g_aux_i))
      g_c, g_x, g_sh = jax.lax.optimization_barrier(vjp(g_out))
      acc = [a + b for a, b in zip(acc, g_sh, strict=True)]
      return (g_c, acc), g_x

    n = buf.shape[0]
    zero = data_zero(g_carry)
    acc0 = [jnp.zeros_like(sh_leaves[j]) + zero.astype(sh_leaves[j].dtype) for j in sh_diff]
    (g_carry, acc), g_x = jax.lax.scan(
      body,
      (g_carry, acc0),
      (list(x_leaves), jnp.arange(n, dtype=jnp.int32), [aux_leaves[j] for j in aux_float]),
      reverse=True,
    )
    gx = dict(zip(x_diff, g_x, strict=True))
    gs = dict(zip(sh_diff, acc, strict=True))
    return (
      jax.tree.unflatten(x_def, [gx.get(j) for j in range(len(x_leaves))]),
      g_carry if want_carry else None,
      jax.tree.unflatten(sh_def, [gs.get(j) for j in range(len(sh_leaves))]),
    )

  run.defvjp(fwd, bwd, symbolic_zeros=True)
  return run
