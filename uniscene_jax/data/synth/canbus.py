"""CAN bus expansion files of a synthetic scene (`can_bus/<scene>_<message>.json`).

Signals are the exact kinematics of the ego's constant-speed arc: velocity along ego x, centripetal
acceleration along ego y plus gravity along z, yaw rate about z. Message keys are written in the
real files' alphabetical order, which the reference relies on when it flattens a pose message.
"""

import numpy as np

from uniscene_jax.data import nuscenes_meta as meta
from uniscene_jax.data.synth import transforms
from uniscene_jax.data.synth.world import SceneLayout

RATES_HZ = {
  'ms_imu': 100,
  'pose': 50,
  'steeranglefeedback': 100,
  'vehicle_monitor': 2,
  'zoesensors': 100,
  'zoe_veh_info': 100,
}
WHEELBASE = 2.588
STEERING_RATIO = 15.3
GRAVITY = 9.81


def _times(start_us: int, end_us: int, hz: int) -> np.ndarray:
  step = 1_000_000 // hz
  return np.arange(start_us - start_us % step, end_us + step, step, dtype=np.int64)


def messages(layout: SceneLayout, scene_start_us: int, start_us: int, end_us: int) -> dict:
  """Every CAN message list of one scene over [start_us, end_us], plus `route` and `meta`."""
  v = layout.ego_speed
  omega = layout.ego_yaw_rate()
  steer = float(np.arctan(WHEELBASE * omega / v))  # front-wheel angle, rad
  out: dict = {}
  for name in meta.CAN_MESSAGES:
    rows = []
    for utime in _times(start_us, end_us, RATES_HZ[name]):
      t = (int(utime) - scene_start_us) / 1e6
      pos, yaw = layout.ego_pose(t)
      quat = transforms.yaw_quaternion(yaw)
      accel = [0.0, v * omega, GRAVITY]
      rate = [0.0, 0.0, omega]
      u = int(utime)
      if name == 'pose':
        row = {
          'accel': accel,
          'orientation': quat,
          'pos': [float(x) for x in pos],
          'rotation_rate': rate,
          'utime': u,
          'vel': [v, 0.0, 0.0],
        }
      elif name == 'ms_imu':
        row = {'linear_accel': accel, 'q': quat, 'rotation_rate': rate, 'utime': u}
      elif name == 'steeranglefeedback':
        row = {'utime': u, 'value': steer * STEERING_RATIO}
      elif name == 'vehicle_monitor':
        row = {
          'available_distance': 120,
          'battery_level': 80,
          'brake': 0,
          'brake_switch': 1,
          'gear_position': 7,
          'left_signal': 0,
          'rear_left_rpm': v / 0.3 * 60 / (2 * np.pi),
          'rear_right_rpm': v / 0.3 * 60 / (2 * np.pi),
          'right_signal': 0,
          'steering': np.rad2deg(steer) * STEERING_RATIO,
          'steering_speed': 0,
          'throttle': 80,
          'utime': u,
          'vehicle_speed': v * 3.6,
        }
      elif name == 'zoesensors':
        row = {
          'brake_sensor': 0.17,
          'steering_sensor': steer * STEERING_RATIO,
          'throttle_sensor': 0.2,
          'utime': u,
        }
      else:  # zoe_veh_info
        kmh = v * 3.6
        row = {
          'FL_wheel_speed': kmh,
          'FR_wheel_speed': kmh,
          'RL_wheel_speed': kmh,
          'RR_wheel_speed': kmh,
          'left_solar': 0,
          'longitudinal_accel': 0.0,
          'meanEffTorque': 20,
          'odom': int(v * (t + 60) * 100),
          'odom_speed': kmh,
          'pedal_cc': 80,
          'regen': 0,
          'requestedTorqueAfterProc': 20,
          'right_solar': 0,
          'steer_corrected': np.rad2deg(steer) * STEERING_RATIO,
          'steering_angle_deg': np.rad2deg(steer) * STEERING_RATIO,
          'transversal_accel': v * omega,
          'utime': u,
        }
      rows.append(
        {k: (float(x) if isinstance(x, float | np.floating) else x) for k, x in row.items()}
      )
    out[name] = rows
  s = np.arange(-50.0, layout.ego_speed * (end_us - scene_start_us) / 1e6 + 100.0, 5.0)
  out['route'] = [[float(x), float(y)] for x, y in layout.road.xy(s, 0.0)]
  out['meta'] = {
    name: _stats(rows, RATES_HZ[name]) for name, rows in out.items() if name != 'route'
  }
  return out


def _stats(rows: list[dict], hz: int) -> dict:
  stats = {'message_count': len(rows), 'message_freq': hz}
  for key in rows[0]:
    if key == 'utime':
      continue
    values = np.asarray([r[key] for r in rows], np.float64)
    stats[key] = {
      'min': values.min(0).tolist(),
      'max': values.max(0).tolist(),
      'mean': values.mean(0).tolist(),
    }
  return stats
