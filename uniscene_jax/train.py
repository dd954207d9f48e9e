"""Pre-training loop: one jitted, donated train step over the data mesh; orbax checkpoints; resume.

    python main.py --config=configs/pretrain.py --workdir=W [--data_dir=D]

The train state {params, batch_stats, opt_state, step, rng} is replicated over the 1-D mesh of all
devices; each batch is sharded on its leading axis. Augmentation (photometric distortion, GridMask)
and normalisation run inside the step. A loss or gradient that is not finite stops the run at the
step it happens, naming it; the state of that step is not applied, and the last checkpoint stays.
"""

import dataclasses
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from uniscene_jax import losses, optim, sharding, targets
from uniscene_jax.checkpoint import Checkpoints
from uniscene_jax.data import augment
from uniscene_jax.data import input_pipeline as ip
from uniscene_jax.summary import SummaryWriter


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jnp.ndarray  # raw key data (uint32), checkpointable


class NonFiniteError(RuntimeError):
  pass


def create_train_state(model_config, tx, rng) -> TrainState:
  from uniscene_jax.models import init_variables

  init_rng, state_rng = jax.random.split(rng)
  variables = init_variables(model_config, init_rng)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    opt_state=tx.init(variables['params']),
    rng=jax.random.key_data(state_rng),
  )


def task_loss(config, outputs, batch) -> tuple[jnp.ndarray, dict]:
  """(loss, named terms) of the model's outputs on a batch, by config.loss.kind.

  Occupancy ('focal', 'cross_entropy'): logits [B, X, Y, Z, C] against `occ_target` (pooled onto
  a coarser BEV if `data.target_pool` > 1), camera-masked if `loss.use_camera_mask`; the term is
  `loss_occ`. Detection ('detection'): {'cls', 'box'} of every decoder layer against `gt_boxes`
  and `gt_labels`, Hungarian-matched per layer and image; the positives are averaged as over
  `batch_size` devices of one sample each (the reference's 8 GPUs x 1), terms `loss_cls`,
  `loss_bbox`, `d0.loss_cls`, ...
  """
  if config.loss.kind == 'detection':
    from uniscene_jax.detection import losses as det_losses

    loss, terms = det_losses.detection_loss(
      outputs['cls'],
      outputs['box'],
      batch['gt_boxes'],
      batch['gt_labels'],
      num_replicas=outputs['cls'].shape[1],
    )
    return loss, {k: v for k, v in terms.items() if 'loss' in k}
  mask = batch.get('occ_mask_camera') if config.loss.use_camera_mask else None
  target, mask = targets.model_targets(
    batch['occ_target'], mask, config.data.target_pool, config.data.target
  )
  loss = losses.occupancy_loss(config.loss.kind, outputs, target, mask)
  return loss, {'loss_occ': loss}


