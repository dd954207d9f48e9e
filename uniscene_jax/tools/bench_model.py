r"""Benchmark: the whole pre-training train step, JAX against the PyTorch twin, in one run.

    python -m uniscene_jax.tools.bench_model [--preset base] [--queue 4] [--repeats 3]
        [--skip_torch] [--skip_run] [--quick] [--image_size H W] [--variants ...]
        [--memory_scheduler] [--run_dtype auto] [--run_remat auto] [--twin_remat auto]
        [--twin_only]

Three parts, on the configs/pretrain.py preset (default `base`: 6 cameras of 900 x 1600 padded to
928 x 1600, R101-DCN + FPN, BEV 200 x 200 x 256, 6 encoder layers, queue 4, one sample):

1. Compile and memory, without running anything. The train step of `train.make_train_step` (the
   one `main.py` runs: augmentation, the queue forward with the history frames under
   stop_gradient, the focal loss, the backward, clipping and AdamW, with the state donated) is
   lowered on abstract inputs and compiled for float32 and bfloat16 (config.model.dtype), each
   with remat off and on (config.model.remat_backbone and remat_encoder together). XLA's buffer
   assignment gives, per device: temp (all intermediates, one arena), arguments (state + batch),
   outputs (new state + metrics) and alias (outputs written into donated arguments). The peak is
   temp + arguments + outputs - alias: the state is counted once, as the donated step runs.
   The compile time is that of `lower` (tracing) plus `compile` (XLA). --variants picks the
   variants; --memory_scheduler compiles with XLA:CPU's memory-optimised scheduler (the default
   scheduler favours concurrency). --quick uses the tiny preset at queue 2; --image_size scales
   the camera images (with everything else of the preset kept) when the full size cannot run.
2. Run time. One configuration (default: float32 without remat if its compiled peak fits in the
   available RAM, otherwise with remat, otherwise bfloat16) is run on random inputs with a
   camera rig of the nuScenes kind: one warm-up step, then the median of --repeats timed steps.
   The PyTorch twin (tests/reference/uniscene_torch.py, loaded with the same weights) does the
   same work in a child process: the history frames under torch.no_grad in eval mode, the current
   frame forward with the occupancy BatchNorm in train mode (the backbone's stays frozen), the
   focal loss (tests/reference/occupancy_torch.py), the backward, gradient clipping and AdamW,
   with the stem, layer1 and every backbone BatchNorm frozen as in the reference. The twin has no
   dropout and no augmentation; both cost little. With remat in the JAX run (or --twin_remat on)
   the twin recomputes the same units in its backward pass: each trainable backbone block and
   each encoder layer, with torch.utils.checkpoint (mmdet's with_cp); without it the twin's step
   does not fit in 24 GB at base size. The child runs under an address-space limit
   (the available RAM less a margin); if the train step does not fit there, it reports the
   forward alone (all frames under no_grad) instead, and says so.
   --twin_only runs the twin alone (with recompute unless --twin_remat off), from the same
   initial weights, for a twin step too long to run in the same session as the JAX one; the JAX
   process then holds no compiled step while the twin runs.
3. A table of all figures, with the goals: JAX time at most 0.5 x the twin's, peak at most 14 GB
   (float32) and 8 GB (bfloat16), compile at most 90 s.

JAX and torch use the same CPU cores (XLA's thread pool and torch's intra-op threads, all cores
by default). Timings on a shared machine are noisy: the load average is printed with them.
Run from the repository root (the twin lives in tests/reference/). GB = 1e9 bytes.
"""

import argparse
import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

GB = 1e9
VARIANTS = ('float32', 'float32_remat', 'bfloat16', 'bfloat16_remat')
GOAL_RATIO = 0.5
GOAL_PEAK = {'float32': 14.0, 'bfloat16': 8.0}
GOAL_COMPILE = 90.0
REFERENCE_PEAK = 28.5
STEPS_PER_EPOCH = 3517  # nuScenes train / 8 samples per step; only shapes the schedule

# nuScenes-like rig: camera yaw (degrees, 0 = forward, positive to the left) and focal length in
# pixels at 1600 columns.
CAMERA_YAWS = (0.0, -55.0, 55.0, 180.0, -110.0, 110.0)
FOCAL_AT_1600 = 1266.0


@dataclasses.dataclass
class CompileResult:
  dtype: str
  remat: bool
  lower_s: float
  compile_s: float
  temp: int
  argument: int
  output: int
  alias: int
  compiled: object = None

  @property
  def peak(self) -> int:
    return self.temp + self.argument + self.output - self.alias


