r"""Benchmark: records per second of the nuscenes_occ build, in-process and on Beam, one run.

    python -m uniscene_jax.tools.bench_build [--world DIR] [--workers N] [--skip_plain]

Without --world it writes the default synthetic world (2 scenes x 9 key frames) to a temporary
directory. Three builds of the `mini` config, each into a fresh data dir: in-process with every
binary label computed, the same with labels precomputed by the occupancy label command
(N worker processes, timed separately), and the Beam DirectRunner with N worker processes.
Run from the repository root (the builder lives in data_builders/).
"""

import argparse
import os
import shutil
import tempfile
import time


def _build(manual_dir: str, data_dir: str, beam_workers: int = 0) -> float:
  import tensorflow_datasets as tfds

  from data_builders.nuscenes_occ import nuscenes_occ_dataset_builder as nbuilder

  beam_options = None
  if beam_workers:
    from apache_beam.options.pipeline_options import PipelineOptions

    beam_options = PipelineOptions(
      flags=[
        '--runner=DirectRunner',
        f'--direct_num_workers={beam_workers}',
        '--direct_running_mode=multi_processing',
      ]
    )
  start = time.perf_counter()
  nbuilder.Builder(data_dir=data_dir, config='mini').download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, beam_options=beam_options)
  )
  return time.perf_counter() - start


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--world', help='root written by uniscene_jax.data.synthetic_world')
  p.add_argument('--workers', type=int, default=2)
  p.add_argument('--skip_plain', action='store_true', help='only the Beam build')
  args = p.parse_args(argv)
  from absl import logging

  from uniscene_jax.data import occupancy_labels, synthetic_world

  logging.set_verbosity(logging.ERROR)
  tmp = tempfile.mkdtemp()
  root = os.path.join(tmp, 'world')
  if args.world:
    shutil.copytree(args.world, root)  # label files get written into the copy
  else:
    synthetic_world.write_world(root, workers=args.workers)
  dataroot = os.path.join(root, 'nuscenes')
  from nuscenes.nuscenes import NuScenes

  n = len(NuScenes('v1.0-mini', dataroot, verbose=False).sample)
  rows = []
  if not args.skip_plain:
    seconds = _build(root, os.path.join(tmp, 'plain'))
    rows.append(('in-process, labels computed', seconds))
  seconds = _build(root, os.path.join(tmp, 'beam'), beam_workers=args.workers)
  rows.append((f'Beam DirectRunner, {args.workers} workers, labels computed', seconds))
  start = time.perf_counter()
  occupancy_labels.write_dataset_labels(dataroot, 'v1.0-mini', workers=args.workers)
  rows.append((f'label command alone, {args.workers} workers', time.perf_counter() - start))
  if not args.skip_plain:
    seconds = _build(root, os.path.join(tmp, 'plain_precomputed'))
    rows.append(('in-process, labels precomputed', seconds))
  print(f'{n} key frames (train + val), {os.cpu_count()} cores')
  for name, seconds in rows:
    print(f'{name:48s} {seconds:7.2f} s  {n / seconds:6.2f} records/s')
  shutil.rmtree(tmp)


if __name__ == '__main__':
  main()
