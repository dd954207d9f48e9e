r"""Parameters per module, FLOPs and compiled peak memory of a config's model, without data.

    python -m uniscene_jax.tools.flops --config=configs/pretrain.py[:preset] [--compile] \
        [--batch_per_device 1] [--dtype float32|bfloat16] [--remat] [--image_size H,W] \
        [--queue T] [--notrain_step] [--config.model.x=...]
    python -m uniscene_jax.tools.flops --config=configs/finetune_det.py   # the detector

Always (instantly, from the abstract parameters of `init_variables` under jax.eval_shape): the
parameters per module under the reference's names (the stem and stages of img_backbone, img_neck,
the BEV embedding and positional encoding, the encoder, the CAN-bus MLP, the occupancy layers ...),
with what the optimiser trains (the frozen stem, layer1 and backbone BatchNorms excluded) and
totals. At the `base` presets they equal the reference's state_dict manifests: 62,897,984
parameters (62,570,240 trained) for the occupancy model, 69,034,947 (68,707,193) for the detector
(BEVFormer-base).

With --compile, each part is lowered on abstract inputs and compiled by XLA, and the compiled
programs give FLOPs (XLA's cost analysis; a multiply-add counts 2) and the peak memory per device
(temp + arguments + outputs - aliased): the forward of one frame in inference (image features,
BEV encoder, occupancy or detection head, then the whole frame) and the whole train step
of `train.make_train_step` (the queue's history frames, the current frame's forward and backward,
AdamW, the state donated) for --batch_per_device samples, in --dtype, with or without --remat
(backbone and encoder); --notrain_step leaves the train step out. Compiling is the slow part:
seconds for the tiny presets' forward, a minute or more for their train step, many minutes for the
base train step on a CPU, which is why it is asked for rather than done by default. The
detector's train step is not measured yet.
"""

import re
import time

import numpy as np

GIGA = 1e9
# What some rows are, for readers who do not know the reference's names.
NOTES = {
  'img_backbone.stem': 'conv 7x7 + BN (frozen)',
  'img_backbone.layer1': 'frozen; BNs of every stage frozen too',
  'img_backbone.layer3': 'with DCNv2',
  'img_backbone.layer4': 'with DCNv2',
  'pts_bbox_head.bev_embedding': 'BEV queries',
  'pts_bbox_head.transformer.level_embeds': 'per FPN level',
  'pts_bbox_head.transformer.cams_embeds': 'per camera',
  'pts_bbox_head.transformer.encoder': 'TSA + SCA + FFN layers',
  'pts_bbox_head.transformer.predicter': 'occupancy: MLP to classes',
  'pts_bbox_head.query_embedding': 'object queries',
  'pts_bbox_head.code_weights': 'loss weights (frozen)',
}
DECODER_NOTES = {False: 'occupancy: Conv3d + BN3d', True: 'object-query decoder layers'}

# Rows of the parameter table: (pattern on the PyTorch key, depth of the row's name).
_DEPTHS = ((r'^img_backbone\.', 2), (r'^pts_bbox_head\.transformer\.', 3), (r'^pts_bbox_head\.', 2))
_STEM = re.compile(r'^img_backbone\.(conv1|bn1)\.')
_LEAVES = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def module_of(torch_key: str) -> str:
  """The table row of a PyTorch key: 'img_backbone.layer3.4.conv2.weight' -> 'img_backbone.layer3',
  'pts_bbox_head.transformer.can_bus_mlp.0.bias' -> 'pts_bbox_head.transformer.can_bus_mlp',
  'pts_bbox_head.transformer.level_embeds' -> itself (a bare parameter names its row)."""
  if _STEM.match(torch_key):
    return 'img_backbone.stem'
  names = [n for n in torch_key.split('.') if not n.isdigit()]
  if len(names) > 1 and names[-1] in _LEAVES:
    names = names[:-1]
  depth = next((d for pattern, d in _DEPTHS if re.match(pattern, torch_key)), 1)
  return '.'.join(names[:depth])


def parameter_rows(params) -> dict[str, dict]:
  """{row: {'tensors', 'params', 'trainable'}} of a params tree (arrays or ShapeDtypeStructs),
  in the tree's order; trainable excludes what optim.path_labels freezes."""
  import jax

  from uniscene_jax import optim
  from uniscene_jax.convert import key_map

  labels = key_map.flatten(jax.tree.map(lambda x: x, optim.path_labels(params)))
  rows = {}
  for path, leaf in key_map.flatten(dict(params)).items():
    row = rows.setdefault(
      module_of(key_map.torch_key(path)), dict(tensors=0, params=0, trainable=0)
    )
    n = int(np.prod(leaf.shape))
    row['tensors'] += 1
    row['params'] += n
    row['trainable'] += n if labels[path] != 'frozen' else 0
  return rows


