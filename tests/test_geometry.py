"""BEV geometry against straightforward references and the reference's stated numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference.occupancy_torch import rotate_torch
from uniscene_jax import geometry


def test_reference_points_follow_the_query_layout():
  ref2 = geometry.bev_reference_2d(200, 200)
  q = 37 * 200 + 151  # h = 37 (y), w = 151 (x)
  np.testing.assert_allclose(ref2[q], [151.5 / 200, 37.5 / 200])
  ref3 = geometry.bev_reference_3d(200, 200, 4)
  assert ref3.shape == (4, 40000, 3)
  metric_z = ref3[:, q, 2] * 8 - 5
  np.testing.assert_allclose(metric_z, [-4.5, -2.1666667, 0.1666667, 2.5], atol=1e-6)
  np.testing.assert_array_equal(ref3[2, :, :2], ref2)


def _camera(yaw, k=1260.0, cx=800.0, cy=450.0, t=(1.0, 0.0, 1.5)):
  """lidar2img of a camera looking along yaw in the xy plane (x right, y down, z forward)."""
  c, s = np.cos(yaw), np.sin(yaw)
  forward, right, down = np.array([c, s, 0.0]), np.array([s, -c, 0.0]), np.array([0, 0, -1.0])
  cam2lidar = np.eye(4)
  cam2lidar[:3, :3] = np.stack([right, down, forward], 1)
  cam2lidar[:3, 3] = t
  viewpad = np.eye(4)
  viewpad[:3, :3] = [[k, 0, cx], [0, k, cy], [0, 0, 1]]
  return viewpad @ np.linalg.inv(cam2lidar)


def test_projection_matches_a_float64_loop_reference():
  rng = np.random.default_rng(0)
  lidar2img = np.stack(
    [
      np.stack([_camera(y) for y in np.linspace(0, 2 * np.pi, 6, endpoint=False) + off])
      for off in (0, 0.3)
    ]
  )  # [B=2, N=6, 4, 4]
  ego2lidar = np.stack([np.eye(4), np.eye(4)])
  ego2lidar[1, :3, 3] = [-0.9, 0.1, -1.8]
  ref = geometry.bev_reference_3d(20, 24, 4)
  ref = ref[:, rng.permutation(ref.shape[1])[:300]]
  uv, mask = geometry.project_to_cameras(
    jnp.asarray(ref), jnp.asarray(lidar2img), (928, 1600), jnp.asarray(ego2lidar)
  )
  assert uv.shape == (2, 6, 300, 4, 2) and mask.shape == (2, 6, 300, 4)
  lo, hi = np.array(geometry.PC_RANGE[:3]), np.array(geometry.PC_RANGE[3:])
  for b in range(2):
    for n in range(6):
      m = lidar2img[b, n] @ ego2lidar[b]
      for p in range(4):
        pts = ref[p] * (hi - lo) + lo
        cam = np.c_[pts, np.ones(len(pts))] @ m.T
        depth = cam[:, 2]
        want = cam[:, :2] / np.maximum(depth, 1e-5)[:, None] / [1600, 928]
        inside = (depth > 1e-5) & np.all((want > 0) & (want < 1), 1)
        front = depth > 1e-5
        # float32 projection (as the reference): relative error grows near zero depth.
        np.testing.assert_allclose(uv[b, n, :, p][front], want[front], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(mask[b, n, :, p]), inside)
  # Every camera sees something, and a point is not seen by all six.
  assert np.all(mask.any(2)) and not np.any(mask.all(1))
  # Per-sample ego2lidar: the two samples differ (the reference used sample 0's for all).
  assert not np.array_equal(np.asarray(mask[0]), np.asarray(mask[1]))


def test_can_bus_shift():
  can = np.zeros((3, 18), np.float32)
  can[1, :2] = [0.512, 0.0]  # moved one cell along global x while heading along x
  can[2, :2] = [0.0, 1.024]
  can[2, 16] = np.pi / 2  # heading along global y, moved two cells forward
  shift = np.asarray(geometry.can_bus_shift(jnp.asarray(can), 200, 200))
  np.testing.assert_allclose(shift[0], [0, 0])
  np.testing.assert_allclose(shift[1], [0, 1 / 200], atol=1e-7)
  np.testing.assert_allclose(shift[2], [0, 2 / 200], atol=1e-7)


@pytest.mark.parametrize('angle', [0.0, 1.7, -12.3, 45.0, 90.0, 179.5, -135.25])
def test_rotate_bev_equals_the_torch_reference(angle):
  rng = np.random.default_rng(int(abs(angle) * 10))
  bev = rng.normal(size=(2, 200, 200, 3)).astype(np.float32)
  angles = np.array([angle, -angle / 3], np.float32)
  out = np.asarray(jax.jit(geometry.rotate_bev)(jnp.asarray(bev), jnp.asarray(angles)))
  h, w = bev.shape[1:3]
  for b in range(2):
    want = rotate_torch(torch.from_numpy(bev[b]).permute(2, 0, 1), float(angles[b]))
    want = want.permute(1, 2, 0).numpy()
    # The exact source position of every output pixel (float64), and how far it lies from a
    # rounding tie (a half pixel) along either axis.
    a = np.radians(np.float64(angles[b]))
    dc = np.arange(w) - (w - 1) / 2
    dr = (np.arange(h) - (h - 1) / 2)[:, None]
    src_w = np.cos(a) * dc - np.sin(a) * dr + (w - 1) / 2
    src_h = np.sin(a) * dc + np.cos(a) * dr + (h - 1) / 2
    tie = np.minimum(np.abs(src_w % 1 - 0.5), np.abs(src_h % 1 - 0.5))
    exact = np.round(src_h).astype(int), np.round(src_w).astype(int)
    inside = (exact[0] >= 0) & (exact[0] < h) & (exact[1] >= 0) & (exact[1] < w)
    exact = np.where(inside[..., None], bev[b][exact[0] % h, exact[1] % w], 0)
    # Both float32 computations equal the exact map except within 1e-4 pixel of a tie, where
    # rounding the angle's sine and cosine to float32 may pick the other neighbour.
    for got in (out[b], want):
      differ = np.any(got != exact, axis=-1)
      assert np.all(tie[differ] < 1e-4), tie[differ].max()
      assert differ.mean() < 1e-3
  if angle == 90.0:
    np.testing.assert_array_equal(out[0], np.rot90(bev[0]))  # counter-clockwise as displayed
  if angle == 0.0:
    np.testing.assert_array_equal(out, bev)
