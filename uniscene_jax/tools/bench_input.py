r"""Benchmark: input pipeline samples/s against the raw JPEG-decode bound of the same cores.

    python -m uniscene_jax.tools.bench_input [--world DIR] [--workers 2] [--samples 48]

Without --world it writes a 1600 x 900 synthetic world (2 scenes x 8 key frames). The world is
built into nuscenes_occ/mini in a temporary directory; then, in one run:
  bound     the same number of samples' JPEGs (queue of 4 frames x 6 cameras = 24 per sample)
            decoded to BGR with cv2 by `--workers` processes, nothing else;
  pipeline  the training loader (grain, `--workers` worker processes): record reads, the
            temporal queue, 24 decodes, padding and batching.
Run from the repository root.
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import tempfile
import time

import cv2
import numpy as np


def _decode_all(blobs) -> int:
  for b in blobs:
    cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
  return len(blobs)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--world', help='a synthetic world root (default: write one at 1600 x 900)')
  p.add_argument('--workers', type=int, default=2)
  p.add_argument('--samples', type=int, default=48)
  args = p.parse_args(argv)
  from absl import flags, logging

  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.ERROR)
  import tensorflow_datasets as tfds

  from data_builders.nuscenes_occ import nuscenes_occ_dataset_builder as nbuilder
  from uniscene_jax.data import input_pipeline as ip
  from uniscene_jax.data import synthetic_world

  tmp = tempfile.mkdtemp(prefix='bench_input_')
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
  with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
    list(pool.map(_decode_all, per_sample[:2]))  # start the workers
    start = time.perf_counter()
    decoded = sum(pool.map(_decode_all, per_sample))
    bound = args.samples / (time.perf_counter() - start)
  h, w = cv2.imdecode(np.frombuffer(frames[0][0], np.uint8), cv2.IMREAD_COLOR).shape[:2]

  cfg = ip.PipelineConfig(
    data_dir=data_dir, batch_size=1, seed=0, worker_count=args.workers, worker_buffer_size=4
  )
  it = iter(ip.make_loader(cfg))
  for _ in range(2 * args.workers):  # warm-up: workers started, buffers filled once
    next(it)
  start = time.perf_counter()
  for _ in range(args.samples):
    batch = next(it)
  rate = args.samples / (time.perf_counter() - start)
  print(
    f'{w} x {h} images, queue {queue}, {decoded // args.samples} JPEG decodes per sample, '
    f'{args.workers} worker processes, {os.cpu_count()} cores'
  )
  print(f'raw decode bound: {bound:6.2f} samples/s')
  print(
    f'input pipeline:   {rate:6.2f} samples/s ({rate / bound * 100:.0f}% of the bound); '
    f'batch img {batch["img"].shape} {batch["img"].dtype}'
  )


if __name__ == '__main__':
  main()