def make_train_step(model, tx, config):
  """(state, batch) -> (state, metrics); pure, to be jitted with the state donated."""
  valid_hw = tuple(config.data.image_size)

  def step_fn(state: TrainState, batch: dict):
    rng = jax.random.wrap_key_data(state.rng)
    rng, aug_rng, dropout_rng = jax.random.split(rng, 3)
    img = augment.augment_batch(
      aug_rng,
      batch['img'],
      valid_hw,
      train=True,
      photometric=config.augment.photometric,
      use_grid_mask=config.augment.grid_mask,
      grid_mask_prob=config.augment.grid_mask_prob,
      dtype=jnp.dtype(config.model.get('dtype', 'float32')),
    )

    def loss_fn(trainable):
      params = tx.merge(state.params, trainable)  # frozen tensors enter as constants
      (outputs, aux), updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats},
        img,
        batch['lidar2img'],
        batch['ego2lidar'],
        batch['can_bus'],
        batch['prev_bev_exists'],
        train=True,
        rngs={'dropout': dropout_rng},
        mutable=['batch_stats'],
      )
      loss, terms = task_loss(config, outputs, batch)
      return loss, (aux, terms, updates.get('batch_stats', {}))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (aux, terms, batch_stats)), grads = grad_fn(tx.trainable(state.params))
    params, opt_state, grad_norm = tx.update(grads, state.opt_state, state.params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = TrainState(state.step + 1, params, batch_stats, opt_state, jax.random.key_data(rng))
    # A non-finite step is not applied: the host stops on `finite` and keeps the last good state.
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    metrics = {
      'loss': loss,
      **terms,
      'grad_norm': grad_norm,
      'finite': finite,
      'sca_overflow': jnp.max(aux['sca_overflow']),
    }
    return new, metrics

  return step_fn


@dataclasses.dataclass
class Run:
  """What train_and_evaluate built, for tests and tools."""

  state: TrainState
  step: int
  metrics: list


def _steps_per_epoch(config, data_dir, per_process: int, process_count: int) -> int:
  n = len(ip.open_source(data_dir, config.data.name, config.data.train_split))
  return max(1, n // process_count // per_process)


CACHE_ENV = 'UNISCENE_JAX_CACHE'


def dataset_status(data_dir: str, name: str) -> str:
  """'ready', 'missing' or 'incomplete' for a TFDS build of `name` ('nuscenes_occ/mini')."""
  root = os.path.join(data_dir, *name.split('/'))
  if not os.path.isdir(root):
    return 'missing'
  entries = os.listdir(root)
  if any(os.path.isfile(os.path.join(root, e, 'dataset_info.json')) for e in entries):
    return 'ready'
  return 'incomplete' if entries else 'missing'


def prepare_data(config, data_dir: str | None = None) -> str:
  """The data_dir to read; builds the embedded synthetic world when no nuScenes build exists.

  Without a build of config.data.name in the data dir, the synthetic world is written and built
  once into a cache directory ($UNISCENE_JAX_CACHE, else ~/.cache/uniscene_jax) and the config
  takes the `:local` preset, printing what changed.
  """
  data_dir = data_dir or config.data.data_dir
  status = dataset_status(data_dir, config.data.name)
  if status == 'ready':
    return data_dir
  path = os.path.join(data_dir, *config.data.name.split('/'))
  if status == 'incomplete':
    raise ValueError(
      f'{path}: holds a half-built dataset (no dataset_info.json); remove it or rebuild with '
      f'tfds build data_builders/nuscenes_occ --overwrite'
    )
  cache = os.environ.get(CACHE_ENV) or os.path.join(
    os.path.expanduser('~'), '.cache', 'uniscene_jax'
  )
  tfds_dir = os.path.join(cache, 'tfds')
  print(
    f'No {config.data.name} build in {data_dir}: using the embedded synthetic nuScenes world '
    f'(cached in {cache})',
    flush=True,
  )
  _apply_local_preset(config)
  with config.unlocked():
    config.data.nuscenes_root = os.path.join(cache, 'synthetic_world', 'nuscenes')
  if dataset_status(tfds_dir, config.data.name) != 'ready':
    _build_synthetic(cache, tfds_dir)
  return tfds_dir


def _apply_local_preset(config) -> None:
  """The config's preset at the `local` size (its other parts, e.g. `semantic`, kept)."""
  import importlib

  from configs import pretrain

  preset = config.get('preset', 'base')
  parts = preset.split(',')
  if any(p in pretrain.SMALL_SIZES for p in parts):
    return  # already sized for the synthetic world
  local_preset = ','.join(['local'] + [p for p in parts if p != 'base'])
  module = importlib.import_module(config.get('config_module', 'configs.pretrain'))
  local, base = module.get_config(local_preset), module.get_config(preset)
  changed = []
  with config.unlocked():
    for key, value in flax.traverse_util.flatten_dict(local.to_dict(), sep='.').items():
      if key == 'preset':
        continue
      old = _get(base, key)
      if old != value and _get(config, key) == old:  # keep what the user set explicitly
        _set(config, key, value)
        changed.append(f'{key}={value!r}')
    config.preset = local_preset
  if changed:
    print(f'Applied the :{local_preset} preset: ' + ', '.join(changed), flush=True)


def _get(config, dotted):
  for part in dotted.split('.'):
    config = config[part]
  return config


def _set(config, dotted, value):
  *parents, last = dotted.split('.')
  for part in parents:
    config = config[part]
  config[last] = value


def _build_synthetic(cache: str, tfds_dir: str) -> None:
  import tensorflow_datasets as tfds

  from data_builders.nuscenes_occ import nuscenes_occ_dataset_builder as nbuilder
  from uniscene_jax.data import synthetic_world

  world = os.path.join(cache, 'synthetic_world')
  if not os.path.isfile(os.path.join(world, 'synthetic_world.json')):
    synthetic_world.write_world(world, synthetic_world.WorldOptions(), overwrite=True)
  nbuilder.Builder(data_dir=tfds_dir, config='mini').download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=world)
  )


