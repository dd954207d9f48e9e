r"""Pictures of a run: the cameras, occupancy from above and in 3D, the BEV features, boxes.

    python -m uniscene_jax.tools.visualize --workdir W [--split val] [--num_samples 4] \
        [--out DIR] [--start 0] [--every 1] [--step N] [--data_dir D]
    python -m uniscene_jax.tools.visualize --weights uniscene.pth \
        --config=configs/pretrain.py[:preset] --out DIR

Writes one PNG per frame, <out>/<split>_<index>.png (default out: <workdir>/pictures):
- the six camera images in the rig's layout (front-left, front, front-right; back-left, back,
  back-right);
- the target and the predicted occupancy seen from above (x forward = up, y left = left, the ego
  at the centre), on the model's grid: binary occupancy coloured by the height of the highest
  occupied voxel, Occ3D semantics by the class of the highest non-free voxel (standard palette);
  free and unobserved cells dark. Annotated boxes are outlined on the target, predicted boxes on
  the prediction when the model returns them (a detector's aux['detections'] above
  --score_threshold, or aux['boxes']); a detector's boxes go over the dimmed target;
- the BEV features of the frame (bev_embed) projected on their first three principal components;
- target and prediction as oblique 3D voxel views.

The model and data come from the workdir (its config.json and latest checkpoint), or from
--config with --weights (a PyTorch .pth through the importer, or another workdir). Frames run in
video mode as in evaluation, from the first frame of the scene of --start on, so that every
pictured frame has its history; --every N pictures every N-th frame.
"""

import importlib
import json
import math
import os

import cv2
import numpy as np

# The rig's layout: positions in the records' camera order (CAM_FRONT, CAM_FRONT_RIGHT,
# CAM_FRONT_LEFT, CAM_BACK, CAM_BACK_LEFT, CAM_BACK_RIGHT), row by row as seen from the car.
RIG_LAYOUT = ((2, 0, 1), (4, 3, 5))
CAMERA_LABELS = ('front', 'front right', 'front left', 'back', 'back left', 'back right')

# The nuScenes/Occ3D occupancy palette (RGB) of the 17 non-free classes, in OCC3D_CLASSES order.
OCC3D_PALETTE = np.array(
  [
    (0, 0, 0),  # others
    (255, 120, 50),  # barrier
    (255, 192, 203),  # bicycle
    (255, 255, 0),  # bus
    (0, 150, 245),  # car
    (0, 255, 255),  # construction_vehicle
    (255, 127, 0),  # motorcycle
    (255, 0, 0),  # pedestrian
    (255, 240, 150),  # traffic_cone
    (135, 60, 0),  # trailer
    (160, 32, 240),  # truck
    (255, 0, 255),  # driveable_surface
    (139, 137, 137),  # other_flat
    (75, 0, 75),  # sidewalk
    (150, 240, 80),  # terrain
    (230, 230, 250),  # manmade
    (0, 175, 0),  # vegetation
  ],
  np.uint8,
)
BACKGROUND = (22, 22, 26)  # free / unobserved cells and the canvas
TEXT = (235, 235, 235)
TARGET_BOX = (255, 255, 255)
PREDICTED_BOX = (255, 80, 40)

