r"""Semantic occupancy fine-tuning on Occ3D-nuScenes (BEVFormer-Occ, 18 classes) from pre-training.

    python main.py --config=configs/finetune_occ.py --workdir=W --config.init_from=PRETRAIN_W
    python main.py --config=configs/finetune_occ.py --mode=eval --workdir=W   # mIoU table

The network is the pre-training one (R101-DCN + FPN, BEVFormer-base encoder, occupancy head)
with an 18-class predicter, its BEV spanning the Occ3D grid ([-40, -40, -1, 40, 40, 5.4] m,
200 x 200 x 16 voxels of 0.4 m), trained with the Occ3D baseline's loss: softmax cross-entropy
over the voxels the cameras see. `init_from` (a pre-training workdir or a .pth) loads every
tensor of the same path and shape; the predicter's last layer (2 -> 18 classes) starts fresh.

Presets (`:name`) as in pre-training: base (default), local (laptop-sized, the synthetic world,
a 50 x 50 BEV with targets pooled 4 x 4), tiny (smaller still, for tests),
test (tiny for two steps with evaluation: a smoke run).
"""

import ml_collections

from configs import pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, _ = pretrain.parse_preset(arg, (), 'configs/finetune_occ.py')
  c = pretrain.get_config(preset)
  c.config_module = 'configs.finetune_occ'
  pretrain.use_occ3d_grid(c)
  c.loss.kind = 'cross_entropy'  # the Occ3D baseline's CrossEntropyLoss (softmax)
  c.init_fresh = ('predicter_2',)  # the class layer: 2 classes in pre-training, 18 here
  return c
