"""Training batches from the nuscenes_occ records: grain, no TensorFlow.

A sample is a temporal queue (the reference's): for record i, three of the four previous records
i-4 .. i-1 chosen at random (one dropped, order kept, indices clamped at 0), then i itself.
Walking the queue, a frame whose scene differs from the previous frame's starts without history
(prev_bev_exists False, can_bus[0:3] and [17] zeroed); otherwise can_bus[0:3] and [17] become the
change since the previous frame of the queue (global-frame translation, yaw in degrees, no wrap).

Images stay uint8 BGR on the host (JPEG decoded straight to BGR), zero-padded bottom/right to a
multiple of 32; normalisation and augmentation happen on the device (`augment.py`). Batches are
flat dicts of numpy arrays (DESIGN section 4), with the tokens kept as bytes arrays for the host.

With worker processes, each worker writes a whole batch into one shared-memory block, decoding
its JPEGs in place, and reuses the block once the consumer has dropped the batch's image array
(`BatchBlocks`): a fresh block per batch would cost more in page faults than the decoding
itself, and grain's own transport would make one shared-memory file per array.
"""

import atexit
import contextlib
import dataclasses
import glob
import mmap
import os
import uuid
import weakref
import zlib

import grain
import numpy as np
import simplejpeg
import tensorflow_datasets as tfds
from absl import flags
from tensorflow_datasets.proto import tf_example_pb2

TARGETS = ('binary', 'occ3d', 'boxes')


def decode_jpeg(blob: bytes, out: np.ndarray | None = None) -> np.ndarray:
  """One JPEG -> [H, W, 3] uint8 BGR (libjpeg-turbo, accurate DCT and upsampling: the pixels of
  cv2.imdecode), decoded straight into `out` when given (C-contiguous, [H, W, 3] uint8)."""
  try:
    return simplejpeg.decode_jpeg(blob, colorspace='BGR', buffer=out, strict=False)
  except ValueError as e:
    raise ValueError(f'undecodable JPEG ({e})') from None


class BgrJpeg(tfds.decode.SkipDecoding):
  """Decodes a sequence of JPEG features straight to BGR uint8 (the reference reads BGR)."""

  def decode_batch_example_np(self, serialized):
    return [decode_jpeg(b) for b in serialized]


class JpegBytes(tfds.decode.SkipDecoding):
  """Keeps a sequence of JPEG features as their bytes (decoded later, where they are needed)."""

  def decode_batch_example_np(self, serialized):
    return list(serialized)


# The features each training target reads from the current frame.
TARGET_READS = {
  'binary': ('occ_binary',),
  'occ3d': ('occ_semantics', 'occ_mask_camera'),
  'boxes': ('gt_boxes', 'gt_labels', 'gt_valid'),
}
# What every frame of a queue reads.
FRAME_READS = ('images', 'lidar2img', 'ego2lidar', 'can_bus', 'scene_token', 'sample_token')


def open_source(data_dir: str, name: str, split: str, decode_images: bool = True):
  """The split's records by index, every feature decoded by TFDS; images as lists of BGR arrays
  (or of JPEG bytes)."""
  decoders = {'images': BgrJpeg() if decode_images else JpegBytes()}
  return tfds.data_source(name, data_dir=data_dir, split=split, download=False, decoders=decoders)


class RecordReader:
  """The split's records by index, only the named features decoded, read straight from the
  serialized tf.train.Example.

  TFDS's decoding walks every feature of a record (about 0.4 ms a record here, a tenth of a
  full-resolution sample's non-JPEG work); a queue frame needs five of them. Each feature is
  decoded as TFDS decodes it (tests compare the two on every record): images as their JPEG
  bytes, Text as bytes, tensors with BYTES or ZLIB encoding from their raw bytes, other tensors
  and scalars from their value lists.
  """

  def __init__(self, data_dir: str, name: str, split: str, keys: tuple[str, ...]):
    source = tfds.data_source(name, data_dir=data_dir, split=split, download=False)
    self._records = source.data_source  # the split's ArrayRecordDataSource
    features = source.dataset_info.features
    self._decoders = {}
    for key in keys:
      if key not in features:
        raise ValueError(f'{name} {split}: no feature {key!r} (it has {sorted(features)})')
      self._decoders[key] = _field_decoder(features[key], f'{name} feature {key!r}')

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    fields = tf_example_pb2.Example.FromString(self._records[index]).features.feature
    return {key: decode(fields[key]) for key, decode in self._decoders.items()}