# Layout in pixels.
WIDTH = 960
CAMERA_W = WIDTH // 3
PANEL = WIDTH // 3  # top views and the BEV features
VIEW_3D = (360, WIDTH // 2)  # (height, width) of each oblique view
HEADER = 28
TITLE = 22
LEGEND = 28


# ----------------------------------------------------------------------------------------------
# Pictures of arrays (numpy in, uint8 RGB out).


def rig_picture(images, width: int = CAMERA_W) -> np.ndarray:
  """Six [H, W, 3] uint8 BGR camera images (records' order) -> uint8 RGB [2 h, 3 width, 3].

  Each image is resized to `width` columns (h = round(width H / W)) and labelled.
  """
  if len(images) != 6:
    raise ValueError(f'rig_picture: expected 6 camera images, got {len(images)}')
  h0, w0 = images[0].shape[:2]
  h = round(width * h0 / w0)
  rows = []
  for row in RIG_LAYOUT:
    tiles = []
    for n in row:
      tile = cv2.resize(images[n], (width, h), interpolation=cv2.INTER_AREA)[..., ::-1]
      tiles.append(_label(np.ascontiguousarray(tile), CAMERA_LABELS[n], (6, 16), backdrop=True))
    rows.append(np.concatenate(tiles, 1))
  return np.concatenate(rows, 0)


def top_index(occupied: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[X, Y, Z] bool -> (z of the highest occupied voxel [X, Y] int, whether any [X, Y])."""
  any_ = occupied.any(2)
  z = occupied.shape[2] - 1 - np.argmax(occupied[:, :, ::-1], 2)
  return np.where(any_, z, 0), any_


def height_colors(z: np.ndarray, depth: int) -> np.ndarray:
  """Voxel heights 0 .. depth - 1 -> uint8 RGB [..., 3] (dark blue low, yellow high)."""
  from matplotlib import colormaps

  lut = (colormaps['viridis'](np.linspace(0.1, 1.0, depth))[:, :3] * 255).astype(np.uint8)
  return lut[np.clip(z, 0, depth - 1)]


def voxel_colors(grid: np.ndarray, free: int, semantic: bool) -> tuple[np.ndarray, np.ndarray]:
  """[X, Y, Z] labels -> (occupied [X, Y, Z] bool, RGB [X, Y, Z, 3] uint8 by height or class)."""
  occupied = grid != free
  if semantic:
    return occupied, OCC3D_PALETTE[np.clip(grid, 0, len(OCC3D_PALETTE) - 1)]
  z = np.broadcast_to(np.arange(grid.shape[2]), grid.shape)
  return occupied, height_colors(z, grid.shape[2])


def top_view(occupied: np.ndarray, colors: np.ndarray) -> np.ndarray:
  """Grid seen from above: uint8 RGB [X, Y, 3], x forward = up, y left = left.

  occupied: [X, Y, Z] bool; colors: [X, Y, Z, 3] uint8 of each voxel. A column shows the colour
  of its highest occupied voxel, BACKGROUND where it is free.
  """
  z, any_ = top_index(occupied)
  x, y = np.indices(z.shape)
  picture = np.where(any_[..., None], colors[x, y, z], np.asarray(BACKGROUND, np.uint8))
  return orient(picture)


def orient(grid_xy: np.ndarray) -> np.ndarray:
  """[X, Y, ...] indexed by (x, y) -> picture rows (x decreasing: forward up) and columns (y
  decreasing: left on the left)."""
  return np.ascontiguousarray(grid_xy[::-1, ::-1])


def bev_pca(bev: np.ndarray, bev_h: int, bev_w: int, frame: str = 'ego') -> np.ndarray:
  """BEV features [H W, C] (query q = h W + w; h along the BEV frame's y, w along its x) ->
  float [X, Y, 3] in [0, 1], oriented as `top_view` (x forward up, y left to the left).

  Each pixel's features projected on the first three principal components (signs fixed so that
  the largest loading is positive), each component scaled to [0, 1] by its 1st and 99th
  percentiles (clipped). frame: 'ego' (x forward, y left), or 'lidar' (x right, y forward: the
  detector's BEV), turned to the ego's axes.
  """
  if frame not in ('ego', 'lidar'):
    raise ValueError(f"bev_pca: frame must be 'ego' or 'lidar', got {frame!r}")
  x = np.asarray(bev, np.float64).reshape(bev_h * bev_w, -1)
  if x.shape[1] < 3:
    raise ValueError(f'bev_pca: need at least 3 channels, got {x.shape[1]}')
  x = x - x.mean(0)
  _, vectors = np.linalg.eigh(x.T @ x)
  top = vectors[:, ::-1][:, :3]  # eigenvalues ascend
  top = top * np.sign(top[np.argmax(np.abs(top), 0), range(3)])
  proj = x @ top
  lo, hi = np.percentile(proj, 1, 0), np.percentile(proj, 99, 0)
  rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
  grid = rgb.reshape(bev_h, bev_w, 3)  # [y, x] of the BEV frame
  # ego: [x, y] = transpose; lidar: forward = lidar y (rows h), left = -lidar x (w reversed)
  return orient(grid.transpose(1, 0, 2) if frame == 'ego' else grid[:, ::-1])


def oblique_view(
  occupied: np.ndarray,
  colors: np.ndarray,
  voxel_size,
  out_hw: tuple[int, int] = VIEW_3D,
  azimuth: float = -35.0,
  elevation: float = 38.0,
  fit: np.ndarray | None = None,
) -> np.ndarray:
  """uint8 RGB [H, W, 3]: the voxels as shaded cubes in a parallel projection, seen from behind,
  left and above (azimuth: viewing direction from +x towards +y, degrees; elevation: downwards).

  Only faces between an occupied and a free voxel that face the viewer are drawn; each is sampled
  at about 1.4 points per pixel, and a z-buffer (the nearest sample per pixel) resolves
  occlusion. The view fits the x-y bounding box of the occupied voxels of `fit` ([X, Y, Z]
  bool, default `occupied`; at least a quarter of the grid's side): the same `fit` gives the same
  view, as for a target and its prediction.
  """
  h, w = out_hw
  size = np.asarray(voxel_size, np.float64)
  a, e = math.radians(azimuth), math.radians(elevation)
  forward = np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), -math.sin(e)])
  right = np.array([math.sin(a), -math.cos(a), 0.0])
  up = np.cross(right, forward)
  extent = np.asarray(occupied.shape) * size
  fit = occupied if fit is None else fit
  cells = np.argwhere(fit) if fit.any() else np.array([[0, 0, 0], np.subtract(fit.shape, 1)])
  # the voxels' 8 corners, with the box grown to at least a quarter of the grid's side
  lo, hi = cells.min(0).astype(np.float64), cells.max(0) + 1.0
  grow = np.maximum(np.asarray(occupied.shape) / 4 - (hi - lo), 0) / 2
  cells = np.concatenate([cells, [lo - grow, hi + grow - 1]])
  corners = (cells[:, None] + np.indices((2, 2, 2)).reshape(3, -1).T[None]).reshape(-1, 3)
  corners = corners * size - extent / 2
  sx, sy = corners @ right, -(corners @ up)
  scale = 0.92 * min(w / np.ptp(sx), h / np.ptp(sy))
  offset = np.array(
    [w / 2 - scale * (sx.max() + sx.min()) / 2, h / 2 - scale * (sy.max() + sy.min()) / 2]
  )
  canvas = np.empty((h, w, 3), np.uint8)
  canvas[:] = BACKGROUND
  padded = np.pad(occupied, 1)
  xs, ys, cols, depths = [], [], [], []
  for axis in range(3):  # six face directions, at most three face the viewer
    for sign in (-1, 1):
      normal = np.zeros(3)
      normal[axis] = sign
      if normal @ forward >= 0:
        continue
      neighbour = np.roll(padded, -sign, axis)[1:-1, 1:-1, 1:-1]
      idx = np.argwhere(occupied & ~neighbour)
      if not len(idx):
        continue
      u_axis, v_axis = [k for k in range(3) if k != axis]
      n_u = max(2, math.ceil(1.4 * scale * size[u_axis]))
      n_v = max(2, math.ceil(1.4 * scale * size[v_axis]))
      uu, vv = np.meshgrid((np.arange(n_u) + 0.5) / n_u - 0.5, (np.arange(n_v) + 0.5) / n_v - 0.5)
      local = np.zeros((uu.size, 3))
      local[:, axis] = 0.5 * sign
      local[:, u_axis], local[:, v_axis] = uu.ravel(), vv.ravel()
      # a thin darker rim on each face makes single cubes readable
      rim = np.maximum(np.abs(uu), np.abs(vv)).ravel() > 0.5 - 1.0 / min(n_u, n_v)
      shade = {2: 1.0, 0: 0.72, 1: 0.58}[axis] * np.where(rim, 0.75, 1.0)
      centres = (idx + 0.5) * size - extent / 2
      points = centres[:, None, :] + local[None] * size  # [V, S, 3]
      xs.append(points @ right)
      ys.append(-(points @ up))
      depths.append(points @ forward)
      base = colors[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.float32)
      cols.append(base[:, None, :] * shade[None, :, None])
  if not xs:
    return canvas
  px = np.concatenate([a.ravel() for a in xs]) * scale + offset[0]
  py = np.concatenate([a.ravel() for a in ys]) * scale + offset[1]
  depth = np.concatenate([a.ravel() for a in depths])
  rgb = np.concatenate([c.reshape(-1, 3) for c in cols])
  col, row = px.astype(np.int64), py.astype(np.int64)
  inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
  pixel, depth, rgb = (row * w + col)[inside], depth[inside], rgb[inside]
  order = np.argsort(depth, kind='stable')  # nearest first
  unique, first = np.unique(pixel[order], return_index=True)  # first occurrence = nearest
  canvas.reshape(-1, 3)[unique] = np.clip(rgb[order[first]], 0, 255).astype(np.uint8)
  return canvas


def draw_boxes(
  picture: np.ndarray, boxes: np.ndarray, pc_range, color=TARGET_BOX, thickness: int = 1
) -> np.ndarray:
  """Outlines of 3D boxes on a top view (`top_view` orientation, any size) covering pc_range.

  boxes: [K, 7+] (x, y, z, dx, dy, dz, heading, ...) in the grid's frame (x forward, y left):
  centre, extent along the heading and across it, heading counter-clockwise from +x in radians.
  A line from the centre to the front edge marks the heading. Returns a copy.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, np.shape(boxes)[-1] if np.size(boxes) else 7)
  if boxes.shape[1] < 7:
    raise ValueError(
      f'draw_boxes: boxes must be [K, 7+] (x, y, z, dx, dy, dz, heading), got {boxes.shape}'
    )
  out = np.ascontiguousarray(picture).copy()
  if not len(boxes):
    return out
  x_min, y_min, _, x_max, y_max, _ = pc_range
  rows, cols = out.shape[:2]
  c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
  half = boxes[:, 3:5] / 2
  unit = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1], [1, 0], [0, 0]], np.float64)
  lx, ly = unit[None, :, 0] * half[:, None, 0], unit[None, :, 1] * half[:, None, 1]
  gx = boxes[:, None, 0] + c[:, None] * lx - s[:, None] * ly
  gy = boxes[:, None, 1] + s[:, None] * lx + c[:, None] * ly
  # picture row 0 is x_max, column 0 is y_max; OpenCV puts pixel centres on integers
  pr = (x_max - gx) / (x_max - x_min) * rows - 0.5
  pc = (y_max - gy) / (y_max - y_min) * cols - 0.5
  pts = np.round(np.stack([pc, pr], -1) * 16).astype(np.int32)  # 4 fractional bits
  cv2.polylines(out, list(pts[:, :4]), True, color, thickness, cv2.LINE_AA, shift=4)
  cv2.polylines(out, list(pts[:, 4:]), False, color, thickness, cv2.LINE_AA, shift=4)
  return out