def load_average() -> str:
  return ' '.join(f'{x:.2f}' for x in os.getloadavg())


def available_bytes() -> int:
  with open('/proc/meminfo') as f:
    for line in f:
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) * 1024
  return 0


def experiment_config(preset: str, queue: int, dtype: str, remat: bool):
  from configs import pretrain

  cfg = pretrain.get_config(preset)
  cfg.data.queue_length = queue
  cfg.batch_size = 1
  cfg.model.dtype = dtype
  cfg.model.remat_backbone = remat
  cfg.model.remat_encoder = remat
  return cfg


def camera_rig(num_cams: int, padded_hw: tuple[int, int], valid_hw: tuple[int, int]):
  """lidar2img [N, 4, 4] of cameras around the car and ego2lidar [4, 4].

  Frames: x forward, y left, z up. The cameras sit 0.5 m ahead of and 0.3 m below the lidar,
  which sits 0.9 m ahead of and 1.8 m above the ego origin.
  """
  h, w = valid_hw
  f = FOCAL_AT_1600 * w / 1600.0
  k = np.eye(4)
  k[:3, :3] = [[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]]
  mats = []
  for i in range(num_cams):
    yaw = np.radians(CAMERA_YAWS[i % len(CAMERA_YAWS)])
    c, s = np.cos(yaw), np.sin(yaw)
    # camera axes (x right, y down, z forward) in the lidar frame, as columns
    rot = np.stack([[s, -c, 0.0], [0.0, 0.0, -1.0], [c, s, 0.0]], 1)
    cam2lidar = np.eye(4)
    cam2lidar[:3, :3] = rot
    cam2lidar[:3, 3] = [0.5, 0.0, -0.3]
    mats.append(k @ np.linalg.inv(cam2lidar))
  ego2lidar = np.eye(4)
  ego2lidar[:3, 3] = [-0.9, 0.0, -1.8]
  del padded_hw
  return np.asarray(mats, np.float32), ego2lidar.astype(np.float32)


def make_batch(cfg, seed: int = 0) -> dict:
  """A random batch of one queue, as the input pipeline gives it (uint8 images, padded)."""
  from uniscene_jax.models.config import padded_size

  rng = np.random.default_rng(seed)
  b, t, m = cfg.batch_size, cfg.data.queue_length, cfg.model
  valid = tuple(cfg.data.image_size)
  ph, pw = padded_size(valid)
  img = np.zeros((b, t, m.num_cams, ph, pw, 3), np.uint8)
  img[..., : valid[0], : valid[1], :] = rng.integers(
    0, 256, (b, t, m.num_cams, *valid, 3), dtype=np.uint8
  )
  lidar2img, ego2lidar = camera_rig(m.num_cams, (ph, pw), valid)
  can = np.zeros((b, t, 18), np.float32)
  can[:, :, :2] = rng.normal(0, 2.0, (b, t, 2))  # about 4 m between frames
  can[:, 0, :3] = 0.0  # the first frame of a queue starts a scene
  can[:, :, 16] = rng.uniform(0, 2 * np.pi, (b, 1))
  can[:, 1:, 17] = rng.uniform(-5, 5, (b, t - 1))
  exists = np.ones((b, t), bool)
  exists[:, 0] = False
  grid = 200  # the label grid, whatever the BEV size (target_pool maps it)
  return {
    'img': img,
    'lidar2img': np.broadcast_to(lidar2img, (b, t, *lidar2img.shape)).copy(),
    'ego2lidar': np.broadcast_to(ego2lidar, (b, t, 4, 4)).copy(),
    'can_bus': can,
    'prev_bev_exists': exists,
    'occ_target': (rng.random((b, grid, grid, m.pillar_h)) < 0.1).astype(np.uint8),
  }


def build_step(cfg):
  """(jitted donated step, abstract state, init function, model config)."""
  import jax

  from uniscene_jax import models, optim, train

  mc = models.model_config_from(cfg)
  model = models.build_model(mc)
  abstract_params = jax.eval_shape(lambda: models.init_variables(mc, jax.random.key(0))['params'])
  tx = optim.make_optimizer(train.optim_config(cfg), STEPS_PER_EPOCH, abstract_params)
  init = jax.jit(lambda k: train.create_train_state(mc, tx, k))
  abstract_state = jax.eval_shape(init, jax.random.key(cfg.seed))
  step = jax.jit(train.make_train_step(model, tx, cfg), donate_argnums=(0,))
  return step, abstract_state, init, mc