def abstract_variables(config):
  import jax

  from uniscene_jax.models import init_variables, model_config_from

  mc = model_config_from(config)
  return jax.eval_shape(lambda: init_variables(mc, jax.random.key(0)))


def format_parameters(rows: dict[str, dict]) -> str:
  total = sum(r['params'] for r in rows.values())
  trainable = sum(r['trainable'] for r in rows.values())
  lines = [f'{"module":40s} {"tensors":>7s} {"parameters":>12s} {"trainable":>12s} {"share":>6s}']
  lines.append('-' * len(lines[0]))
  groups = {}
  for name, r in rows.items():
    groups.setdefault(name.split('.')[0], []).append((name, r))
  for group, members in groups.items():
    g = {k: sum(r[k] for _, r in members) for k in ('tensors', 'params', 'trainable')}
    lines.append(_param_line(group, g, total))
    for name, r in members:
      if name != group:
        note = NOTES.get(name, '')
        if name == 'pts_bbox_head.transformer.decoder':
          note = DECODER_NOTES['pts_bbox_head.query_embedding' in rows]
        lines.append(_param_line('  ' + name[len(group) + 1 :], r, total, note))
  lines.append('-' * len(lines[0]))
  n_tensors = sum(r['tensors'] for r in rows.values())
  lines.append(
    _param_line('total', dict(tensors=n_tensors, params=total, trainable=trainable), total)
  )
  return '\n'.join(lines)


def _param_line(name: str, r: dict, total: int, note: str = '') -> str:
  share = r['params'] / max(total, 1) * 100
  line = f'{name:40s} {r["tensors"]:7d} {r["params"]:12,d} {r["trainable"]:12,d} {share:5.1f}%'
  return f'{line}  {note}' if note else line


# ----------------------------------------------------------------------------------------------
# Compiled costs.


def compiled_cost(fn, *args) -> dict:
  """Lowers and compiles jax.jit(fn) on abstract args -> {'flops', 'peak', 'compile_s', ...}."""
  import jax

  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return cost_of(compiled, time.perf_counter() - t0)


def cost_of(compiled, seconds: float) -> dict:
  """FLOPs and memory of a compiled program (XLA's cost and memory analyses)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # one entry per program in older JAX versions
    cost = cost[0]
  m = compiled.memory_analysis()
  peak = (
    m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  )
  return {
    'flops': float(cost.get('flops', 0.0)),
    'bytes_accessed': float(cost.get('bytes accessed', 0.0)),
    'peak': int(peak),
    'temp': int(m.temp_size_in_bytes),
    'arguments': int(m.argument_size_in_bytes),
    'compile_s': seconds,
  }


def experiment(config, batch_per_device: int, dtype: str, remat: bool, image_size, queue):
  """A copy of the config with the measured settings applied."""
  import copy

  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.batch_size = batch_per_device
    cfg.model.dtype = dtype
    cfg.model.remat_backbone = cfg.model.remat_encoder = remat
    if image_size:
      cfg.data.image_size = tuple(image_size)
    if queue:
      cfg.data.queue_length = queue
  return cfg


FEATURES = 'image features (img_backbone + img_neck)'
ENCODER = 'BEV encoder (pts_bbox_head.bev)'
FRAME = 'one frame (inference)'
TRAIN_STEP = 'train step (queue, forward + backward + AdamW)'


def forward_costs(cfg, parts: tuple[str, ...] | None = None) -> dict[str, dict]:
  """Compiled costs of the inference forward of one frame (normalisation, features, encoder,
  head) and of its parts; `parts` picks some of FEATURES, ENCODER, the head's name, FRAME."""
  import jax
  import jax.numpy as jnp

  from uniscene_jax.data import augment
  from uniscene_jax.models import build_model, model_config_from
  from uniscene_jax.tools import bench_model

  mc = model_config_from(cfg)
  model = build_model(mc)
  variables = abstract_variables(mc)
  enc = mc.head.encoder
  batch = bench_model.make_batch(cfg)
  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
  inputs = {k: spec(batch[k][:, -1]) for k in ('img', 'lidar2img', 'ego2lidar', 'can_bus')}
  b = cfg.batch_size
  prev = jax.ShapeDtypeStruct((b, enc.bev_h * enc.bev_w, enc.embed_dims), jnp.float32)
  exists = jax.ShapeDtypeStruct((b,), jnp.bool_)
  img = jax.ShapeDtypeStruct(inputs['img'].shape, jnp.float32)
  detector = hasattr(model, 'detect')
  head_name = 'detection head' if detector else 'occupancy head'
  head_method = model.detect if detector else model.occupancy

  def features(v, x):
    return model.apply(v, x, method=model.features)

  def bev(v, f, i, p, e):
    return model.apply(
      v,
      f,
      i['lidar2img'],
      i['ego2lidar'],
      i['can_bus'],
      p,
      e,
      method=lambda m, *a: m.pts_bbox_head.bev(*a)[0],
    )

  def head(v, x):
    return model.apply(v, x, method=head_method)

  def frame(v, i, p, e):  # as evaluation runs a frame, for either head
    x = augment.normalize(i['img'].astype(jnp.float32), tuple(cfg.data.image_size))
    out, _ = model.apply(
      v, x, i['lidar2img'], i['ego2lidar'], i['can_bus'], p, e, method=model.frame
    )
    return out, head(v, out)

  feats = jax.eval_shape(features, variables, img)
  programs = {
    FEATURES: lambda: compiled_cost(features, variables, img),
    ENCODER: lambda: compiled_cost(bev, variables, feats, inputs, prev, exists),
    head_name: lambda: compiled_cost(
      head, variables, jax.eval_shape(bev, variables, feats, inputs, prev, exists)
    ),
    FRAME: lambda: compiled_cost(frame, variables, inputs, prev, exists),
  }
  return {k: run() for k, run in programs.items() if parts is None or k in parts}


