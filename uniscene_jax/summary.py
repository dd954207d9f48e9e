"""TensorBoard event files (scalars and images) without TensorFlow, and occupancy top views."""

import io
import os

import numpy as np


class SummaryWriter:
  """Writes <logdir>/events.out.tfevents.* readable by TensorBoard; only where `enabled`."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter

      os.makedirs(logdir, exist_ok=True)
      self._writer = EventFileWriter(logdir)

  def _add(self, step: int, value) -> None:
    import time

    from tensorboard.compat.proto import event_pb2, summary_pb2

    event = event_pb2.Event(wall_time=time.time(), step=int(step))
    event.summary.CopyFrom(summary_pb2.Summary(value=[value]))
    self._writer.add_event(event)

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    from tensorboard.compat.proto import summary_pb2

    for tag, v in values.items():
      self._add(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(v)))

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, 3]."""
    if not self.enabled:
      return
    from PIL import Image
    from tensorboard.compat.proto import summary_pb2

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='PNG')
    h, w = image.shape[:2]
    encoded = summary_pb2.Summary.Image(
      height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue()
    )
    self._add(step, summary_pb2.Summary.Value(tag=tag, image=encoded))

  def flush(self) -> None:
    if self.enabled:
      self._writer.flush()

  def close(self) -> None:
    if self.enabled:
      self._writer.close()


def top_view(occupancy: np.ndarray, free_label: int = 0) -> np.ndarray:
  """uint8 [Y, X, 3] picture of an [X, Y, Z] grid seen from above.

  Each column shows the height of its highest non-free voxel (dark = low, bright = high), black
  where the column is free. Row 0 of the picture is the far left (largest y), so the ego's
  forward direction (x) points right.
  """
  occ = np.asarray(occupancy) != free_label
  z = occ.shape[2]
  top = np.where(occ.any(2), z - np.argmax(occ[:, :, ::-1], 2), 0)  # 1..Z, 0 = empty
  shade = (top.astype(np.float32) / z * 215 + 40) * (top > 0)
  picture = np.stack([shade * 0.55, shade * 0.85, shade], -1).astype(np.uint8)
  return picture.transpose(1, 0, 2)[::-1]
