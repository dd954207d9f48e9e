r"""Benchmark: does occupancy pre-training help fine-tuning? (The paper's claim in miniature.)

    python -m uniscene_jax.tools.bench_finetune [--task occ|det] [--root DIR] [--num_scenes 10] \
        [--pretrain_steps 300] [--finetune_steps 150] [--preset local] [--data_dir D]

1. Writes a synthetic world of --num_scenes scenes (mini splits: all but two are train) and builds
   its dataset, unless --data_dir holds a nuscenes_occ/mini build.
2. Pre-trains `configs/pretrain.py:<preset>` on the train split's binary occupancy (no labels).
3. Fine-tunes `configs/finetune_occ.py:<preset>` on the Occ3D labels (--task occ) or
   `configs/finetune_det.py:<preset>` on the boxes (--task det) twice with the same seed and
   steps: from the pre-trained workdir, and from scratch.
4. Prints the val split's Occ3D mIoU (or nuScenes mAP and NDS) of both, with the tables.
Everything goes under --root (a new temporary directory by default); an existing pre-training
workdir there is reused. Run from the repository root.
"""

import argparse
import json
import os
import tempfile
import time


def _build(root: str, num_scenes: int) -> str:
  import tensorflow_datasets as tfds

  from data_builders.nuscenes_occ import nuscenes_occ_dataset_builder as nbuilder
  from uniscene_jax.data import synthetic_world
  from uniscene_jax.train import dataset_status

  world, tfds_dir = os.path.join(root, 'world'), os.path.join(root, 'tfds')
  if dataset_status(tfds_dir, 'nuscenes_occ/mini') == 'ready':
    return tfds_dir
  if not os.path.isfile(os.path.join(world, 'synthetic_world.json')):
    synthetic_world.write_world(
      world, synthetic_world.WorldOptions(num_scenes=num_scenes), overwrite=True
    )
  nbuilder.Builder(data_dir=tfds_dir, config='mini').download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=world)
  )
  return tfds_dir


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--task', default='occ', choices=('occ', 'det'))
  p.add_argument('--root', default='')
  p.add_argument('--num_scenes', type=int, default=10)
  p.add_argument('--pretrain_steps', type=int, default=300)
  p.add_argument('--finetune_steps', type=int, default=150)
  p.add_argument('--preset', default='local', choices=('local', 'tiny'))
  p.add_argument('--data_dir', default='')
  p.add_argument('--nuscenes_root', default='', help='with --data_dir, for --task det')
  args = p.parse_args(argv)
  from absl import logging

  from configs import finetune_det, finetune_occ, pretrain
  from uniscene_jax import train
  from uniscene_jax.checkpoint import Checkpoints

  logging.set_verbosity(logging.WARNING)
  root = args.root or tempfile.mkdtemp(prefix='bench_finetune_')
  t0 = time.time()
  data_dir = args.data_dir or _build(root, args.num_scenes)
  print(f'data: {data_dir} ({time.time() - t0:.0f} s)', flush=True)

  def run(config, name, steps):
    config.num_steps = steps
    config.checkpoint_every_steps = steps
    config.log_every_steps = 10
    start = time.time()
    workdir = os.path.join(root, name)
    result = train.train_and_evaluate(config, workdir, data_dir)
    print(f'{name}: {steps} steps in {time.time() - start:.0f} s', flush=True)
    return workdir, result

  pre = pretrain.get_config(args.preset)
  pre.eval_at_end = False
  pre_dir = os.path.join(root, 'pretrain')
  if Checkpoints(pre_dir).latest_step() != args.pretrain_steps:
    run(pre, 'pretrain', args.pretrain_steps)
  results = {}
  module = finetune_occ if args.task == 'occ' else finetune_det
  metric = 'miou' if args.task == 'occ' else 'NDS'
  for name, init in (('pretrained', pre_dir), ('scratch', '')):
    cfg = module.get_config(args.preset)
    cfg.init_from = init
    cfg.data.nuscenes_root = args.nuscenes_root or os.path.join(root, 'world', 'nuscenes')
    workdir, _ = run(cfg, f'{args.task}_from_{name}', args.finetune_steps)
    step = args.finetune_steps
    with open(os.path.join(workdir, f'eval_{cfg.data.val_split}_step{step}.json')) as f:
      results[name] = json.load(f)
  what = 'Occ3D, 18 classes' if args.task == 'occ' else 'nuScenes boxes, 10 classes'
  print(
    f'\npreset {args.preset}: pre-training {args.pretrain_steps} steps (binary occupancy), '
    f'fine-tuning {args.finetune_steps} steps ({what}), val split'
  )
  for name, r in results.items():
    print(f'\nfrom {name}: {metric} {r[metric]:.4f}\n{r["table"]}')
  a, b = results['pretrained'][metric], results['scratch'][metric]
  print(f'\n{metric} from pre-trained {a:.4f} vs from scratch {b:.4f} ({a - b:+.4f}); under {root}')


if __name__ == '__main__':
  main()
