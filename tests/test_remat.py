"""Recomputation in the backward pass: same gradients, less memory, also on XLA:CPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniscene_jax.models.remat import checkpointed_call, recompute, recomputed_scan


def _layer(w, x):
  h = jnp.tanh(x @ w)
  h = jnp.sin(h) * jnp.cos(h) + h
  return jnp.tanh(h @ w.T) + x


def _grad_fn(layer):
  def loss(ws, x):
    for w in ws:
      x = layer(w, x)
    return jnp.sum(x**2)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _temp_bytes(fn, *args) -> int:
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_recompute_equals_autodiff_and_keeps_only_inputs():
  rng = np.random.default_rng(0)
  ws = [jnp.asarray(rng.normal(0, 0.15, (64, 64)), jnp.float32) for _ in range(4)]
  x = jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)
  want = _grad_fn(_layer)(ws, x)
  got = _grad_fn(recompute(_layer))(ws, x)
  # Recomputation fuses the layer's transcendentals differently: float32 rounding, relative to
  # each gradient's largest entry.
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6 * float(jnp.abs(w).max()))

  # Eight layers on a [4096, 512] activation: autodiff keeps each layer's four intermediates;
  # recomputation keeps the layer inputs and one layer's intermediates at a time.
  big_ws = [jax.ShapeDtypeStruct((512, 512), jnp.float32)] * 8
  big_x = jax.ShapeDtypeStruct((4096, 512), jnp.float32)
  plain = _temp_bytes(_grad_fn(_layer), big_ws, big_x)
  remat = _temp_bytes(_grad_fn(recompute(_layer)), big_ws, big_x)
  assert remat < 0.5 * plain, (remat, plain)


def test_recompute_passes_integer_and_boolean_arguments():
  def fn(x, idx, keep):
    return jnp.where(keep, x[idx] * 2.0, 0.0)

  x = jnp.arange(5.0)
  idx = jnp.asarray([4, 0, 2], jnp.int32)
  keep = jnp.asarray([True, False, True])
  want = jax.grad(lambda x: fn(x, idx, keep).sum())(x)
  got = jax.jit(jax.grad(lambda x: recompute(fn)(x, idx, keep).sum()))(x)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got, [0, 0, 2, 0, 2])

  # An argument under stop_gradient gets no cotangent; the others are unaffected.
  def two(x, y):
    return recompute(lambda a, b, i: a[i] * b)(x, jax.lax.stop_gradient(y), idx).sum()

  gx, gy = jax.jit(jax.grad(two, argnums=(0, 1)))(x, x[:3])
  np.testing.assert_array_equal(gx, [1.0, 0.0, 2.0, 0.0, 0.0])  # x[i] * y: y = (0, 1, 2)
  np.testing.assert_array_equal(gy, np.zeros(3))


class _Inner(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(8)(x)


class _Outer(nn.Module):
  remat: bool

  @nn.compact
  def __call__(self, x, train: bool = False):
    inner = _Inner(name='inner')
    if self.remat:
      return checkpointed_call(self, inner, x, train=train)
    return inner(x, train)


def test_checkpointed_call_keeps_parameter_paths_and_dropout_masks():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8)), jnp.float32)
  plain, remat = _Outer(False), _Outer(True)
  variables = plain.init(jax.random.key(0), x)
  remat_variables = remat.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, remat_variables, variables)
  # Inference: the same function.
  np.testing.assert_allclose(remat.apply(variables, x), plain.apply(variables, x), rtol=1e-6)

  # Training with dropout: the backward must recompute with the forward's masks. The loss is
  # bilinear in the two kernels, so a central difference gives its directional derivative
  # exactly (up to rounding); a different mask in the backward would not match it.
  rngs = {'dropout': jax.random.key(3)}

  def loss(params):
    out = remat.apply({'params': params}, x, train=True, rngs=rngs)
    return jnp.sum(out * jnp.arange(8.0))

  params = variables['params']
  grads = jax.jit(jax.grad(loss))(params)
  direction = jax.tree.map(lambda p: jnp.ones_like(p) * 0.01, params)
  step = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)  # noqa: E731
  numeric = (loss(step(1.0)) - loss(step(-1.0))) / 2
  pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
  analytic = sum(jnp.vdot(g, d) for g, d in pairs)
  np.testing.assert_allclose(analytic, numeric, rtol=2e-3)
  # ... and dropout is active (half the hidden units vanish) and drawn from the given stream.
  out_a = remat.apply(variables, x, train=True, rngs=rngs)
  out_b = remat.apply(variables, x, train=True, rngs={'dropout': jax.random.key(4)})
  assert not np.allclose(out_a, out_b)
  np.testing.assert_array_equal(out_a, remat.apply(variables, x, train=True, rngs=rngs))


def test_loop_of_recomputed_bfloat16_steps_keeps_its_inputs_in_bfloat16():
  """A scan saves each step's bfloat16 input for the backward. Saved as floats, XLA:CPU would
  convert the whole stack of them to float32 ahead of the backward loop (three times the
  stack's size); they are saved as integer bits instead."""

  def loss(ws, x, layer):
    x, _ = jax.lax.scan(lambda x, w: (layer(w, x), None), x, ws)
    return jnp.sum(x.astype(jnp.float32) ** 2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  rng = np.random.default_rng(0)
  ws = jnp.asarray(rng.normal(0, 0.15, (3, 64, 64)), jnp.bfloat16)
  x = jnp.asarray(rng.normal(size=(32, 64)), jnp.bfloat16)
  for g, w in zip(grad(ws, x, recompute(_layer)), grad(ws, x, _layer), strict=True):
    assert g.dtype == jnp.bfloat16
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, atol=2e-2 * np.abs(w).max())

  steps = 24
  big_ws = jax.ShapeDtypeStruct((steps, 512, 512), jnp.bfloat16)
  big_x = jax.ShapeDtypeStruct((4096, 512), jnp.bfloat16)
  stack = steps * 4096 * 512 * 2  # the saved inputs, in bfloat16
  temp = _temp_bytes(grad, big_ws, big_x, recompute(_layer))
  assert temp < 2 * stack, (temp / stack, 'x the stack of saved inputs')


def _scan_step(x, c, shared):
  """A loop step with everything a layer loop passes: stacked weights and keys, a shared float
  input (differentiated) and a shared integer one, a float and an integer output per step."""
  (w, key), (feat, idx) = x, shared
  keep = jax.random.bernoulli(key, 0.8, c.shape)  # a dropout mask, drawn again when recomputed
  h = jnp.tanh(c @ w + feat[idx]) * keep.astype(c.dtype)
  c = h @ w.T + c
  return c, {'norm': jnp.sum(h.astype(jnp.float32) ** 2), 'count': jnp.sum(keep)}


def test_recomputed_scan_equals_the_plain_scan():
  rng = np.random.default_rng(1)
  steps = 5
  keys = jax.random.split(jax.random.key(3), steps)
  idx = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
  for dtype in (jnp.float32, jnp.bfloat16):
    ws = jnp.asarray(rng.normal(0, 0.2, (steps, 48, 48)), dtype)
    c0 = jnp.asarray(rng.normal(size=(16, 48)), dtype)
    feat = jnp.asarray(rng.normal(size=(10, 48)), dtype)

    def loss(ws, c0, feat, run):
      c, aux = run((ws, keys), c0, (feat, idx))
      total = jnp.sum(c.astype(jnp.float32) ** 2) + jnp.sum(aux['norm'] * jnp.arange(steps))
      return total, aux['count']

    def plain(xs, c, shared):
      return jax.lax.scan(lambda c, x: _scan_step(x, c, shared), c, xs)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (gw, gc, gf), counts = grad(ws, c0, feat, recomputed_scan(_scan_step))
    (pw, pc, pf), plain_counts = grad(ws, c0, feat, plain)
    np.testing.assert_array_equal(counts, plain_counts)  # the same dropout masks
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for got, want in ((gw, pw), (gc, pc), (gf, pf)):
      assert got.dtype == dtype
      got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
      np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


def test_recomputed_scan_saves_its_inputs_only_once_the_loop_starts():
  """The buffer of saved step inputs is made from the loop's input: it does not exist while
  what comes before the loop runs (here, a forward without gradient whose temporaries are as
  large as the buffer). A scan's own stacked outputs would: XLA:CPU allocates buffers made from
  constants at program start."""

  def before(x, p):
    for _ in range(3):
      x = x + jnp.tanh(jnp.tanh(x @ p) @ p.T) * 0.1  # a [4096, 8192] float32 temporary
    return jax.lax.stop_gradient(x)

  def loss(ws, p, x):
    c, _ = recomputed_scan(lambda w, c, _: (_layer(w, c), None))(ws, before(x, p), ())
    return jnp.sum(c**2)

  steps = 16
  stack = steps * 4096 * 512 * 4  # the saved inputs
  temp = _temp_bytes(
    jax.jit(jax.grad(loss, argnums=(0, 2))),
    jax.ShapeDtypeStruct((steps, 512, 512), jnp.float32),
    jax.ShapeDtypeStruct((512, 8192), jnp.float32),
    jax.ShapeDtypeStruct((4096, 512), jnp.float32),
  )
  assert temp < 1.5 * stack, (temp / stack, 'x the saved inputs')
