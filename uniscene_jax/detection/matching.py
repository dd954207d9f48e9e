"""Hungarian matching of queries to ground truth on device: jit-able, vmap-able, no host callback.

The reference (HungarianAssigner3D) builds a [Q, G] cost per image and decoder layer and runs
scipy's linear_sum_assignment on the CPU. Here the same assignment is computed by the shortest
augmenting path method with row and column potentials (Jonker-Volgenant / Kuhn-Munkres with
potentials): the G ground-truth boxes are the rows, added one at a time; each addition is a
Dijkstra-like search over the Q query columns whose inner step is one vectorised update of all Q
columns. A row needs at most (rows so far + 1) steps, so the cost is O(G^2 Q) for G <= Q, and
padded rows (valid = False) are skipped. Ties may resolve differently from scipy; the total cost
is the same optimum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from uniscene_jax.detection import boxes as box_lib

# Matching cost of the reference assigner (model_spec 10).
CLS_COST_WEIGHT = 2.0
REG_COST_WEIGHT = 0.25
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
FOCAL_EPS = 1e-12
# The reference replaces non-finite costs before scipy sees them.
NAN_COST = 100.0


def linear_sum_assignment(
  cost: jnp.ndarray, row_valid: jnp.ndarray | None = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Minimum-cost assignment of every valid row to a distinct column.

  Args:
    cost: [R, N] finite costs with R <= N (rows = ground truth, columns = queries).
    row_valid: [R] bool; invalid rows (padding) are left unassigned and cost nothing.

  Returns:
    col_of_row [R] int32 (-1 for invalid rows) and row_of_col [N] int32 (-1 = unassigned).
  """
  num_rows, num_cols = cost.shape
  if num_rows > num_cols:
    raise ValueError(
      f'linear_sum_assignment: cost is [{num_rows}, {num_cols}]; expected rows (ground truth) '
      '<= columns (queries)'
    )
  if row_valid is None:
    row_valid = jnp.ones((num_rows,), bool)
  dtype = jnp.promote_types(cost.dtype, jnp.float32)
  cost = cost.astype(dtype)
  inf = jnp.asarray(jnp.inf, dtype)
  virtual = num_cols  # column index that stands for "the row being added" (e-maxx's column 0)
  # The virtual column is never a search target: infinite cost.
  row_cost = jnp.concatenate([cost, jnp.full((num_rows, 1), inf, dtype)], axis=1)

  def add_row(i, state):
    u, v, p = state  # u [R] row potentials, v [N+1] column potentials, p [N+1] row of column
    p = p.at[virtual].set(i)

    def search_cond(s):
      return ~s[-1]

    def search_step(s):
      u, v, p, minv, way, used, j0, _ = s
      used = used.at[j0].set(True)
      i0 = p[j0]
      reduced = row_cost[i0] - u[i0] - v
      better = (~used) & (reduced < minv)
      minv = jnp.where(better, reduced, minv)
      way = jnp.where(better, j0, way)
      masked = jnp.where(used, inf, minv)
      j1 = jnp.argmin(masked)
      delta = masked[j1]
      # Every used column's row (all distinct) moves by +delta, the column by -delta, so reduced
      # costs inside the search tree stay zero and the others drop by delta.
      u = u.at[jnp.where(used, p, num_rows)].add(jnp.where(used, delta, 0.0), mode='drop')
      v = jnp.where(used, v - delta, v)
      minv = jnp.where(used, minv, minv - delta)
      return u, v, p, minv, way, used, j1, p[j1] < 0

    init = (
      u,
      v,
      p,
      jnp.full((num_cols + 1,), inf, dtype),
      jnp.full((num_cols + 1,), virtual, jnp.int32),
      jnp.zeros((num_cols + 1,), bool),
      jnp.asarray(virtual, jnp.int32),
      ~row_valid[i],  # padded rows: no search, no augmentation
    )
    u, v, p, _, way, _, j0, _ = jax.lax.while_loop(search_cond, search_step, init)

    # Flip the alternating path from the free column j0 back to the virtual column.
    def flip_cond(s):
      return s[1] != virtual

    def flip_step(s):
      p, j0 = s
      j1 = way[j0]
      return p.at[j0].set(p[j1]), j1

    p, _ = jax.lax.while_loop(flip_cond, flip_step, (p, j0))
    return u, v, p

  state = (
    jnp.zeros((num_rows,), dtype),
    jnp.zeros((num_cols + 1,), dtype),
    jnp.full((num_cols + 1,), -1, jnp.int32),
  )
  _, _, p = jax.lax.fori_loop(0, num_rows, add_row, state)
  row_of_col = p[:num_cols]
  col_of_row = (
    jnp.full((num_rows,), -1, jnp.int32)
    .at[jnp.where(row_of_col >= 0, row_of_col, num_rows)]
    .set(jnp.arange(num_cols, dtype=jnp.int32), mode='drop')
  )
  return col_of_row, row_of_col


def match_cost(
  cls_logits: jnp.ndarray, box_code: jnp.ndarray, gt_boxes: jnp.ndarray, gt_labels: jnp.ndarray
) -> jnp.ndarray:
  """The reference assigner's cost [Q, G] (focal class cost + L1 on the first 8 code dims).

  Args:
    cls_logits: [Q, C] class logits of one image and decoder layer.
    box_code: [Q, 10] predicted codes (centres in metres).
    gt_boxes: [G, 9] lidar frame, **gravity** centre, (x, y, z, w, l, h, yaw, vx, vy).
    gt_labels: [G] int classes in [0, C); padding may hold anything (its column is garbage).

  Returns:
    [Q, G] float32 cost, non-finite entries replaced as the reference does (nan, +inf -> 100,
    -inf -> -100).
  """
  p = jax.nn.sigmoid(cls_logits.astype(jnp.float32))
  neg = -jnp.log(1.0 - p + FOCAL_EPS) * (1.0 - FOCAL_ALPHA) * p**FOCAL_GAMMA
  pos = -jnp.log(p + FOCAL_EPS) * FOCAL_ALPHA * (1.0 - p) ** FOCAL_GAMMA
  labels = jnp.clip(gt_labels, 0, cls_logits.shape[-1] - 1)
  cls_cost = jnp.take(pos - neg, labels, axis=1) * CLS_COST_WEIGHT
  target = box_lib.normalize_bbox(gt_boxes.astype(jnp.float32))[:, :8]
  pred = box_code.astype(jnp.float32)[:, :8]
  reg_cost = jnp.sum(jnp.abs(pred[:, None, :] - target[None, :, :]), axis=-1) * REG_COST_WEIGHT
  cost = cls_cost + reg_cost
  return jnp.nan_to_num(cost, nan=NAN_COST, posinf=NAN_COST, neginf=-NAN_COST)


def hungarian_assign(
  cls_logits: jnp.ndarray,
  box_code: jnp.ndarray,
  gt_boxes: jnp.ndarray,
  gt_labels: jnp.ndarray,
  gt_valid: jnp.ndarray,
) -> jnp.ndarray:
  """Query -> ground-truth assignment of one image and decoder layer (no gradient).

  Args: as `match_cost`, plus gt_valid [G] bool (False = padding, never matched).

  Returns:
    [Q] int32: the matched ground-truth index of each query, -1 for background.
  """
  cost = jax.lax.stop_gradient(match_cost(cls_logits, box_code, gt_boxes, gt_labels))
  _, gt_of_query = linear_sum_assignment(cost.T, gt_valid)
  return gt_of_query
