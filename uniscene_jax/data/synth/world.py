"""Geometry of one synthetic scene: a curved road, its surroundings and the objects on it.

Everything lives in global coordinates on flat ground (z = 0). The ego drives along a circular arc;
positions are laid out in road coordinates (s = arc length along the ego's path, d = lateral offset,
positive to the left of the direction of travel). Every solid is a vertical box (yaw only), so the
whole world is a set of boxes plus the ground plane, and a box moves by sliding along the road.
"""

import colorsys
import dataclasses

import numpy as np

from uniscene_jax.data import nuscenes_meta as meta

# Lateral layout of the road, in metres from the ego's lane centre (positive = left).
ROAD_HALF_WIDTH = 5.5  # driveable surface |d| <= 5.5 (ego lane at 0, oncoming lane at +3.5)
SIDEWALK_OUTER = 8.5  # sidewalk 5.5 < |d| <= 8.5, terrain beyond
ONCOMING_LANE = 3.5
PARKING_LANE = -3.8
OTHER_FLAT_PERIOD = 50.0  # left-side plazas (other_flat) every 50 m, 15 m long

# Detection classes get saturated colours with distinct hues (surfaces are desaturated), so that
# a pixel's hue tells its class; green hues are left to vegetation.
CLASS_HUES = {
  'car': 0.0,
  'truck': 30.0,
  'bus': 60.0,
  'trailer': 160.0,
  'construction_vehicle': 190.0,
  'motorcycle': 220.0,
  'bicycle': 250.0,
  'pedestrian': 280.0,
  'traffic_cone': 310.0,
  'barrier': 340.0,
}


def class_colour(detection_class: str) -> np.ndarray:
  """RGB in [0, 1] of a detection class (full saturation, value 0.9)."""
  return np.array(colorsys.hsv_to_rgb(CLASS_HUES[detection_class] / 360.0, 0.85, 0.9))


OTHERS_COLOUR = np.array([0.45, 0.40, 0.36])
BUILDING_COLOUR = np.array([0.78, 0.72, 0.62])
TRUNK_COLOUR = np.array([0.40, 0.30, 0.22])
CANOPY_COLOUR = np.array([0.18, 0.50, 0.16])
GROUND_COLOURS = {  # Occ3D class -> RGB
  11: np.array([0.32, 0.32, 0.34]),
  12: np.array([0.60, 0.52, 0.42]),
  13: np.array([0.66, 0.66, 0.64]),
  14: np.array([0.40, 0.48, 0.26]),
}
GROUND_REFLECTIVITY = {11: 0.08, 12: 0.2, 13: 0.25, 14: 0.15}