def check_config(config) -> None:
  """Combinations of fields that cannot work, named before anything is built."""
  kinds = ('detection',) if config.model.get('arch', 'occ') == 'det' else losses.OCCUPANCY_LOSSES
  if config.loss.kind not in kinds:
    raise ValueError(f'config.loss.kind={config.loss.kind!r}: this model takes one of {kinds}')
  if config.loss.kind == 'detection':
    if config.data.target != 'boxes':
      raise ValueError(f"config.data.target={config.data.target!r}: detection needs 'boxes'")
    queries = config.model.detection.num_query
    if config.data.max_boxes > queries:
      raise ValueError(
        f'config.data.max_boxes={config.data.max_boxes} exceeds '
        f'config.model.detection.num_query={queries}: every box must be matchable to a query'
      )


def train_and_evaluate(config, workdir: str, data_dir: str | None = None) -> Run:
  from uniscene_jax.models import build_model, init_variables, model_config_from

  data_dir = prepare_data(config, data_dir)
  mesh = sharding.make_mesh()
  process_count, process_index = jax.process_count(), jax.process_index()
  if config.batch_size % jax.device_count():
    raise ValueError(
      f'--config.batch_size={config.batch_size} is not divisible by the '
      f'{jax.device_count()} devices'
    )
  per_process = config.batch_size // process_count
  check_config(config)
  model_config = model_config_from(config)
  model = build_model(model_config)
  steps_per_epoch = _steps_per_epoch(config, data_dir, per_process, process_count)
  total_steps = config.num_steps or steps_per_epoch * config.optim.num_epochs

  abstract_params = jax.eval_shape(
    lambda: init_variables(model_config, jax.random.key(0))['params']
  )
  tx = optim.make_optimizer(optim_config(config), steps_per_epoch, abstract_params)
  replicated = sharding.replicated(mesh)
  state = jax.jit(lambda rng: create_train_state(model_config, tx, rng), out_shardings=replicated)(
    jax.random.key(config.seed)
  )

  loader = ip.make_loader(
    ip.PipelineConfig(
      data_dir=data_dir,
      name=config.data.name,
      split=config.data.train_split,
      queue_length=config.data.queue_length,
      target=config.data.target,
      max_boxes=config.data.get('max_boxes', 256),
      box_range=tuple(config.model.pc_range),
      batch_size=per_process,
      seed=config.seed,
      shuffle=True,
      num_epochs=None,
      worker_count=config.data.worker_count,
    ),
    process_index,
    process_count,
  )
  data_iter = iter(loader)
  ckpt = Checkpoints(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
  start = ckpt.latest_step()
  check_workdir_config(workdir, config, resuming=start is not None)
  if start is not None:
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
    )
    state, data_state = ckpt.restore(start, abstract)
    if data_state:
      data_iter.set_state(data_state)
    logging.info('resumed from %s at step %d', ckpt.directory, start)
    print(f'Resuming from step {start} ({ckpt.directory})', flush=True)
  elif config.init_from:
    params, batch_stats = warm_start(
      config.init_from, state.params, state.batch_stats, tuple(config.init_fresh)
    )
    state = state.replace(
      params=jax.device_put(params, replicated), batch_stats=jax.device_put(batch_stats, replicated)
    )

  step_fn = jax.jit(
    make_train_step(model, tx, config),
    in_shardings=(replicated, sharding.data_sharding(mesh)),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )
  step = int(state.step)
  lr = optim.lr_schedule(
    config.optim.learning_rate, steps_per_epoch, config.optim.num_epochs, config.optim.warmup_steps
  )
  main_process = process_index == 0
  writer = SummaryWriter(os.path.join(workdir, 'tensorboard'), enabled=main_process)
  bar = tqdm.tqdm(
    total=total_steps, initial=step, disable=not main_process, desc='train', dynamic_ncols=True
  )
  history, pending = [], None
  t0, t0_step = time.time(), step
  eval_every = config.get('eval_every_steps', 0)
  try:
    while step < total_steps:
      batch = sharding.device_batch(next(data_iter), mesh)
      with jax.set_mesh(mesh):  # the sampling ops then run per device (ops.batch_parallel)
        state, metrics = step_fn(state, batch)
      step += 1
      # Metrics are read one step late, so the host never waits on the step it just dispatched.
      if pending is not None:
        history.append(_check(*pending))
      pending = (step, metrics)
      if step % config.log_every_steps == 0 or step == total_steps:
        history.append(_check(*pending))
        pending = None
        m = history[-1]
        rate = (step - t0_step) / max(time.time() - t0, 1e-9)
        t0, t0_step = time.time(), step
        writer.scalars(
          step,
          {
            **{f'train/{k}': v for k, v in m.items() if 'loss' in k},
            'train/grad_norm': m['grad_norm'],
            'train/lr': float(lr(step - 1)),
            'train/steps_per_second': rate,
            'train/samples_per_second': rate * config.batch_size,
          },
        )
        bar.set_postfix(loss=f'{m["loss"]:.4f}', refresh=False)
      bar.update(1)
      periodic = eval_every and step % eval_every == 0 and step < total_steps
      if periodic or step % config.checkpoint_every_steps == 0 or step == total_steps:
        if pending is not None:  # a checkpoint only of a step known to be finite
          history.append(_check(*pending))
          pending = None
        ckpt.save(step, state, data_iter.get_state(), force=True)
      if periodic:
        ckpt.wait()
        if main_process:
          _evaluate(config, workdir, data_dir, step, writer)
    if pending is not None:
      history.append(_check(*pending))
  finally:
    # Also when a step is not finite (NonFiniteError): that step was not applied and no
    # checkpoint holds it (a step's metrics are checked before it is saved), so finishing the
    # save in flight and keeping the metrics so far leaves a run that resumes cleanly.
    bar.close()
    ckpt.close()
    writer.flush()
    write_json(os.path.join(workdir, 'metrics.json'), history)
  if config.eval_at_end and main_process:
    _evaluate(config, workdir, data_dir, step, writer)
  writer.close()
  return Run(state=state, step=step, metrics=history)