def _field_decoder(feature, where: str):
  """A function of a tf.train.Feature giving what TFDS's numpy decoding gives for `feature`."""
  f = tfds.features
  if isinstance(feature, f.Sequence) and isinstance(feature.feature, f.Image):
    return lambda field: list(field.bytes_list.value)
  if isinstance(feature, f.Text):
    return lambda field: field.bytes_list.value[0]
  if isinstance(feature, f.Tensor) and not isinstance(feature, (f.Image, f.Sequence)):
    dtype = np.dtype(feature.np_dtype)
    shape = tuple(-1 if d is None else d for d in feature.shape)
    encoding = feature.to_json_content().encoding  # 'none', 'bytes' or 'zlib'
    if encoding in ('bytes', 'zlib'):
      if -1 in shape:
        raise ValueError(f'{where}: a {encoding}-encoded tensor of shape {feature.shape}')
      inflate = zlib.decompress if encoding == 'zlib' else bytes
      return lambda field: np.frombuffer(inflate(field.bytes_list.value[0]), dtype).reshape(shape)
    if not shape:  # as TFDS: a Python scalar
      return lambda field: np.asarray(_values(field)[0], dtype).item()
    return lambda field: np.asarray(_values(field), dtype).reshape(shape)
  raise ValueError(f'{where}: {type(feature).__name__} is not read by RecordReader')


def _values(field):
  return getattr(field, field.WhichOneof('kind')).value


def jpeg_size(blob: bytes) -> tuple[int, int]:
  """(height, width) of a JPEG from its frame header (SOFn marker), without decoding it."""
  data = memoryview(blob)
  i = 2  # after SOI
  while i + 9 <= len(data):
    if data[i] != 0xFF:
      break
    marker = data[i + 1]
    if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
      return int.from_bytes(data[i + 5 : i + 7], 'big'), int.from_bytes(data[i + 7 : i + 9], 'big')
    i += 2 + int.from_bytes(data[i + 2 : i + 4], 'big')
  raise ValueError('not a JPEG with a frame header')