def boxes_from_record(gt_boxes: np.ndarray, lidar2grid: np.ndarray) -> np.ndarray:
  """The records' gt_boxes [M, 9] (lidar frame: bottom centre, (w, l, h), -yaw - pi / 2) ->
  [M, 7] (x, y, z, dx, dy, dz, heading) in the grid's frame given by lidar2grid [3 or 4, 4]."""
  gt = np.asarray(gt_boxes, np.float64)
  rot = np.asarray(lidar2grid, np.float64)[:3, :3]
  trans = np.asarray(lidar2grid, np.float64)[:3, 3] if np.shape(lidar2grid)[1] == 4 else 0.0
  heading = -gt[:, 6] - np.pi / 2 + math.atan2(rot[1, 0], rot[0, 0])
  centre = gt[:, :3] @ rot.T + trans
  return np.concatenate([centre, gt[:, 4:5], gt[:, 3:4], gt[:, 5:6], heading[:, None]], 1)


# ----------------------------------------------------------------------------------------------
# The figure of one frame.


def _label(
  image: np.ndarray, text: str, org, scale: float = 0.45, backdrop: bool = False
) -> np.ndarray:
  """Writes `text` with its baseline at org = (x, y), on a darkened box if `backdrop`."""
  font = cv2.FONT_HERSHEY_SIMPLEX
  x, y = org
  if backdrop:  # legible on bright camera images
    (w, h), base = cv2.getTextSize(text, font, scale, 1)
    box = image[max(y - h - 3, 0) : y + base, max(x - 3, 0) : x + w + 3]
    box[:] = (box * 0.35).astype(np.uint8)
  cv2.putText(image, text, (x, y), font, scale, TEXT, 1, cv2.LINE_AA)
  return image