MEMORY_SCHEDULER = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}


def compile_step(cfg, keep: bool, compiler_options=None) -> CompileResult:
  import jax

  step, abstract_state, _, _ = build_step(cfg)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_batch(cfg))
  t0 = time.perf_counter()
  lowered = step.lower(abstract_state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile(compiler_options=compiler_options)
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  return CompileResult(
    cfg.model.dtype,
    bool(cfg.model.remat_backbone),
    t1 - t0,
    t2 - t1,
    int(m.temp_size_in_bytes),
    int(m.argument_size_in_bytes),
    int(m.output_size_in_bytes),
    int(m.alias_size_in_bytes),
    compiled if keep else None,
  )


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)), times


def time_jax(cfg, compiled, repeats: int):
  """Runs the compiled step: one warm-up, then `repeats` timed steps. -> (median, times, loss,
  variables of the initial state as numpy for the twin)."""
  import jax

  _, _, init, _ = build_step(cfg)
  state = init(jax.random.key(cfg.seed))
  variables = jax.tree.map(np.asarray, {'params': state.params, 'batch_stats': state.batch_stats})
  batch = jax.device_put(make_batch(cfg))
  box = {'state': state}

  def run():
    box['state'], metrics = compiled(box['state'], batch)
    jax.block_until_ready((box['state'], metrics))
    return metrics

  warm_start = time.perf_counter()
  metrics = run()
  warm = time.perf_counter() - warm_start
  med, times = _median_time(run, repeats)
  loss = float(metrics['loss_occ'])
  box.clear()
  return med, times, warm, loss, variables


# ----------------------------------------------------------------------------------------------
# The PyTorch twin, in a child process (address-space limit, its own peak memory).


def _torch_child(spec_path: str) -> None:
  """Entry point of the child: reads the spec, runs the twin, prints one JSON line."""
  spec = json.loads(open(spec_path).read())
  limit = spec['limit_bytes']
  if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  try:
    result = _torch_run(spec)
  except Exception as e:  # noqa: BLE001 - reported to the parent
    result = {'error': _describe(e)}
  result['peak_rss_bytes'] = peak_rss_bytes()
  print('TORCH_RESULT ' + json.dumps(result), flush=True)


