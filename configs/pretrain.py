r"""UniScene pre-training: BEVFormer-base encoder + occupancy head on multi-sweep binary occupancy.

    python main.py --config=configs/pretrain.py --workdir=W --data_dir=D
    python main.py --config=configs/pretrain.py:local --workdir=W   # the synthetic world, 2 cores

Presets (`:name`):
  base   the reference recipe: R101-DCN + FPN, BEV 200 x 200 x 256, 6 layers, 928 x 1600 inputs,
         queue 4, global batch 8, AdamW 2e-4, 24 epochs (default).
  local  the same network scaled down to train on a laptop CPU in minutes: small backbone and
         channels, a 50 x 50 BEV (targets max-pooled 4 x 4), the synthetic world's images.
  tiny   like local, smaller still: for tests and smoke runs.
  test   tiny for two steps with a checkpoint each and the evaluation: a smoke run.
  semantic  18-class Occ3D targets instead of binary occupancy: the BEV covers the Occ3D grid
         ([-40, 40] m, 0.4 m cells), focal loss over camera-visible voxels. Combines with a
         size: `:local,semantic`.
Any field can be overridden: --config.model.dtype=bfloat16 --config.batch_size=16.
"""

import ml_collections

from configs import common

SIZES = ('base', 'local', 'tiny', 'test')  # all but base fit the synthetic world
SMALL_SIZES = SIZES[1:]


def parse_preset(arg: str | None, flags: tuple[str, ...], name: str) -> tuple[str, tuple[str, ...]]:
  """'local,semantic' -> ('local', ('semantic',)): at most one size, then any of `flags`."""
  parts = [p for p in (arg or 'base').split(',') if p]
  sizes = [p for p in parts if p in SIZES]
  if len(sizes) > 1 or any(p not in SIZES + flags for p in parts):
    raise ValueError(f'{name}: unknown preset {arg!r}; a size of {SIZES} and any of {flags}')
  return (sizes[0] if sizes else 'base'), tuple(p for p in parts if p not in SIZES)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, flags = parse_preset(arg, ('semantic',), 'configs/pretrain.py')
  c = ml_collections.ConfigDict()
  c.preset = arg or 'base'
  c.config_module = 'configs.pretrain'  # whose presets the embedded-default fallback applies
  c.seed = 0
  c.batch_size = 8  # global, over all devices of all processes
  c.num_steps = 0  # 0: optim.num_epochs epochs
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.init_from = ''  # a workdir or a PyTorch .pth (FCOS3D, BEVFormer, UniScene)
  c.init_fresh = ()  # parameter paths containing any of these stay as initialised (new layers)
  c.eval_at_end = True  # the val split's metrics after training
  c.eval_every_steps = 0  # > 0: also every so many steps (a checkpoint is saved there)

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = 'data/tfds'
  c.data.nuscenes_root = 'data/nuscenes'  # the devkit's dataroot (detection evaluation only)
  c.data.name = 'nuscenes_occ/trainval'
  c.data.train_split = 'train'
  c.data.val_split = 'val'
  c.data.queue_length = 4
  c.data.image_size = (900, 1600)  # (height, width) of the camera images
  c.data.target = 'binary'  # 'binary' (UniScene) or 'occ3d' (18 classes)
  c.data.target_pool = 1  # > 1: binary targets max-pooled in x, y to match a coarser BEV
  c.data.worker_count = 4

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = 'focal'  # 'focal' (UniScene: sigmoid focal per class channel) or 'cross_entropy'
  c.loss.use_camera_mask = False  # weight voxels by the Occ3D camera mask (occ3d targets only)

  c.augment = ml_collections.ConfigDict()
  c.augment.photometric = True
  c.augment.grid_mask = True
  c.augment.grid_mask_prob = 0.7

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 2e-4
  c.optim.weight_decay = 0.01
  c.optim.backbone_lr_mult = 0.1
  c.optim.grad_clip_norm = 35.0
  c.optim.num_epochs = 24
  c.optim.warmup_steps = 500

  m = c.model = ml_collections.ConfigDict()
  m.dtype = 'float32'
  m.num_cams = len(common.CAMERA_NAMES)
  m.pc_range = common.PC_RANGE
  m.bev_h = common.BEV_H
  m.bev_w = common.BEV_W
  m.embed_dims = 256
  m.num_layers = 6
  m.num_heads = 8
  m.ffn_dims = 512
  m.num_points_in_pillar = 4
  m.dropout = 0.1
  m.bev_frame = 'ego'
  m.inplace_shift = True  # the pre-training code's in-place ref_2d shift (model_spec 7.1)
  m.rotate_prev_bev = True
  m.sca_capacity = 12800  # visible queries per camera in SCA (checked); 0 = all, masked
  m.remat_encoder = False
  m.pillar_h = 16
  m.occ_out_dim = 32
  m.num_classes = 2
  m.bn_group_size = 1  # occupancy BatchNorm statistics per sample, as 8 GPUs x 1
  m.backbone_depth = 101
  m.backbone_blocks = ()  # () = the depth's standard blocks per stage
  m.backbone_base_width = 64  # planes of stage 1 (outputs 4x, doubling per stage)
  m.dcn_stages = (False, False, True, True)
  m.frozen_stages = 1
  m.remat_backbone = False
  m.fpn_relu_before_first_extra_conv = False  # the reference's P6 has no ReLU (model_spec 5)

  if 'semantic' in flags:
    use_occ3d_grid(c)
  if preset in SMALL_SIZES:
    c.data.name = 'nuscenes_occ/mini'
    c.data.target_pool = 4  # a 50 x 50 BEV of 2 m cells; targets max-pooled to match
    m.bev_h = m.bev_w = 50
    c.data.image_size = (225, 400)  # the synthetic world's default images
    c.data.worker_count = 0
    c.batch_size = 1
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    c.optim.warmup_steps = 20
    c.optim.learning_rate = 2e-3  # the small network learns in minutes only at a higher rate
    m.embed_dims = 32
    m.num_heads = 4
    m.ffn_dims = 64
    m.num_layers = 2
    m.occ_out_dim = 16
    m.backbone_blocks = (1, 1, 1, 1)
    m.backbone_base_width = 8
    # At most 650 of the 2,500 queries fall in one camera's view (the synthetic rig, the widest
    # camera, either grid and frame), as at base: a third of the SCA work of every query.
    m.sca_capacity = 800
    m.dropout = 0.0
  if preset in ('tiny', 'test'):
    c.data.queue_length = 2
    c.num_steps = 4
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    m.num_layers = 1
  if preset == 'test':  # a smoke run: two steps, a checkpoint each, evaluation
    c.num_steps = 2
    c.log_every_steps = c.checkpoint_every_steps = 1
  return c


def use_occ3d_grid(c: ml_collections.ConfigDict) -> None:
  """18-class Occ3D targets: the BEV spans the Occ3D grid, so that logits and labels align."""
  c.data.target = 'occ3d'
  c.loss.use_camera_mask = True
  m = c.model
  m.pc_range = common.OCC3D_RANGE
  m.num_classes = len(common.OCC3D_CLASSES)
  m.pillar_h = common.OCC3D_SHAPE[2]