def _titled(image: np.ndarray, title: str) -> np.ndarray:
  bar = np.empty((TITLE, image.shape[1], 3), np.uint8)
  bar[:] = BACKGROUND
  return np.concatenate([_label(bar, title, (6, 16)), image], 0)


def _resize(image: np.ndarray, size: int, interpolation=cv2.INTER_NEAREST) -> np.ndarray:
  return cv2.resize(image, (size, size), interpolation=interpolation)


def _ego_marker(picture: np.ndarray) -> np.ndarray:
  """A small white triangle at the centre pointing forward (up)."""
  h, w = picture.shape[:2]
  cy, cx = h / 2, w / 2
  tri = np.round(np.array([[cx, cy - 6], [cx - 4, cy + 4], [cx + 4, cy + 4]]) * 16).astype(np.int32)
  cv2.fillPoly(picture, [tri], (255, 255, 255), cv2.LINE_AA, shift=4)
  return picture


def _legend(semantic: bool, present, depth: int, pc_range) -> np.ndarray:
  """The height colour bar, or the classes in the frame (then 18 pixels taller per extra row)."""
  if not semantic:
    strip = np.empty((LEGEND, WIDTH, 3), np.uint8)
    strip[:] = BACKGROUND
    bar = height_colors(np.arange(depth), depth)
    x0, x1 = 130, WIDTH - 80
    strip[8:20, x0:x1] = bar[np.linspace(0, depth - 1e-6, x1 - x0).astype(int)]
    _label(strip, 'height', (6, 19))
    _label(strip, f'{pc_range[2]:g} m', (x0 - 48, 19))
    _label(strip, f'{pc_range[5]:g} m', (x1 + 6, 19))
    return strip
  from uniscene_jax.data.nuscenes_meta import OCC3D_CLASSES

  entries, x, y = [], 6, 0  # the frame's classes, flowing into rows of 18 pixels
  for k in sorted(int(c) for c in present):
    name = OCC3D_CLASSES[k].replace('_', ' ')
    width = 18 + cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0]
    if x + width > WIDTH - 6:
      x, y = 6, y + 18
    entries.append((k, name, x, y))
    x += width + 14
  strip = np.empty((LEGEND + y, WIDTH, 3), np.uint8)
  strip[:] = BACKGROUND
  for k, name, x, y in entries:
    strip[y + 8 : y + 20, x : x + 12] = (90, 90, 90)  # a border: 'others' is black
    strip[y + 9 : y + 19, x + 1 : x + 11] = OCC3D_PALETTE[k]
    _label(strip, name, (x + 17, y + 18), 0.4)
  return strip