@dataclasses.dataclass(frozen=True)
class Road:
  """A circular arc followed by the ego: centre, radius, turn direction (+1 left), start angle."""

  centre: np.ndarray  # [2]
  radius: float
  turn: float  # +1 turns left (counter-clockwise), -1 right
  phi0: float

  def xy(self, s, d) -> np.ndarray:
    """Global [..., 2] position of road coordinates (s, d)."""
    s, d = np.asarray(s, np.float64), np.asarray(d, np.float64)
    phi = self.phi0 + self.turn * s / self.radius
    r = self.radius - self.turn * d
    return self.centre + np.stack([r * np.cos(phi), r * np.sin(phi)], -1)

  def heading(self, s) -> np.ndarray:
    """Global yaw of the direction of travel at arc length s."""
    phi = self.phi0 + self.turn * np.asarray(s, np.float64) / self.radius
    return phi + self.turn * np.pi / 2

  def sd(self, xy) -> tuple[np.ndarray, np.ndarray]:
    """Road coordinates (s, d) of global points [..., 2] (unique within half a turn of s = 0)."""
    rel = np.asarray(xy, np.float64) - self.centre
    phi = np.arctan2(rel[..., 1], rel[..., 0])
    dphi = (phi - self.phi0 + np.pi) % (2 * np.pi) - np.pi
    s = self.turn * dphi * self.radius
    d = self.turn * (self.radius - np.hypot(rel[..., 0], rel[..., 1]))
    return s, d

  def ground_class(self, xy) -> np.ndarray:
    """Occ3D class of the ground at global points [..., 2]."""
    s, d = self.sd(xy)
    ad = np.abs(d)
    cls = np.where(ad <= ROAD_HALF_WIDTH, 11, np.where(ad <= SIDEWALK_OUTER, 13, 14))
    plaza = (d > SIDEWALK_OUTER) & (np.mod(s, OTHER_FLAT_PERIOD) < 15.0)
    return np.where(plaza, 12, cls).astype(np.uint8)

  def ground_appearance(self, xy) -> tuple[np.ndarray, np.ndarray]:
    """RGB [..., 3] in [0, 1] and lidar reflectivity [...] of the ground, with road markings."""
    s, d = self.sd(xy)
    cls = self.ground_class(xy)
    colour = np.zeros(cls.shape + (3,))
    refl = np.zeros(cls.shape)
    for c, rgb in GROUND_COLOURS.items():
      colour[cls == c] = rgb
      refl[cls == c] = GROUND_REFLECTIVITY[c]
    # Texture: 0.8 m cells with a hashed brightness, tile grooves on the sidewalk.
    cell = np.floor(s / 0.8) * 7919.0 + np.floor(d / 0.8) * 104729.0
    jitter = 0.9 + 0.2 * (np.sin(cell) * 43758.5453 % 1.0)
    colour = colour * jitter[..., None]
    groove = (cls == 13) & (
      (np.mod(s, 1.5) < 0.08) | (np.mod(np.abs(d) - ROAD_HALF_WIDTH, 1.5) < 0.08)
    )
    colour[groove] *= 0.7
    # Lane markings: dashed centre line, solid edge lines.
    centre_line = (np.abs(d - ONCOMING_LANE / 2) < 0.08) & (np.mod(s, 9.0) < 4.5)
    edge_line = np.abs(np.abs(d) - (ROAD_HALF_WIDTH - 0.2)) < 0.08
    paint = centre_line | edge_line
    colour[paint] = 0.92
    refl[paint] = 0.8
    return colour, refl


@dataclasses.dataclass(frozen=True)
class Boxes:
  """Vertical boxes at one instant: centre [K, 3] (global), yaw [K], size [K, 3] as (w, l, h).

  The box's length l runs along its heading (local x), the width w along local y (nuScenes order).
  """

  centre: np.ndarray
  yaw: np.ndarray
  size: np.ndarray

  @property
  def half_extents(self) -> np.ndarray:
    """[K, 3] half sizes along the box's local (x, y, z) = (l, w, h) / 2."""
    return np.stack([self.size[:, 1], self.size[:, 0], self.size[:, 2]], -1) / 2

  def local(self, points: np.ndarray) -> np.ndarray:
    """Global points [N, 3] in every box's frame (origin at its centre): [N, K, 3]."""
    rel = points[:, None, :] - self.centre[None]
    c, s = np.cos(self.yaw), np.sin(self.yaw)
    return np.stack(
      [rel[..., 0] * c + rel[..., 1] * s, -rel[..., 0] * s + rel[..., 1] * c, rel[..., 2]], -1
    )


@dataclasses.dataclass(frozen=True)
class Tracks:
  """K solids that slide along the road: s(t) = s0 + speed * t at fixed lateral offset d."""

  s0: np.ndarray
  speed: np.ndarray
  lateral: np.ndarray
  yaw_offset: np.ndarray  # relative to the road heading
  size: np.ndarray  # [K, 3] (w, l, h)
  z0: np.ndarray  # bottom height
  occ_class: np.ndarray  # Occ3D class of the solid
  colour: np.ndarray  # [K, 3] RGB in [0, 1]
  reflectivity: np.ndarray
  windows: np.ndarray  # bool: building facade texture
  instance: np.ndarray  # index into SceneLayout.instances, -1 if not annotated

  def __len__(self) -> int:
    return len(self.s0)

  def at(self, road: Road, t: float) -> Boxes:
    s = self.s0 + self.speed * t
    xy = road.xy(s, self.lateral)
    centre = np.concatenate([xy, (self.z0 + self.size[:, 2] / 2)[:, None]], -1)
    return Boxes(centre=centre, yaw=road.heading(s) + self.yaw_offset, size=self.size)