def _evaluate(config, workdir, data_dir, step, writer) -> dict:
  """The val split at checkpoint `step`, logged to TensorBoard (scalars and the picture)."""
  from uniscene_jax import evaluate

  result = evaluate.evaluate(config, workdir, data_dir, step)
  writer.scalars(step, {f'eval/{k}': v for k, v in result.items() if _is_number(v)})
  if 'picture' in result:
    writer.image(step, 'eval/top_view_target_vs_prediction', result['picture'])
  writer.flush()
  return result


def _model_fields(config) -> dict:
  fields = flax.traverse_util.flatten_dict(config.model.to_dict(), sep='.')
  fields = {f'model.{k}': list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
  fields['data.image_size'] = list(config.data.image_size)
  return fields


def check_workdir_config(workdir: str, config, resuming: bool) -> None:
  """Refuses to resume a workdir whose checkpoints were made for another model; else records it.

  <workdir>/config.json holds the config of the run that made the checkpoints.
  """
  path = os.path.join(workdir, 'config.json')
  fields = _model_fields(config)
  if resuming and os.path.isfile(path):
    with open(path) as f:
      saved = json.load(f).get('model_fields', {})
    diff = [
      f'{k}: checkpoint {saved.get(k)!r}, config {v!r}'
      for k, v in fields.items()
      if saved.get(k) != v
    ]
    if diff:
      raise ValueError(
        f'{workdir}: its checkpoints belong to another model config; use a new --workdir. '
        + '; '.join(diff[:8])
      )
    return
  os.makedirs(workdir, exist_ok=True)
  write_json(path, {'config': json.loads(config.to_json_best_effort()), 'model_fields': fields})


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def warm_start(source: str, params, batch_stats, fresh: tuple[str, ...] = ()):
  """(params, batch_stats) with every tensor found in `source` loaded, the rest as initialised.

  source: a PyTorch .pth (FCOS3D, BEVFormer or UniScene; mapped by the reference's key names) or
  a workdir (its latest checkpoint; tensors of the same path). Tensors whose path contains any of
  `fresh` (config.init_fresh: new layers, such as a class layer of another width) are not loaded;
  any other tensor whose shape differs is an error naming it, and so is a .pth of which (almost)
  nothing maps onto the model, or a workdir of which no parameter does. What was loaded, kept and
  skipped is printed.
  """
  variables = {'params': params, 'batch_stats': batch_stats}
  if not os.path.exists(source):
    raise ValueError(f'config.init_from={source!r}: no such .pth file or workdir')
  if source.endswith('.pth'):
    from uniscene_jax.convert import from_torch

    state_dict = from_torch.load_state_dict(source)
    variables, report = from_torch.variables_from_state_dict(state_dict, variables, fresh, source)
    print(f'init_from {source}: {report.summary()}')
    for key, reason in sorted(report.skipped.items()):
      if not key.endswith('num_batches_tracked'):
        print(f'  skipped {key}: {reason}')
    for key in report.missing:
      print(f'  kept as initialised: {key}')
    return variables['params'], variables['batch_stats']
  ckpt = Checkpoints(source)
  step = ckpt.latest_step()
  if step is None:
    raise ValueError(f'config.init_from={source!r}: no checkpoint in {ckpt.directory}')
  restored = ckpt.restore_raw(step)
  ckpt.close()
  out = []
  for name, tree in variables.items():
    flat_src = flax.traverse_util.flatten_dict(restored.get(name, {}), sep='/')
    flat = flax.traverse_util.flatten_dict(tree, sep='/')
    kept = []
    for k, v in flat.items():
      src = flat_src.get(k)
      if src is None or any(f in k for f in fresh):
        kept.append(k)
        continue
      if tuple(src.shape) != tuple(v.shape):
        raise ValueError(
          f'config.init_from={source!r}: {name}/{k} has shape {tuple(src.shape)} in the '
          f'checkpoint and {tuple(v.shape)} in this model (list it in config.init_fresh to '
          f'start it fresh)'
        )
      flat[k] = jnp.asarray(src, v.dtype)
    unused = sorted(set(flat_src) - set(flat))
    if name == 'params' and len(kept) == len(flat):
      found = ', '.join(sorted(flat_src)[:4]) or 'no parameters'
      raise ValueError(
        f"config.init_from={source!r}: none of the checkpoint's parameters (step {step}) has "
        f'a place in this model, which expects e.g. {next(iter(flat), "")}; the checkpoint '
        f'has {found}: is it a run of another model?'
      )
    print(
      f'init_from {source} (step {step}) {name}: {len(flat) - len(kept)} loaded, '
      f'{len(kept)} kept as initialised, {len(unused)} in the checkpoint skipped'
    )
    for k in kept:
      print(f'  kept as initialised: {k}')
    for k in unused:
      print(f'  skipped {k}: no such tensor in this model')
    out.append(flax.traverse_util.unflatten_dict(flat, sep='/'))
  return tuple(out)


def _check(step, metrics) -> dict:
  m = {k: float(np.asarray(v)) for k, v in metrics.items()}
  if not m['finite']:
    raise NonFiniteError(
      f'step {step}: loss or gradients are not finite (loss={m["loss"]}, '
      f'grad_norm={m["grad_norm"]}); stopping, the last checkpoint is kept'
    )
  if m['sca_overflow'] > 0:
    logging.warning(
      'step %d: %d visible queries exceeded model.sca_capacity (raise it)', step, m['sca_overflow']
    )
  return {'step': step, **m}


def optim_config(config) -> optim.OptimConfig:
  o = config.optim
  return optim.OptimConfig(
    learning_rate=o.learning_rate,
    weight_decay=o.weight_decay,
    backbone_lr_mult=o.backbone_lr_mult,
    grad_clip_norm=o.grad_clip_norm,
    num_epochs=o.num_epochs,
    warmup_steps=o.warmup_steps,
  )


def write_json(path: str, obj) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)
