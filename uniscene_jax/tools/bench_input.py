r"""Benchmark: input pipeline samples/s against the raw JPEG-decode bound of the same cores.

    python -m uniscene_jax.tools.bench_input [--world DIR] [--workers 2] [--samples 48]

Without --world it writes a 1600 x 900 synthetic world (2 scenes x 8 key frames). The world is
built into nuscenes_occ/mini in a temporary directory; then, in one run:
  bound     the same number of samples' JPEGs (queue of 4 frames x 6 cameras = 24 per sample)
            decoded to BGR by `--workers` processes, nothing else, with each of two decoders:
            cv2.imdecode (a fresh array per image, the last one kept alive as a consumer keeps
            it) and libjpeg-turbo through simplejpeg into one reused array; the faster is the bound;
  pipeline  the training loader (grain, `--workers` worker processes): record reads, the
            temporal queue, 24 decodes, padding and batching.
The faster decoder's bound and the pipeline are then measured in alternating rounds; the result is
the median of the rounds' ratios.
Run from the repository root.
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import shutil
import tempfile
import time

import cv2
import numpy as np


def _decode_cv2(blobs) -> int:
  image = None
  for b in blobs:
    image = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
  del image
  return len(blobs)


def _decode_turbo(blobs) -> int:
  import simplejpeg

  h, w = simplejpeg.decode_jpeg_header(blobs[0])[:2]
  out = np.empty((h, w, 3), np.uint8)
  for b in blobs:
    simplejpeg.decode_jpeg(b, colorspace='BGR', buffer=out)
  return len(blobs)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--world', help='a synthetic world root (default: write one at 1600 x 900)')
  p.add_argument('--workers', type=int, default=2)
  p.add_argument('--samples', type=int, default=96, help='samples per measurement')
  p.add_argument('--rounds', type=int, default=5, help='alternating bound / pipeline rounds')
  args = p.parse_args(argv)
  from absl import flags, logging

  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.ERROR)
  import tensorflow_datasets as tfds

  from data_builders.nuscenes_occ import nuscenes_occ_dataset_builder as nbuilder
  from uniscene_jax.data import input_pipeline as ip
  from uniscene_jax.data import synthetic_world

  tmp = tempfile.mkdtemp(prefix='bench_input_')
  try:
    _bench(args, tmp, tfds, nbuilder, ip, synthetic_world)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _bench(args, tmp, tfds, nbuilder, ip, synthetic_world):
  world = args.world
  if world is None:
    world = os.path.join(tmp, 'world')
    options = synthetic_world.WorldOptions(samples_per_scene=8, image_size=(1600, 900))
    synthetic_world.write_world(world, options, workers=args.workers)
  data_dir = os.path.join(tmp, 'tfds')
  nbuilder.Builder(data_dir=data_dir, config='mini').download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=world)
  )
  # The JPEG bytes of as many queue samples as the pipeline will produce.
  import glob

  from array_record.python.array_record_data_source import ArrayRecordDataSource
  from tensorflow_datasets.proto import tf_example_pb2

  files = sorted(glob.glob(os.path.join(data_dir, 'nuscenes_occ/mini/*/*train.array_record*')))
  raw = ArrayRecordDataSource(files)
  frames = []
  for i in range(len(raw)):
    example = tf_example_pb2.Example.FromString(raw[i])
    frames.append(list(example.features.feature['images'].bytes_list.value))
  queue = 4
  per_sample = [
    sum((frames[(i + k) % len(frames)] for k in range(queue)), []) for i in range(args.samples)
  ]
  ctx = multiprocessing.get_context('spawn')
  cfg = ip.PipelineConfig(
    data_dir=data_dir, batch_size=1, seed=0, worker_count=args.workers, worker_buffer_size=4
  )
  h, w = cv2.imdecode(np.frombuffer(frames[0][0], np.uint8), cv2.IMREAD_COLOR).shape[:2]
  rates, ratios = {}, []
  decoders = {'cv2.imdecode': _decode_cv2, 'simplejpeg': _decode_turbo}
  with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
    for name, fn in decoders.items():
      list(pool.map(fn, per_sample[: 2 * args.workers]))  # start the workers, warm up
      start = time.perf_counter()
      decoded = sum(pool.map(fn, per_sample))
      rates[name] = args.samples / (time.perf_counter() - start)
    best = max(rates, key=rates.get)
    it = iter(ip.make_loader(cfg))
    for _ in range((cfg.worker_buffer_size + 2) * args.workers):  # workers started, blocks made
      next(it)
    # A machine's speed can drift by several per cent over seconds: bound and pipeline are
    # measured in alternating rounds, each ratio against the bound measured just before it.
    # The pipeline's workers must be idle during a bound round (their buffers full: 20 samples
    # with 2 workers), and the timed pipeline round starts once those buffers are drained again
    # (steady state).
    print(
      f'{w} x {h} images, queue {queue}, {decoded // args.samples} JPEG decodes per sample, '
      f'{args.workers} worker processes, {os.cpu_count()} cores'
    )
    for name, r in rates.items():
      print(f'raw decode, {name + ":":14s} {r:6.2f} samples/s')
    for round_ in range(args.rounds):
      time.sleep(2.0)  # the workers fill their buffers (under a second), then idle
      start = time.perf_counter()
      sum(pool.map(decoders[best], per_sample))
      bound = args.samples / (time.perf_counter() - start)
      _drain(it, 0.5 / rates[best])
      start = time.perf_counter()
      for _ in range(args.samples):
        batch = next(it)
      rate = args.samples / (time.perf_counter() - start)
      ratios.append(rate / bound)
      print(
        f'round {round_ + 1}: raw decode bound ({best}) {bound:6.2f} samples/s, '
        f'input pipeline {rate:6.2f} samples/s ({rate / bound * 100:.0f}% of the bound)'
      )
      images = batch['img'].shape, batch['img'].dtype
      del batch  # releases its shared-memory block for the workers
  print(
    f'input pipeline: median {np.median(ratios) * 100:.0f}% of the raw decode bound over '
    f'{args.rounds} rounds; batch img {images[0]} {images[1]}'
  )


def _drain(it, wait: float) -> None:
  """Takes batches until one is not ready (taking it waits more than `wait` s): the workers'
  buffers are empty and every worker is busy."""
  while True:
    start = time.perf_counter()
    next(it)
    if time.perf_counter() - start > wait:
      return


if __name__ == '__main__':
  main()