@dataclasses.dataclass(frozen=True)
class Instance:
  """An annotated object: its nuScenes category, attribute ('' for none) and track index."""

  category: str
  attribute: str
  track: int


@dataclasses.dataclass(frozen=True)
class SceneLayout:
  road: Road
  ego_speed: float
  tracks: Tracks
  instances: tuple[Instance, ...]

  def ego_pose(self, t: float) -> tuple[np.ndarray, float]:
    """Global ego position [3] (z = 0) and yaw at scene time t (seconds)."""
    s = self.ego_speed * t
    xy = self.road.xy(s, 0.0)
    return np.array([xy[0], xy[1], 0.0]), float(self.road.heading(s))

  def ego_yaw_rate(self) -> float:
    return self.road.turn * self.ego_speed / self.road.radius

  def surface_distance(self, points: np.ndarray, t: float) -> np.ndarray:
    """Distance [N] from global points [N, 3] to the nearest surface (ground or box) at time t."""
    boxes = self.tracks.at(self.road, t)
    local = boxes.local(points)
    half = boxes.half_extents
    q = np.abs(local) - half
    outside = np.linalg.norm(np.maximum(q, 0.0), axis=-1)
    inside = np.minimum(q.max(-1), 0.0)
    box_dist = np.abs(outside + inside).min(-1)
    return np.minimum(box_dist, np.abs(points[:, 2]))


class _Builder:
  """Accumulates tracks and booked road intervals while a layout is drawn."""

  def __init__(self, rng: np.random.Generator):
    self.rng = rng
    self.rows: list[dict] = []
    self.instances: list[Instance] = []
    self.booked: dict[str, list[tuple[float, float]]] = {}

  def free(self, band: str, lo: float, hi: float) -> bool:
    return all(hi < a or lo > b for a, b in self.booked.get(band, []))

  def book(self, band: str, lo: float, hi: float) -> None:
    self.booked.setdefault(band, []).append((lo, hi))

  def place(self, band, s_range, length, tries=30):
    """A free arc length in s_range for an object of this length on `band`, or None."""
    for _ in range(tries):
      s = float(self.rng.uniform(*s_range))
      lo, hi = s - length / 2 - 1.0, s + length / 2 + 1.0
      if self.free(band, lo, hi):
        self.book(band, lo, hi)
        return s
    return None

  def add(
    self,
    s0,
    d,
    size,
    occ_class,
    colour,
    speed=0.0,
    yaw_offset=0.0,
    z0=0.0,
    reflectivity=0.3,
    windows=False,
    category=None,
    attribute='',
  ):
    instance = -1
    if category is not None:
      instance = len(self.instances)
      self.instances.append(Instance(category, attribute, len(self.rows)))
    self.rows.append(
      dict(
        s0=s0,
        speed=speed,
        lateral=d,
        yaw_offset=yaw_offset,
        size=size,
        z0=z0,
        occ_class=occ_class,
        colour=colour,
        reflectivity=reflectivity,
        windows=windows,
        instance=instance,
      )
    )

  def add_object(self, category, s0, d, size, speed=0.0, yaw_offset=0.0, attribute=''):
    det = meta.CATEGORY_TO_DETECTION.get(category)
    colour = OTHERS_COLOUR if det is None else class_colour(det)
    shade = self.rng.uniform(0.85, 1.0)
    self.add(
      s0,
      d,
      size,
      meta.CATEGORY_TO_OCC3D.get(category, 0),
      colour * shade,
      speed=speed,
      yaw_offset=yaw_offset,
      reflectivity=0.5,
      category=category,
      attribute=attribute,
    )

  def tracks(self) -> Tracks:
    cols = {k: np.array([r[k] for r in self.rows]) for k in self.rows[0]}
    return Tracks(
      **{k: (v.astype(np.float64) if v.dtype.kind == 'f' else v) for k, v in cols.items()}
    )