def _pad_to(n: int, divisor: int) -> int:
  return -(-n // divisor) * divisor


def _frame_size(blob: bytes, where: str) -> tuple[int, int]:
  try:
    return jpeg_size(blob)
  except (ValueError, IndexError):
    raise ValueError(f'{where}: undecodable JPEG (no frame header)') from None


def decode_queue(
  jpegs: list, divisor: int = 32, out: np.ndarray | None = None, zero_padding: bool = True
) -> np.ndarray:
  """T frames of N JPEGs -> [T, N, H_pad, W_pad, 3] uint8 BGR, zero-padded bottom/right.

  Each image is decoded once, into its place in `out` (allocated when None; e.g. a slice of a
  batch in shared memory): straight into it when the width needs no padding, else through one
  reused scratch image. `zero_padding=False` leaves the padding of `out` as it is (for an `out`
  known to hold zeros there).
  """
  h, w = _frame_size(jpegs[0][0], 'frame 0 camera 0')
  shape = (len(jpegs), len(jpegs[0]), _pad_to(h, divisor), _pad_to(w, divisor), 3)
  if out is None:
    out = np.empty(shape, np.uint8)
  elif out.shape != shape or out.dtype != np.uint8:
    raise ValueError(f'decode_queue: out is {out.dtype}{list(out.shape)}, the queue needs {shape}')
  if zero_padding:
    out[:, :, h:] = 0
    out[:, :, :h, w:] = 0
  scratch = None if out[0, 0, :h, :w].flags.c_contiguous else np.empty((h, w, 3), np.uint8)
  for t, frame in enumerate(jpegs):  # T x N = 24 images
    for n, blob in enumerate(frame):
      where = f'frame {t} camera {n}'
      size = _frame_size(blob, where)
      if size != (h, w):
        raise ValueError(f'{where}: {(*size, 3)}, frame 0 camera 0 has {(h, w, 3)}')
      try:
        if scratch is None:
          decode_jpeg(blob, out[t, n, :h, :w])
        else:
          out[t, n, :h, :w] = decode_jpeg(blob, scratch)
      except ValueError as e:
        raise ValueError(f'{where}: {e}') from None
  return out


_SHM_DIR = '/dev/shm'
_BLOCK_PREFIX = 'uniscene_batch'
_HEADER = 64  # byte 0 of a block: 1 from the worker's filling it until the consumer lets go


@dataclasses.dataclass(frozen=True)
class SharedBatch:
  """What a worker sends for a batch: the block holding it, the images' shape (at the block's
  start) and the other arrays' places, (key, dtype, shape, byte offset) each."""

  path: str
  shape: tuple[int, ...]
  arrays: tuple[tuple[str, str, tuple[int, ...], int], ...]


class BatchBlocks:
  """A worker's shared-memory blocks (files in /dev/shm, mapped), reused for batch after batch.

  A block is busy from `take` until the consuming process drops the image array it handed out
  (`_Attached.batch`). The first attach removes the block's name, so nothing is left behind once
  both processes are gone. A worker that exits removes the names of its free blocks; a busy one
  may be a batch still on its way (a worker exits once it has produced its last batch, possibly
  before that batch is attached), so it is left to the consuming process, which attaches it or
  removes the blocks named after its pid when it exits. Only if that process is gone already
  does the worker remove them all.
  """

  def __init__(self):
    self.blocks = []  # [path, mmap, layout of its last batch]
    self.parent = os.getppid()
    atexit.register(self.close)

  def take(self, nbytes: int, layout=None) -> tuple[str, np.ndarray, bool]:
    """A free block of `nbytes` (after the header), marked busy: (path, its bytes, whether it
    is new (all zeros) or last held a batch of the same `layout`, so that whatever that batch
    left untouched, such as image padding, is still zero)."""
    size = _HEADER + nbytes
    free = [entry for entry in self.blocks if len(entry[1]) == size and entry[1][0] == 0]
    same = [entry for entry in free if entry[2] == layout]
    if free:
      entry = (same or free)[0]
      path, block, untouched = entry[0], entry[1], bool(same)
      entry[2] = layout
    else:
      path = os.path.join(_SHM_DIR, f'{_BLOCK_PREFIX}_{os.getppid()}_{uuid.uuid4().hex}')
      fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
      try:
        os.ftruncate(fd, size)
        block = mmap.mmap(fd, size)
      finally:
        os.close(fd)
      self.blocks.append([path, block, layout])
      untouched = True  # a new file reads as zeros
    block[0] = 1
    return path, np.frombuffer(block, np.uint8, nbytes, _HEADER), untouched

  def close(self):
    parent_alive = os.getppid() == self.parent
    for path, block, _ in self.blocks:
      if parent_alive and block[0] != 0:  # busy: the consuming process attaches or sweeps it
        continue
      with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

  @staticmethod
  def supported() -> bool:
    return os.path.isdir(_SHM_DIR) and os.access(_SHM_DIR, os.W_OK)


def _release(block: mmap.mmap):
  block[0] = 0


class _Attached:
  """The consuming process's side of `BatchBlocks`: each block mapped once, its images handed
  out as an array that frees the block when it (and every view of it) is gone."""

  def __init__(self):
    self.blocks = {}

  def batch(self, shared: SharedBatch) -> dict:
    """The batch: 'img' a view of the block, the other (small) arrays copied out of it."""
    block = self.blocks.get(shared.path)
    if block is None:
      fd = os.open(shared.path, os.O_RDWR)
      try:
        block = mmap.mmap(fd, 0)
      finally:
        os.close(fd)
      os.unlink(shared.path)  # both processes map it now
      self.blocks[shared.path] = block
    batch = {
      key: np.ndarray(shape, dtype, buffer=block, offset=_HEADER + offset).copy()
      for key, dtype, shape, offset in shared.arrays
    }
    images = np.ndarray(shared.shape, np.uint8, buffer=block, offset=_HEADER)
    weakref.finalize(images, _release, block)
    batch['img'] = images
    return batch


_orphan_sweep_registered = []


def _remove_orphan_blocks(pid: int):
  for path in glob.glob(os.path.join(_SHM_DIR, f'{_BLOCK_PREFIX}_{pid}_*')):
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)


