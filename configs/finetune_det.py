r"""3D detection fine-tuning: BEVFormer-base on nuScenes, initialised from occupancy pre-training.

    python main.py --config=configs/finetune_det.py --workdir=W --config.init_from=PRETRAIN_W
    python main.py --config=configs/finetune_det.py --mode=eval --workdir=W   # mAP, NDS, table

The network is the reference's BEVFormer-base: the pre-training model's backbone, neck and BEV
encoder (their 857 tensors load from a pre-training workdir or .pth by name), with the BEV in the
lidar frame and the previous BEV's reference shifted in its own slot only, and a 6-layer
detection decoder of 900 object queries with box refinement (fresh). Training as the reference's
bevformer_base: the 10 nuScenes classes, ground truth with lidar or radar points inside the BEV
range, Hungarian matching and focal + L1 losses on every decoder layer, AdamW 2e-4 (backbone 0.1x),
cosine over 24 epochs, queue of 4 frames, photometric distortion and GridMask.

Presets (`:name`) as in pre-training: base (default), local (laptop-sized, the synthetic world, a
50 x 50 BEV, 100 queries, 2 decoder layers), tiny (smaller still, for tests),
test (tiny for two steps with evaluation: a smoke run).
"""

import ml_collections

from configs import common, pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, _ = pretrain.parse_preset(arg, (), 'configs/finetune_det.py')
  c = pretrain.get_config(preset)
  c.config_module = 'configs.finetune_det'
  c.data.target = 'boxes'
  # Ground truth per sample after the range and class filters; at most detection.num_query.
  c.data.max_boxes = 256
  c.loss.kind = 'detection'
  c.eval_score_threshold = 0.0  # decoded boxes at or below it are not written; 0 keeps all 300
  m = c.model
  m.arch = 'det'
  m.bev_frame = 'lidar'
  m.inplace_shift = False  # BEVFormer shifts the previous BEV's slot only
  m.detection = ml_collections.ConfigDict()
  m.detection.num_query = 900
  m.detection.num_layers = 6
  m.detection.num_classes = len(common.DETECTION_CLASSES)
  if preset in pretrain.SMALL_SIZES:
    c.data.max_boxes = 64  # the synthetic world has about 20 per sample
    m.detection.num_query = 100
    m.detection.num_layers = m.num_layers
  if preset in ('tiny', 'test'):
    m.detection.num_query = 64
  return c