def frame_picture(
  images,
  target: np.ndarray,
  prediction: np.ndarray | None,
  bev: np.ndarray,
  *,
  free: int,
  semantic: bool,
  pc_range,
  bev_hw: tuple[int, int],
  bev_frame: str = 'ego',
  target_boxes: np.ndarray | None = None,
  predicted_boxes: np.ndarray | None = None,
  header: str = '',
) -> np.ndarray:
  """uint8 RGB [H, WIDTH, 3]: header, camera rig, top views and BEV features, legend, 3D views.

  target, prediction: [X, Y, Z] labels on the grid over pc_range (free = `free`); prediction
  None for a model without occupancy output (a detector): its boxes are then drawn on the target,
  dimmed. bev: [H W, C] in `bev_frame`; boxes: [K, 7+] in the grid's frame (see draw_boxes).
  """
  size = (np.asarray(pc_range[3:]) - np.asarray(pc_range[:3])) / np.asarray(target.shape)
  occ_t, col_t = voxel_colors(target, free, semantic)
  top_t = _resize(top_view(occ_t, col_t), PANEL)
  if prediction is None:
    occ_p = np.zeros_like(occ_t)
    top_p = (top_t * 0.45).astype(np.uint8)
    if target_boxes is not None:
      top_p = draw_boxes(top_p, target_boxes, pc_range, (120, 120, 120))
    title_p, title_3d = 'predicted boxes (over the target, dimmed)', 'no occupancy prediction'
  else:
    occ_p, col_p = voxel_colors(prediction, free, semantic)
    top_p = _resize(top_view(occ_p, col_p), PANEL)
    title_p = f'predicted {"semantic" if semantic else "occupancy"}'
    title_3d = 'prediction in 3D'
  if target_boxes is not None:
    top_t = draw_boxes(top_t, target_boxes, pc_range, TARGET_BOX)
  if predicted_boxes is not None:
    top_p = draw_boxes(top_p, predicted_boxes, pc_range, PREDICTED_BOX)
  pca = _resize((bev_pca(bev, *bev_hw, bev_frame) * 255).astype(np.uint8), PANEL)
  n = 'semantic' if semantic else 'occupancy'
  row2 = np.concatenate(
    [
      _titled(_ego_marker(top_t), f'target {n} ({target.shape[0]}x{target.shape[1]}), from above'),
      _titled(_ego_marker(top_p), title_p),
      _titled(pca, 'BEV features, 3 principal components'),
    ],
    1,
  )
  fit = occ_t | occ_p
  right = oblique_view(occ_p, col_p, size, fit=fit) if prediction is not None else None
  if right is None:
    right = np.empty((*VIEW_3D, 3), np.uint8)
    right[:] = BACKGROUND
  row3 = np.concatenate(
    [_titled(oblique_view(occ_t, col_t, size, fit=fit), 'target in 3D'), _titled(right, title_3d)],
    1,
  )
  present = set(np.unique(target[occ_t])) if semantic else set()
  if semantic and prediction is not None:
    present |= set(np.unique(prediction[occ_p]))
  head = np.empty((HEADER, WIDTH, 3), np.uint8)
  head[:] = BACKGROUND
  _label(head, header, (6, 19), 0.5)
  return np.concatenate(
    [
      head,
      _titled(rig_picture(images), 'cameras'),
      row2,
      _legend(semantic, present, target.shape[2], pc_range),
      row3,
    ],
    0,
  )


