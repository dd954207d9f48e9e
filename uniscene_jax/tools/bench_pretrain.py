r"""Benchmark: does short pre-training on the synthetic world learn occupancy? One run.

    python -m uniscene_jax.tools.bench_pretrain [--preset tiny] [--steps 300] [--data_dir D]

Trains the preset from scratch for --steps steps on the synthetic world (built into the cache on
first use, as main.py does), then prints the loss over the first and last tenth of the run and the
val split's occupancy IoU next to the IoU of predicting every voxel free. Run from the repository
root.
"""

import argparse
import tempfile

import numpy as np


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='tiny')
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--data_dir', default='')
  p.add_argument('--workdir', default='')
  args = p.parse_args(argv)
  from absl import logging

  from configs import pretrain
  from uniscene_jax import train

  logging.set_verbosity(logging.WARNING)
  cfg = pretrain.get_config(args.preset)
  cfg.num_steps = args.steps
  cfg.log_every_steps = 10
  cfg.checkpoint_every_steps = args.steps
  cfg.eval_at_end = False
  workdir = args.workdir or tempfile.mkdtemp(prefix='bench_pretrain_')
  data_dir = train.prepare_data(cfg, args.data_dir or None)
  run = train.train_and_evaluate(cfg, workdir, data_dir)
  from uniscene_jax import evaluate

  result = evaluate.evaluate(cfg, workdir, data_dir)
  losses = np.array([m['loss_occ'] for m in run.metrics])
  tenth = max(1, len(losses) // 10)
  print(f'preset {args.preset}, {args.steps} steps, batch {cfg.batch_size}, workdir {workdir}')
  print(f'loss: first tenth {losses[:tenth].mean():.5f} -> last tenth {losses[-tenth:].mean():.5f}')
  print(
    f'val occupied IoU {result["iou_occupied"] * 100:.2f}, mIoU {result["miou"]:.2f} '
    f'vs all-free mIoU {result["all_free_miou"]:.2f}'
  )


if __name__ == '__main__':
  main()
