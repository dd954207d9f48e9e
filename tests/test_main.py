"""main.py as a user runs it: flags, training to the end, evaluation, resumption, bad flags."""

import json
import os
import subprocess
import sys

import pytest

from configs import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  return subprocess.run(
    [sys.executable, 'main.py', *args],
    cwd=ROOT,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    capture_output=True,
    text=True,
    timeout=900,
  )


@pytest.mark.slow(seconds=60)
def test_main_pretrains_semantically_evaluates_and_names_bad_flags(tfds_dir, tmp_path):
  cfg = pretrain.get_config('test,semantic')
  assert cfg.data.target == 'occ3d' and cfg.model.num_classes == 18
  assert cfg.loss.kind == 'focal' and cfg.loss.use_camera_mask
  workdir = str(tmp_path / 'run')
  common = ['--config=configs/pretrain.py:test,semantic', f'--workdir={workdir}']

  bad = _main(*common, f'--data_dir={tfds_dir}', '--config.model.no_such_field=1')
  assert bad.returncode != 0 and 'no_such_field' in bad.stderr
  assert not os.path.exists(workdir)  # refused before anything was written

  run = _main(*common, f'--data_dir={tfds_dir}')
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'train: 100%' in run.stderr and '2/2' in run.stderr  # the progress bar ran to the end
  metrics = json.loads(open(os.path.join(workdir, 'metrics.json')).read())
  assert [m['step'] for m in metrics] == [1, 2] and all(m['finite'] for m in metrics)
  result = json.loads(open(os.path.join(workdir, 'eval_val_step2.json')).read())
  assert result['frames'] == 9 and 0 <= result['miou'] <= 100
  assert len(result['iou']) == 18 and 'driveable_surface' in result['table']
  assert 'driveable_surface' in run.stdout and 'mIoU' in run.stdout  # the table is printed
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2']
  assert any(f.startswith('events.out') for f in os.listdir(os.path.join(workdir, 'tensorboard')))

  again = _main(*common, f'--data_dir={tfds_dir}', '--mode=eval')
  assert again.returncode == 0, again.stderr[-3000:]
  assert (
    json.loads(open(os.path.join(workdir, 'eval_val_step2.json')).read())['miou']
    == (result['miou'])
  )