def write_png(path: str, image: np.ndarray) -> None:
  """Writes uint8 RGB [H, W, 3] to a temporary name, then renames it."""
  tmp = f'{path}.tmp.png'
  if not cv2.imwrite(tmp, np.ascontiguousarray(image[..., ::-1])):
    raise ValueError(f'{path}: could not write the picture')
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# From a workdir (or a .pth) to pictures.


def config_from_workdir(workdir: str):
  """The experiment config a workdir was trained with (<workdir>/config.json)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(f'{path}: not found; pass --config=configs/<task>.py[:preset] instead')
  with open(path) as f:
    saved = json.load(f)['config']
  module = importlib.import_module(saved.get('config_module', 'configs.pretrain'))
  config = module.get_config(saved.get('preset'))
  with config.unlocked():
    _overlay(config, saved, '')
  return config


def _overlay(config, saved: dict, prefix: str) -> None:
  for key, value in saved.items():
    if key not in config:
      continue  # a field this version of the config no longer has
    if isinstance(value, dict):
      _overlay(config[key], value, f'{prefix}{key}.')
      continue
    old = config[key]
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    try:
      config[key] = value
    except TypeError as e:
      raise ValueError(f'config.json: field {prefix}{key}={value!r}: {e}') from e


def load_model(config, workdir: str | None, weights: str | None, step: int | None):
  """(model, variables, description): the workdir's checkpoint, or `weights` imported."""
  import jax

  from uniscene_jax import evaluate, train
  from uniscene_jax.models import build_model, init_variables, model_config_from

  mc = model_config_from(config)
  model = build_model(mc)
  if weights:
    variables = jax.jit(lambda: init_variables(mc, jax.random.key(0)))()
    params, batch_stats = train.warm_start(weights, variables['params'], variables['batch_stats'])
    return model, {'params': params, 'batch_stats': batch_stats}, os.path.basename(weights)
  variables, step = evaluate.load_variables(workdir, step)
  return model, variables, f'step {step}'