def peak_rss_bytes() -> int:
  """This process's resident-set high-water mark (VmHWM; ru_maxrss would include the parent's
  when read in a child process)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  return 0


def _describe(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:200] if text else ""}'


def _out_of_memory(e: BaseException) -> bool:
  # torch reports a failed allocation as a RuntimeError naming the allocator
  return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and 'alloc' in str(e).lower())


def _torch_model(spec):
  import torch

  from tests.reference.uniscene_torch import UniSceneOccTorch
  from uniscene_jax import models

  cfg = experiment_config(spec['preset'], spec['queue'], 'float32', False)
  if spec['image_size']:
    cfg.data.image_size = tuple(spec['image_size'])
  mc = models.model_config_from(cfg)
  twin = UniSceneOccTorch(
    mc.backbone.stage_blocks,
    mc.backbone.base_width,
    mc.backbone.stage_with_dcn,
    mc.head.encoder,
    mc.head.occupancy,
    mc.head.num_cams,
  )
  weights = np.load(spec['weights'])
  twin.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files}, strict=True)
  twin.set_checkpointing(spec['checkpointing'])
  # The reference's frozen tensors: stem, layer1 and every backbone BatchNorm.
  backbone = twin.img_backbone
  frozen = [backbone.conv1, backbone.bn1, backbone.layer1]
  frozen += [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for module in frozen:
    for p in module.parameters():
      p.requires_grad_(False)
  return cfg, twin


def _torch_run(spec) -> dict:
  import torch

  from tests.reference.occupancy_torch import focal_loss_torch
  from uniscene_jax.data import augment

  cfg, twin = _torch_model(spec)
  batch = make_batch(cfg)
  # The network input as the JAX step builds it, without the random augmentation.
  vh, vw = cfg.data.image_size
  img = batch.pop('img').astype(np.float32)
  img[..., :vh, :vw, :] -= np.asarray(augment.MEAN_BGR, np.float32)
  img = torch.from_numpy(np.ascontiguousarray(img.transpose(0, 1, 2, 5, 3, 4)))
  lidar2img = torch.from_numpy(batch['lidar2img'])
  ego2lidar = torch.from_numpy(batch['ego2lidar'])
  can = batch['can_bus'].astype(np.float64)
  exists = list(batch['prev_bev_exists'][0])
  target = batch['occ_target']
  f = cfg.data.target_pool
  if f > 1:  # as train.pool_target: a coarse cell is occupied if any of its cells is
    b, x, y, z = target.shape
    target = target.reshape(b, x // f, f, y // f, f, z).max((2, 4))
  labels = torch.from_numpy(target.astype(np.int64))
  trainable = [p for p in twin.parameters() if p.requires_grad]
  named = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
  groups = [  # the reference's lr_mult 0.1 on img_backbone
    {'params': [p for n, p in named if 'img_backbone' in n], 'lr': 2e-5},
    {'params': [p for n, p in named if 'img_backbone' not in n], 'lr': 2e-4},
  ]
  opt = torch.optim.AdamW(groups, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

  def train_step():
    twin.eval()  # dropout off, frozen backbone BatchNorm; history frames under no_grad inside
    twin.pts_bbox_head.transformer.decoder.train()  # occupancy BatchNorm: batch statistics
    opt.zero_grad(set_to_none=True)
    logits, _ = twin(img, lidar2img, ego2lidar, can, exists)
    loss = focal_loss_torch(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 35.0)
    opt.step()
    return float(loss)

  def forward_only():
    twin.eval()
    with torch.no_grad():
      twin(img, lidar2img, ego2lidar, can, exists)

  mode = 'train step, recompute' if spec['checkpointing'] else 'train step'
  result = {'threads': torch.get_num_threads(), 'mode': mode}
  train_error = None
  try:
    t0 = time.perf_counter()
    result['loss'] = train_step()
    result['warm_s'] = time.perf_counter() - t0
    result['median_s'], result['times'] = _median_time(train_step, spec['repeats'])
  except (MemoryError, RuntimeError) as e:
    if not _out_of_memory(e):
      raise
    train_error = _describe(e)
  if train_error is not None:
    # Outside the except clause: the exception's traceback held the failed step's tensors.
    opt.zero_grad(set_to_none=True)
    gc.collect()
    result = {
      'threads': torch.get_num_threads(),
      'mode': 'forward only',
      'train_error': train_error,
    }
    t0 = time.perf_counter()
    forward_only()
    result['warm_s'] = time.perf_counter() - t0
    result['median_s'], result['times'] = _median_time(forward_only, spec['repeats'])
  return result


def time_torch(args, cfg, variables, limit_bytes: int, checkpointing: bool) -> dict:
  from uniscene_jax.convert import key_map

  with tempfile.TemporaryDirectory() as tmp:
    weights = os.path.join(tmp, 'weights.npz')
    np.savez(weights, **key_map.to_torch_arrays(variables))
    spec = {
      'preset': args.preset,
      'queue': args.queue,
      'image_size': list(cfg.data.image_size),
      'repeats': args.repeats,
      'weights': weights,
      'limit_bytes': limit_bytes,
      'checkpointing': checkpointing,
    }
    spec_path = os.path.join(tmp, 'spec.json')
    with open(spec_path, 'w') as f:
      json.dump(spec, f)
    cmd = [sys.executable, '-m', 'uniscene_jax.tools.bench_model', '--_torch_child', spec_path]
    out = subprocess.run(cmd, capture_output=True, text=True)
  for line in out.stdout.splitlines():
    if line.startswith('TORCH_RESULT '):
      return json.loads(line[len('TORCH_RESULT ') :])
  return {'error': f'child exited with {out.returncode}: {out.stderr.strip()[-500:]}'}


# ----------------------------------------------------------------------------------------------


def _fmt_gb(x: float) -> str:
  return f'{x / GB:7.2f}'


def _pick_run(results, want_dtype: str, want_remat: str, budget: int):
  candidates = [r for r in results if want_dtype in ('auto', r.dtype)]
  if want_remat != 'auto':
    candidates = [r for r in candidates if r.remat == (want_remat == 'on')]
  order = {('float32', False): 0, ('float32', True): 1, ('bfloat16', False): 2}
  candidates.sort(key=lambda r: order.get((r.dtype, r.remat), 3))
  for r in candidates:
    if r.peak <= budget:
      return r
  return None


def _twin_only(args, cfg) -> None:
  """The twin's step alone, from the initial weights of the JAX run's state (same seed)."""
  import jax

  _, _, init, _ = build_step(cfg)
  state = init(jax.random.key(cfg.seed))
  variables = jax.tree.map(np.asarray, {'params': state.params, 'batch_stats': state.batch_stats})
  del state
  recompute = args.twin_remat != 'off'
  print(f'\nRunning the PyTorch twin alone (recompute {recompute}) ...', flush=True)
  limit = max(int(available_bytes() - 2 * GB), 2 * int(GB))
  tres = time_torch(args, cfg, variables, limit, recompute)
  if 'median_s' not in tres:
    print(f'torch twin failed: {tres.get("error")}')
    return
  runs = ' '.join(f'{t:.1f}' for t in tres['times'])
  print(
    f'torch twin ({tres["mode"]}, {tres["threads"]} thr): median {tres["median_s"]:.2f} s, '
    f'warm-up {tres["warm_s"]:.2f} s, runs {runs}, peak RSS {tres["peak_rss_bytes"] / GB:.2f} GB'
  )
  if 'train_error' in tres:
    print(f'  the twin train step did not fit in {limit / GB:.1f} GB: {tres["train_error"]}')
  else:
    print(f'  loss_occ {tres["loss"]:.5f}')
  print(f'load average at the end: {load_average()}')


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default='base', help='configs/pretrain.py preset')
  p.add_argument('--queue', type=int, default=None, help='frames per sample (default 4)')
  p.add_argument('--repeats', type=int, default=3, help='timed steps per measurement (median)')
  p.add_argument('--skip_torch', action='store_true', help='do not run the PyTorch twin')
  p.add_argument('--skip_run', action='store_true', help='compile and memory only')
  p.add_argument('--quick', action='store_true', help='smoke run: the tiny preset, queue 2')
  p.add_argument(
    '--image_size', type=int, nargs=2, default=None, help='override (height, width) of the images'
  )
  p.add_argument(
    '--variants',
    default=','.join(VARIANTS),
    help=f'comma-separated train-step variants to compile, of {",".join(VARIANTS)}',
  )
  p.add_argument(
    '--memory_scheduler',
    action='store_true',
    help="compile with XLA:CPU's memory-optimised scheduler instead of the default one",
  )
  p.add_argument('--run_dtype', default='auto', choices=('auto', 'float32', 'bfloat16'))
  p.add_argument('--run_remat', default='auto', choices=('auto', 'off', 'on'))
  p.add_argument(
    '--twin_remat',
    default='auto',
    choices=('auto', 'off', 'on'),
    help='recompute blocks and layers in the twin backward (auto: as the JAX run)',
  )
  p.add_argument(
    '--twin_only', action='store_true', help='run the twin alone, from the same initial weights'
  )
  p.add_argument('--_torch_child', default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._torch_child:
    _torch_child(args._torch_child)
    return
  if args.quick:
    args.preset = 'tiny'
    args.queue = args.queue or 2
  args.queue = args.queue or 4

  import jax

  base = experiment_config(args.preset, args.queue, 'float32', False)
  if args.image_size:
    base.data.image_size = tuple(args.image_size)
  from uniscene_jax.models.config import padded_size

  m = base.model
  ph, pw = padded_size(base.data.image_size)
  blocks = tuple(m.backbone_blocks) or f'R{m.backbone_depth}'
  print(
    f'jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s), '
    f'{os.cpu_count()} cpus); preset {args.preset}: {m.num_cams} cams '
    f'{base.data.image_size[0]}x{base.data.image_size[1]} padded {ph}x{pw}, backbone {blocks} '
    f'width {m.backbone_base_width}, BEV {m.bev_h}x{m.bev_w}x{m.embed_dims}, '
    f'{m.num_layers} layers, queue {args.queue}, batch 1'
  )
  print(f'load average {load_average()}; available RAM {available_bytes() / GB:.1f} GB', flush=True)

  if args.twin_only:
    _twin_only(args, base)
    return

  # 1. Compile and memory.
  results = []
  header = (
    f'{"train step":24s} {"lower s":>8s} {"compile s":>9s} {"temp GB":>7s} {"args GB":>7s} '
    f'{"out GB":>7s} {"alias GB":>8s} {"peak GB":>7s} {"goal":>6s}'
  )
  scheduler = 'memory-optimised' if args.memory_scheduler else 'default'
  print(
    f'\nCompiled train step (per device; peak = temp + args + out - alias; XLA:CPU {scheduler} '
    'scheduler)'
  )
  print(header)
  print('-' * len(header))
  variants = [v for v in args.variants.split(',') if v]
  if not set(variants) <= set(VARIANTS):
    p.error(f'--variants: {args.variants!r} not a subset of {",".join(VARIANTS)}')
  for variant in VARIANTS:
    if variant not in variants:
      continue
    dtype, remat = variant.split('_')[0], variant.endswith('_remat')
    cfg = experiment_config(args.preset, args.queue, dtype, remat)
    cfg.data.image_size = base.data.image_size
    r = compile_step(
      cfg,
      keep=not args.skip_run,
      compiler_options=MEMORY_SCHEDULER if args.memory_scheduler else None,
    )
    results.append(r)
    goal = GOAL_PEAK[dtype]
    print(
      f'{dtype + (" remat" if remat else ""):24s} {r.lower_s:8.1f} {r.compile_s:9.1f} '
      f'{_fmt_gb(r.temp)} {_fmt_gb(r.argument)} {_fmt_gb(r.output)} {r.alias / GB:8.2f} '
      f'{_fmt_gb(r.peak)} {"ok" if r.peak <= goal * GB else "MISS":>6s}',
      flush=True,
    )
  print(
    f'goals: peak <= {GOAL_PEAK["float32"]:.0f} GB float32, <= {GOAL_PEAK["bfloat16"]:.0f} GB '
    f'bfloat16 (reference: {REFERENCE_PEAK} GB); compile (lower + compile) <= {GOAL_COMPILE:.0f} s'
  )
  if args.skip_run:
    return

  # 2. Run time.
  budget = int(0.85 * available_bytes())
  chosen = _pick_run(results, args.run_dtype, args.run_remat, budget)
  if chosen is None:
    print(f'\nNo requested configuration fits in {budget / GB:.1f} GB of RAM: not run.')
    return
  for r in results:
    if r is not chosen:
      r.compiled = None
  gc.collect()
  cfg = experiment_config(args.preset, args.queue, chosen.dtype, chosen.remat)
  cfg.data.image_size = base.data.image_size
  name = f'{chosen.dtype}{" remat" if chosen.remat else ""}'
  print(f'\nRunning the JAX step ({name}; compiled peak {chosen.peak / GB:.2f} GB) ...', flush=True)
  jmed, jtimes, jwarm, jloss, variables = time_jax(cfg, chosen.compiled, args.repeats)
  chosen.compiled = None
  jrss = peak_rss_bytes()
  jload = load_average()
  tres = None
  if not args.skip_torch:
    print('Running the PyTorch twin in a child process ...', flush=True)
    limit = max(int(available_bytes() - 2 * GB), 2 * int(GB))
    twin_remat = chosen.remat if args.twin_remat == 'auto' else args.twin_remat == 'on'
    tres = time_torch(args, base, variables, limit, twin_remat)
    tres['limit_bytes'] = limit
  print(f'\nTrain step wall time, seconds (median of {args.repeats} after 1 warm-up)')
  header = f'{"":42s} {"median":>8s} {"warm-up":>8s} {"runs":>24s} {"peak RSS GB":>11s}'
  print(header)
  print('-' * len(header))
  runs = ' '.join(f'{t:.1f}' for t in jtimes)
  print(
    f'{"jax step (" + name + ", full step)":42s} {jmed:8.2f} {jwarm:8.2f} {runs:>24s} '
    f'{jrss / GB:11.2f}'
  )
  print(f'  load average after: {jload}; loss_occ {jloss:.5f}')
  if tres is not None:
    if 'median_s' in tres:
      runs = ' '.join(f'{t:.1f}' for t in tres['times'])
      label = f'torch twin ({tres["mode"]}, {tres["threads"]} thr)'
      print(
        f'{label:42s} {tres["median_s"]:8.2f} {tres["warm_s"]:8.2f} {runs:>24s} '
        f'{tres["peak_rss_bytes"] / GB:11.2f}'
      )
      if 'train_error' in tres:
        print(
          f'  the twin train step did not fit in {tres["limit_bytes"] / GB:.1f} GB: '
          f'{tres["train_error"]}'
        )
      else:
        print(f'  loss_occ {tres["loss"]:.5f}')
      ratio = jmed / tres['median_s']
      full = tres['mode'].startswith('train step')
      verdict = 'ok' if ratio <= GOAL_RATIO and full else 'MISS'
      if not full:
        verdict = 'n/a (twin forward only)'
      print(f'  ratio jax / torch {ratio:.2f} (goal <= {GOAL_RATIO}): {verdict}')
    else:
      print(f'torch twin failed: {tres.get("error")}')
  print(f'load average at the end: {load_average()}')


if __name__ == '__main__':
  main()