class QueueBatch:
  """grain batch function: stacks the samples' arrays and decodes their queues' JPEGs (the 'img'
  entry, left undecoded by `TemporalQueue(decode_images=False)`) straight into the batch's image
  array. In worker processes grain asks for shared-memory output: the whole batch is then
  written into one reused `BatchBlocks` block, the images decoded in place, and sent as a
  `SharedBatch` (no per-sample image array, no copy into the batch, none out of the worker, no
  fresh pages, and none of grain's per-array shared-memory files)."""

  def __init__(self, divisor: int = 32):
    self.divisor = divisor
    self.shared_memory = False
    self._blocks = None  # per worker process

  def __getstate__(self):
    return {'divisor': self.divisor, 'shared_memory': self.shared_memory, '_blocks': None}

  def enable_shared_memory_output(self):
    self.shared_memory = True

  def __call__(self, samples):
    queues = [s['img'] for s in samples]
    h, w = _frame_size(queues[0][0][0], 'sample 0 frame 0 camera 0')
    shape = (
      len(queues),
      len(queues[0]),
      len(queues[0][0]),
      _pad_to(h, self.divisor),
      _pad_to(w, self.divisor),
      3,
    )
    batch = {k: np.stack([s[k] for s in samples]) for k in samples[0] if k != 'img'}
    zero_padding = True
    if self.shared_memory and BatchBlocks.supported():
      if self._blocks is None:
        self._blocks = BatchBlocks()
      places, end = [], _pad_to(int(np.prod(shape)), 64)
      for key, value in batch.items():
        places.append((key, value.dtype.str, value.shape, end))
        end = _pad_to(end + value.nbytes, 64)
      # Only the images' pixels are ever written in their part of a block: one that held a
      # batch of this shape (or none) has zero padding already, 3 MB a sample at 1600 x 900.
      path, data, clean = self._blocks.take(end, (shape, h, w))
      zero_padding = not clean
      for (_, _, _, offset), value in zip(places, batch.values(), strict=True):
        data[offset : offset + value.nbytes] = value.reshape(-1).view(np.uint8)
      images = data[: int(np.prod(shape))].reshape(shape)
      batch = SharedBatch(path, shape, tuple(places))
    elif self.shared_memory:
      from grain.multiprocessing import SharedMemoryArray

      images = batch['img'] = SharedMemoryArray(shape, dtype=np.uint8)
    else:
      images = batch['img'] = np.empty(shape, np.uint8)
    for b, queue in enumerate(queues):
      decode_queue(queue, self.divisor, images[b], zero_padding)
    return batch


class Loader:
  """A grain DataLoader whose iterators turn `SharedBatch`es back into dicts of arrays.
  `iter(loader)` has get_state() / set_state() for exact resumption."""

  def __init__(self, loader: grain.DataLoader):
    self.loader = loader

  def __iter__(self):
    return _LoaderIterator(iter(self.loader))