def visualize(
  config,
  out: str,
  workdir: str | None = None,
  weights: str | None = None,
  data_dir: str | None = None,
  split: str = 'val',
  num_samples: int = 4,
  start: int = 0,
  every: int = 1,
  step: int | None = None,
  score_threshold: float = 0.3,
) -> list[str]:
  """Writes the pictures of `num_samples` frames of `split`; returns their paths."""
  from uniscene_jax import evaluate, targets
  from uniscene_jax.data import input_pipeline as ip
  from uniscene_jax.data.occupancy_labels import FIXED_ROTATION
  from uniscene_jax.train import prepare_data

  if num_samples < 1 or every < 1 or start < 0:
    raise ValueError(
      f'--num_samples {num_samples}, --every {every}, --start {start}: expected >= 1, >= 1, >= 0'
    )
  data_dir = prepare_data(config, data_dir)
  model, variables, source_name = load_model(config, workdir, weights, step)
  source = ip.open_source(data_dir, config.data.name, split)
  if start >= len(source):
    raise ValueError(f'--start {start}: the {split} split has {len(source)} frames')
  wanted = list(range(start, len(source), every))[:num_samples]
  first = start - int(source[start]['frame_index'])  # from the scene's start: full history
  semantic = config.data.target == 'occ3d'
  free = 17 if semantic else 0
  enc = model.config.head.encoder
  pc_range = tuple(config.model.pc_range)
  # the label grids' frames relative to the lidar: UniScene's fixed rotation, Occ3D's ego frame
  lidar2grid = (lambda r: r['lidar2ego']) if semantic else (lambda r: FIXED_ROTATION)
  os.makedirs(out, exist_ok=True)
  paths = []
  for p in evaluate.predict_frames(config, model, variables, source, first, wanted[-1] + 1):
    if p.index not in wanted:
      continue
    record = p.record
    if 'occ_target' in p.frame:  # an occupancy model: its target, pooled to its grid
      target, mask = targets.model_targets(
        p.frame['occ_target'], p.frame.get('occ_mask_camera'), config.data.target_pool,
        config.data.target,
      )  # fmt: skip
      target = np.asarray(target[0])
    else:  # a detector: the frame's binary occupancy as the scene
      target, mask = record['occ_binary'], None
    prediction = None
    if p.logits is not None:
      prediction = np.asarray(np.argmax(p.logits[0], -1)).astype(target.dtype)
    if mask is not None:  # Occ3D: only camera-visible voxels count
      visible = np.asarray(mask[0]).astype(bool)
      target = np.where(visible, target, free)
      prediction = np.where(visible, prediction, free)
    gt = boxes_from_record(record['gt_boxes'][record['gt_valid']], lidar2grid(record))
    boxes = predicted_boxes(p.aux, lidar2grid(record), score_threshold)
    if prediction is not None:
      score = _score(target, prediction, free, semantic)
    else:
      score = f'{0 if boxes is None else len(boxes)} boxes scored above {score_threshold:g}'
    header = (
      f'{split} frame {p.index} (scene {int(record["scene_index"])}, frame '
      f'{int(record["frame_index"])}{", with history" if p.continues else ""}) - '
      f'{source_name} - {score}'
    )
    picture = frame_picture(
      record['images'],
      target,
      prediction,
      np.asarray(p.bev[0]),
      free=free,
      semantic=semantic,
      pc_range=pc_range,
      bev_hw=(enc.bev_h, enc.bev_w),
      bev_frame=enc.bev_frame,
      target_boxes=gt,
      predicted_boxes=boxes,
      header=header,
    )
    path = os.path.join(out, f'{split}_{p.index:05d}.png')
    write_png(path, picture)
    paths.append(path)
    print(path, flush=True)
  return paths