def train_step_cost(cfg) -> dict:
  """Compiled costs of the donated train step (bench_model's compile, with the cost analysis)."""
  from uniscene_jax.tools import bench_model

  r = bench_model.compile_step(cfg, keep=True)
  out = cost_of(r.compiled, r.lower_s + r.compile_s)
  assert out['peak'] == r.peak  # one definition of the peak with bench_model
  return out


def format_costs(costs: dict[str, dict], cfg) -> str:
  m = cfg.model
  lines = [
    f'per device: batch {cfg.batch_size}, {m.num_cams} cameras '
    f'{cfg.data.image_size[0]}x{cfg.data.image_size[1]}, queue {cfg.data.queue_length}, '
    f'{m.dtype}, remat {"on" if m.remat_backbone else "off"}'
  ]
  header = (
    f'{"compiled program":48s} {"GFLOPs":>10s} {"per sample":>10s} {"peak GB":>8s} '
    f'{"compile s":>9s}'
  )
  lines += [header, '-' * len(header)]
  for name, c in costs.items():
    lines.append(
      f'{name:48s} {c["flops"] / GIGA:10.2f} {c["flops"] / GIGA / cfg.batch_size:10.2f} '
      f'{c["peak"] / GIGA:8.3f} {c["compile_s"]:9.1f}'
    )
  return '\n'.join(lines)


def report(
  config,
  compile_: bool = False,
  batch_per_device: int = 1,
  dtype: str = 'float32',
  remat: bool = False,
  image_size=None,
  queue: int | None = None,
  train_step: bool = True,
) -> dict:
  """Prints the tables; returns {'parameters': rows, 'costs': {program: cost}}."""
  if batch_per_device < 1:
    raise ValueError(f'--batch_per_device must be >= 1, got {batch_per_device}')
  if dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"--dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  if image_size is not None and (len(image_size) != 2 or min(image_size) < 32):
    raise ValueError(f'--image_size must be H,W of at least 32 pixels each, got {image_size}')
  cfg = experiment(config, batch_per_device, dtype, remat, image_size, queue)
  rows = parameter_rows(abstract_variables(cfg)['params'])
  print(f'Parameters (preset {cfg.get("preset", "?")})', flush=True)
  print(format_parameters(rows), flush=True)
  out = {'parameters': rows, 'costs': {}}
  if not compile_:
    print('\nFLOPs and memory: add --compile (compiles the forward and the train step).')
    return out
  costs = forward_costs(cfg)
  if train_step and cfg.model.get('arch', 'occ') == 'det':
    print("\nThe detector's train step is not measured (bench_model builds occupancy batches).")
  elif train_step:
    costs[TRAIN_STEP] = train_step_cost(cfg)
  print('\nCompiled FLOPs (XLA cost analysis) and peak memory per device (XLA buffer assignment)')
  print(format_costs(costs, cfg), flush=True)
  out['costs'] = costs
  return out


def main(argv) -> None:
  from absl import app, flags

  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  image_size = None
  if f.image_size:
    try:
      image_size = tuple(int(v) for v in f.image_size)
    except ValueError as e:
      raise app.UsageError(f'--image_size must be H,W in pixels, got {f.image_size}') from e
  report(
    f.config, f.compile, f.batch_per_device, f.dtype, f.remat, image_size, f.queue, f.train_step
  )


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', 'configs/pretrain.py', 'configs/<task>.py[:preset]')
  flags.DEFINE_bool('compile', False, 'also compile: FLOPs and peak memory (minutes at base)')
  flags.DEFINE_integer('batch_per_device', 1, 'samples per device')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'compute dtype')
  flags.DEFINE_bool('remat', False, 'rematerialise backbone and encoder in the backward')
  flags.DEFINE_list('image_size', None, 'H,W of the camera images (default: the config)')
  flags.DEFINE_integer('queue', None, 'frames per training sample (default: the config)')
  flags.DEFINE_bool('train_step', True, 'with --compile: also the train step (the slow compile)')


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
