"""Byte-for-byte reproducible writers (JSON, npz, JPEG, PNG) for the synthetic world."""

import io
import json
import os
import zipfile

import cv2
import numpy as np

# np.savez stamps the wall-clock time into each zip entry; a fixed date keeps files reproducible.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f, indent=1)


def write_npz_compressed(path: str, **arrays: np.ndarray) -> None:
  """Same archive as np.savez_compressed (np.load reads it), with fixed timestamps."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as zf:
    for name, arr in arrays.items():
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
      info = zipfile.ZipInfo(name + '.npy', date_time=_ZIP_DATE)
      info.compress_type = zipfile.ZIP_DEFLATED
      zf.writestr(info, buf.getvalue())


def write_jpeg(path: str, rgb: np.ndarray, quality: int) -> None:
  ok, data = cv2.imencode(
    '.jpg', np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality]
  )
  if not ok:
    raise RuntimeError(f'JPEG encoding failed for {path}')
  _write_bytes(path, data.tobytes())


def write_png(path: str, image: np.ndarray) -> None:
  ok, data = cv2.imencode('.png', image)
  if not ok:
    raise RuntimeError(f'PNG encoding failed for {path}')
  _write_bytes(path, data.tobytes())


def write_points(path: str, points: np.ndarray) -> None:
  """A .pcd.bin lidar file: little-endian float32 (x, y, z, intensity, ring) per point."""
  _write_bytes(path, np.ascontiguousarray(points, dtype='<f4').tobytes())


def _write_bytes(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)