def predicted_boxes(aux: dict, lidar2grid: np.ndarray, score_threshold: float) -> np.ndarray | None:
  """[K, 7] boxes in the grid's frame from a frame's aux, or None when the model has none.

  aux['detections']: the detector's decoded boxes ([1, K, 9] lidar frame, the records'
  convention; 'scores', 'valid'), kept when valid and scored above `score_threshold`;
  aux['boxes']: [1, K, 7+] already in the grid's frame (see draw_boxes).
  """
  if 'detections' in aux:
    d = {k: np.asarray(v[0]) for k, v in aux['detections'].items()}
    keep = d['valid'] & (d['scores'] > score_threshold)
    return boxes_from_record(d['boxes'][keep], lidar2grid)
  if 'boxes' in aux:
    return np.asarray(aux['boxes'][0])
  return None


def _score(target: np.ndarray, prediction: np.ndarray, free: int, semantic: bool) -> str:
  t, p = target != free, prediction != free
  if not semantic:
    return f'occupied IoU {(t & p).sum() / max((t | p).sum(), 1) * 100:.1f}'
  classes = np.union1d(np.unique(target[t]), np.unique(prediction[p]))
  ious = [
    ((target == c) & (prediction == c)).sum() / ((target == c) | (prediction == c)).sum()
    for c in classes
  ]
  return f'mIoU of its {len(classes)} classes {np.mean(ious) * 100 if ious else 0:.1f}'


def main(argv) -> None:
  from absl import app, flags

  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not f.workdir and not (f.weights and f.config is not None):
    raise app.UsageError('--workdir, or --weights with --config=configs/<task>.py[:preset]')
  config = f.config if f.config is not None else config_from_workdir(f.workdir)
  out = f.out or os.path.join(f.workdir or '.', 'pictures')
  visualize(
    config,
    out,
    workdir=f.workdir,
    weights=f.weights,
    data_dir=f.data_dir,
    split=f.split,
    num_samples=f.num_samples,
    start=f.start,
    every=f.every,
    step=f.step,
    score_threshold=f.score_threshold,
  )


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    'config', None, 'configs/<task>.py[:preset]; default: the workdir'
  )
  flags.DEFINE_string('workdir', None, 'a training run: its config.json and latest checkpoint')
  flags.DEFINE_string('weights', None, 'a PyTorch .pth (imported) or a workdir; needs --config')
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir holding nuscenes_occ (else the config)')
  flags.DEFINE_string('split', 'val', 'split to picture')
  flags.DEFINE_integer('num_samples', 4, 'frames to picture')
  flags.DEFINE_integer('start', 0, 'first frame pictured (index in the split)')
  flags.DEFINE_integer('every', 1, 'picture every N-th frame from --start')
  flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest)')
  flags.DEFINE_float('score_threshold', 0.3, 'a detector: boxes drawn above this score')
  flags.DEFINE_string('out', None, 'output directory (default: <workdir>/pictures)')


if __name__ == '__main__':
  from absl import app, logging

  _define_flags()
  logging.set_verbosity(logging.WARNING)  # checkpoint and dataset INFO lines bury the paths
  app.run(main)