# Typical sizes (w, l, h) in metres.
SIZES = {
  'vehicle.car': (1.9, 4.6, 1.7),
  'vehicle.truck': (2.5, 7.5, 3.1),
  'vehicle.bus.rigid': (2.9, 11.0, 3.4),
  'vehicle.trailer': (2.8, 11.5, 3.8),
  'vehicle.construction': (2.8, 6.2, 3.2),
  'vehicle.motorcycle': (0.8, 2.1, 1.5),
  'vehicle.bicycle': (0.6, 1.7, 1.2),
  'human.pedestrian.adult': (0.7, 0.7, 1.75),
  'human.pedestrian.child': (0.5, 0.5, 1.2),
  'human.pedestrian.construction_worker': (0.75, 0.75, 1.8),
  'movable_object.trafficcone': (0.4, 0.4, 1.0),
  'movable_object.barrier': (2.4, 0.5, 1.0),
  'movable_object.pushable_pullable': (0.7, 0.9, 1.1),
  'movable_object.debris': (0.9, 1.2, 0.4),
}


def _size(rng, category):
  return tuple(v * rng.uniform(0.92, 1.08) for v in SIZES[category])


def layout_scene(rng: np.random.Generator, origin_xy, duration: float) -> SceneLayout:
  """Draws one scene: road, every detection class near the ego's path, buildings and trees."""
  speed = float(rng.uniform(4.0, 7.0))
  radius = float(rng.uniform(120.0, 300.0))
  turn = float(rng.choice([-1.0, 1.0]))
  phi0 = float(rng.uniform(0, 2 * np.pi))
  centre = np.asarray(origin_xy, np.float64) - radius * np.array([np.cos(phi0), np.sin(phi0)])
  road = Road(centre=centre, radius=radius, turn=turn, phi0=phi0)
  travel = speed * duration
  b = _Builder(rng)

  # Same-direction traffic ahead in the ego lane, at the ego's speed (constant gaps).
  for category, s_range in (('vehicle.car', (13, 18)), ('vehicle.truck', (32, 40))):
    s0 = float(rng.uniform(*s_range))
    b.add_object(category, s0, 0.0, _size(rng, category), speed=speed, attribute='vehicle.moving')
  # Oncoming convoy, one speed, spaced so that the bus meets the ego mid-scene.
  v_on = float(rng.uniform(4.0, 7.0))
  s = travel / 2 + v_on * duration / 2 + float(rng.uniform(-5, 5))
  convoy = ['vehicle.bus.rigid', 'vehicle.motorcycle', 'vehicle.car']
  convoy += ['vehicle.car'] * int(rng.integers(0, 3))
  for category in convoy:
    size = _size(rng, category)
    attr = 'cycle.with_rider' if category == 'vehicle.motorcycle' else 'vehicle.moving'
    b.add_object(category, s, ONCOMING_LANE, size, speed=-v_on, yaw_offset=np.pi, attribute=attr)
    s += size[1] + float(rng.uniform(8, 16))
  # Parking lane: trailer behind, truck and cars ahead, cones between.
  for category, s_range, attr in [
    ('vehicle.trailer', (-24, -12), 'vehicle.parked'),
    ('vehicle.truck', (18, 30), 'vehicle.parked'),
    ('vehicle.car', (-10, 45), 'vehicle.parked'),
    ('vehicle.car', (-10, 45), 'vehicle.stopped'),
  ]:
    size = _size(rng, category)
    at = b.place('park', s_range, size[1])
    if at is not None:
      d = PARKING_LANE - (size[0] - 1.9) / 2
      b.add_object(category, at, d, size, attribute=attr)
  for _ in range(int(rng.integers(2, 5))):
    at = b.place('park', (4, 16), 0.4)
    if at is not None:
      b.add_object('movable_object.trafficcone', at, -5.1, _size(rng, 'movable_object.trafficcone'))
  # Construction vehicle on the left terrain, barriers along the right terrain edge.
  size = _size(rng, 'vehicle.construction')
  at = b.place('terrain_L', (5, 25), size[1])
  b.add_object(
    'vehicle.construction',
    at,
    11.5,
    size,
    attribute='vehicle.parked',
    yaw_offset=float(rng.uniform(-0.4, 0.4)),
  )
  at = b.place('terrain_R', (0, 15), 8.0)
  for i in range(int(rng.integers(2, 4))):
    b.add_object(
      'movable_object.barrier',
      at - 3 + 2.6 * i,
      -9.2,
      _size(rng, 'movable_object.barrier'),
      yaw_offset=np.pi / 2,
    )
  # Sidewalks: walkers on the inner half (one speed per side), standing things on the outer half.
  for side, direction in ((-1.0, 1.0), (1.0, -1.0)):
    v_walk = float(rng.uniform(1.0, 1.6))
    for i in range(int(rng.integers(1, 4))):
      category = 'human.pedestrian.child' if i == 2 else 'human.pedestrian.adult'
      s0 = float(rng.uniform(0, 6)) + 7.0 * i + (6.0 if side > 0 else 0.0)
      b.add_object(
        category,
        s0,
        side * 6.3,
        _size(rng, category),
        speed=direction * v_walk,
        yaw_offset=0.0 if direction > 0 else np.pi,
        attribute='pedestrian.moving',
      )
  band_items = [
    ('walk_L', 1.0, 'vehicle.bicycle', (2, 18), 'cycle.without_rider'),
    ('walk_R', -1.0, 'vehicle.bicycle', (8, 30), 'cycle.without_rider'),
    ('walk_R', -1.0, 'human.pedestrian.adult', (0, 25), 'pedestrian.standing'),
    ('walk_L', 1.0, 'human.pedestrian.construction_worker', (0, 25), 'pedestrian.standing'),
    ('walk_L', 1.0, 'movable_object.pushable_pullable', (-5, 30), ''),
    ('terrain_L', 1.0, 'movable_object.debris', (-5, 30), ''),
  ]
  for band, side, category, s_range, attr in band_items:
    size = _size(rng, category)
    at = b.place(band, s_range, size[1])
    if at is not None:
      d = side * (7.7 if band.startswith('walk') else 9.6)
      b.add_object(
        category, at, d, size, attribute=attr, yaw_offset=float(rng.choice([0.0, np.pi]))
      )

  # Trees on both terrain bands, buildings beyond.
  for side, band in ((-1.0, 'terrain_R'), (1.0, 'terrain_L')):
    s = -70.0
    while s < travel + 90:
      s += float(rng.uniform(7, 15))
      if not b.free(band, s - 2.5, s + 2.5):
        continue
      d = side * float(rng.uniform(10.5, 12.5))
      trunk_h = float(rng.uniform(1.8, 2.8))
      crown = float(rng.uniform(2.5, 4.0))
      b.add(s, d, (0.35, 0.35, trunk_h), 16, TRUNK_COLOUR, reflectivity=0.2)
      b.add(
        s,
        d,
        (crown, crown, float(rng.uniform(2.0, 3.5))),
        16,
        CANOPY_COLOUR,
        z0=trunk_h - 0.3,
        reflectivity=0.15,
        yaw_offset=float(rng.uniform(0, 1.5)),
      )
    s = -80.0
    while s < travel + 100:
      length, depth = float(rng.uniform(8, 22)), float(rng.uniform(8, 14))
      if rng.uniform() > 0.25:
        d = side * (float(rng.uniform(14.5, 18.0)) + depth / 2)
        tint = BUILDING_COLOUR * rng.uniform(0.8, 1.1)
        b.add(
          s + length / 2,
          d,
          (depth, length, float(rng.uniform(5, 18))),
          15,
          tint,
          reflectivity=0.35,
          windows=True,
        )
      s += length + float(rng.uniform(2, 8))
  return SceneLayout(road=road, ego_speed=speed, tracks=b.tracks(), instances=tuple(b.instances))
