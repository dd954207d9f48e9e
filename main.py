r"""Entry point: pre-training, fine-tuning and evaluation.

    python main.py --config=configs/pretrain.py[:preset] --workdir=W [--data_dir=D] \
        [--mode=train|eval] [--config.field=value ...]
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'configs/<task>.py[:preset]', lock_config=True)
flags.DEFINE_string('workdir', None, 'checkpoints and metrics go here; an existing run resumes')
flags.DEFINE_string(
  'data_dir', None, 'TFDS data_dir holding nuscenes_occ (else config.data.data_dir)'
)
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'train (resumes if possible) or evaluate')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from uniscene_jax import sharding

  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # library INFO lines would bury the progress bar
  sharding.maybe_initialize_distributed()
  if FLAGS.mode == 'train':
    from uniscene_jax import train

    try:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.data_dir)
    except train.NonFiniteError as e:
      sys.exit(f'error: {e}')
  else:
    from uniscene_jax import evaluate

    evaluate.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.data_dir)


if __name__ == '__main__':
  app.run(main)