class _LoaderIterator:
  def __init__(self, iterator):
    self.iterator = iterator
    self.attached = _Attached()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self.iterator)
    if isinstance(batch, SharedBatch):
      batch = self.attached.batch(batch)
    return batch

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)


def queue_indices(index: int, rng: np.random.Generator, queue_length: int = 4) -> list[int]:
  """History of record `index` as the reference draws it, then `index` itself."""
  history = list(range(index - queue_length, index))
  rng.shuffle(history)
  history = sorted(history[1:])
  return [max(0, i) for i in history] + [index]


def queue_deltas(can_bus: np.ndarray, scene_tokens) -> tuple[np.ndarray, np.ndarray]:
  """(can_bus [T, 18] with the queue's deltas, prev_bev_exists [T]) from absolute vectors."""
  out = np.array(can_bus, np.float64, copy=True)
  exists = np.zeros(len(out), bool)
  for t in range(len(out)):  # T = 4 frames
    if t > 0 and scene_tokens[t] == scene_tokens[t - 1]:
      exists[t] = True
      out[t, :3] -= can_bus[t - 1, :3]
      out[t, 17] -= can_bus[t - 1, 17]
    else:
      out[t, :3] = 0.0
      out[t, 17] = 0.0
  return out, exists


def pad_images(images, divisor: int = 32) -> np.ndarray:
  """List of N [H, W, 3] uint8 -> [N, H_pad, W_pad, 3], zero-padded bottom/right."""
  h, w = images[0].shape[:2]
  out = np.zeros((len(images), _pad_to(h, divisor), _pad_to(w, divisor), 3), np.uint8)
  for n, image in enumerate(images):  # six cameras
    if image.shape != images[0].shape:
      raise ValueError(f'camera {n}: image {image.shape}, camera 0 has {images[0].shape}')
    out[n, :h, :w] = image
  return out


def detection_targets(record: dict, max_boxes: int, box_range) -> dict:
  """A record's ground truth as the detector trains on it, padded to `max_boxes`.

  As the reference's loading: boxes of the 10 detection classes (label >= 0) with lidar or radar
  points (gt_valid) whose centre lies inside the BEV range in x and y (lidar frame).
  Returns gt_boxes float32 [max_boxes, 9] (lidar frame, bottom centre), gt_labels int32
  [max_boxes] (-1 = padding).
  """
  boxes = np.asarray(record['gt_boxes'], np.float32).reshape(-1, 9)
  labels = np.asarray(record['gt_labels']).reshape(-1)
  x0, y0, _, x1, y1, _ = box_range
  keep = (labels >= 0) & np.asarray(record['gt_valid'], bool).reshape(-1)
  keep &= (boxes[:, 0] > x0) & (boxes[:, 0] < x1) & (boxes[:, 1] > y0) & (boxes[:, 1] < y1)
  n = int(keep.sum())
  if n > max_boxes:
    raise ValueError(
      f'sample {record["sample_token"]}: {n} ground-truth boxes, more than '
      f'data.max_boxes={max_boxes}; raise it'
    )
  out_boxes = np.zeros((max_boxes, 9), np.float32)
  out_labels = np.full((max_boxes,), -1, np.int32)
  out_boxes[:n], out_labels[:n] = boxes[keep], labels[keep]
  return {'gt_boxes': out_boxes, 'gt_labels': out_labels}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  data_dir: str
  name: str = 'nuscenes_occ/mini'
  split: str = 'train'
  queue_length: int = 4  # frames per sample: queue_length - 1 history frames, then the current
  target: str = 'binary'  # 'binary' (UniScene labels), 'occ3d' (semantics + camera mask), 'boxes'
  max_boxes: int = 256  # 'boxes': ground truth padded to this many per sample
  box_range: tuple[float, ...] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)  # 'boxes': x, y filter
  batch_size: int = 1  # per process
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  worker_count: int = 0
  worker_buffer_size: int = 2
  image_pad_divisor: int = 32


class TemporalQueue(grain.transforms.RandomMap):
  """Record index -> one training sample (the queue of frames and the current frame's target).

  With `decode_images=False` the sample's 'img' is the queue's JPEG bytes (T tuples of N), for
  `QueueBatch` to decode into the batch.
  """

  def __init__(self, config: PipelineConfig, decode_images: bool = True):
    if config.target not in TARGETS:
      raise ValueError(f'PipelineConfig.target must be one of {TARGETS}, got {config.target!r}')
    self.config = config
    self.decode_images = decode_images
    self._source = None  # opened lazily: each worker process opens its own
    self._history = None  # the same records, without the target features

  def __getstate__(self):
    return {
      'config': self.config,
      'decode_images': self.decode_images,
      '_source': None,
      '_history': None,
    }

  def random_map(self, index, rng: np.random.Generator) -> dict:
    cfg = self.config
    if self._source is None:
      reads = FRAME_READS + TARGET_READS[cfg.target]
      self._source = RecordReader(cfg.data_dir, cfg.name, cfg.split, reads)
      self._history = RecordReader(cfg.data_dir, cfg.name, cfg.split, FRAME_READS)
    indices = queue_indices(int(index), rng, cfg.queue_length)
    frames = [self._history[i] for i in indices[:-1]] + [self._source[indices[-1]]]
    current = frames[-1]
    jpegs = tuple(tuple(f['images']) for f in frames)
    can_bus, exists = queue_deltas(
      np.stack([f['can_bus'] for f in frames]), [f['scene_token'] for f in frames]
    )
    sample = {
      'img': decode_queue(jpegs, cfg.image_pad_divisor) if self.decode_images else jpegs,
      'lidar2img': np.stack([f['lidar2img'] for f in frames]).astype(np.float32),
      'ego2lidar': np.stack([f['ego2lidar'] for f in frames]).astype(np.float32),
      'can_bus': can_bus.astype(np.float32),
      'prev_bev_exists': exists,
      'sample_token': np.bytes_(current['sample_token']),
      'scene_token': np.bytes_(current['scene_token']),
    }
    if cfg.target == 'boxes':
      sample.update(detection_targets(current, cfg.max_boxes, cfg.box_range))
    elif cfg.target == 'binary':
      sample['occ_target'] = current['occ_binary']
    else:
      sample['occ_target'] = current['occ_semantics']
      sample['occ_mask_camera'] = current['occ_mask_camera']
    return sample


def make_loader(config: PipelineConfig, process_index: int = 0, process_count: int = 1) -> Loader:
  """A loader over this process's shard of the split, shuffled by `config.seed`.

  Iterating it gives batches of `config.batch_size` samples; `iter(loader)` has get_state() /
  set_state() for exact resumption.
  """
  num_records = len(open_source(config.data_dir, config.name, config.split))
  if config.worker_count and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's workers read its absl flags (defaults outside absl.app)
  sampler = grain.samplers.IndexSampler(
    num_records=num_records,
    shard_options=grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count, drop_remainder=True
    ),
    shuffle=config.shuffle,
    num_epochs=config.num_epochs,
    seed=config.seed,
  )
  if config.worker_count and not _orphan_sweep_registered:
    atexit.register(_remove_orphan_blocks, os.getpid())
    _orphan_sweep_registered.append(True)
  loader = grain.DataLoader(
    data_source=grain.sources.RangeDataSource(0, num_records, 1),
    sampler=sampler,
    operations=[
      TemporalQueue(config, decode_images=False),
      grain.transforms.Batch(
        batch_size=config.batch_size,
        drop_remainder=True,
        batch_fn=QueueBatch(config.image_pad_divisor),
      ),
    ],
    worker_count=config.worker_count,
    worker_buffer_size=config.worker_buffer_size,
    # The data source yields record indices: reading threads would only contend for the GIL.
    read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0),
  )
  return Loader(loader)
