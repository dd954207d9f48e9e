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
import optax
from absl import logging

from uniscene_jax import losses, optim, sharding
from uniscene_jax.checkpoint import Checkpoints
from uniscene_jax.data import augment
from uniscene_jax.data import input_pipeline as ip


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


def pool_target(target: jnp.ndarray, factor: int) -> jnp.ndarray:
  """[B, X, Y, Z] -> [B, X / f, Y / f, Z], the maximum over f x f cells (binary occupancy)."""
  b, x, y, z = target.shape
  return target.reshape(b, x // factor, factor, y // factor, factor, z).max((2, 4))


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
    )

    target, mask = batch['occ_target'], batch.get('occ_mask_camera')
    if config.data.target_pool > 1:  # coarse BEV for quick runs: a cell is occupied if any is
      target = pool_target(target, config.data.target_pool)
      mask = None if mask is None else pool_target(mask, config.data.target_pool)

    def loss_fn(params):
      (logits, aux), updates = model.apply(
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
      loss = losses.occupancy_focal_loss(
        logits, target, mask if config.data.target == 'occ3d' else None
      )
      return loss, (aux, updates['batch_stats'])

    (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = TrainState(state.step + 1, params, batch_stats, opt_state, jax.random.key_data(rng))
    # A non-finite step is not applied: the host stops on `finite` and keeps the last good state.
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    metrics = {
      'loss_occ': loss,
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


def train_and_evaluate(config, workdir: str, data_dir: str | None = None) -> Run:
  from uniscene_jax.models import build_model, init_variables, model_config_from

  data_dir = data_dir or config.data.data_dir
  mesh = sharding.make_mesh()
  process_count, process_index = jax.process_count(), jax.process_index()
  if config.batch_size % jax.device_count():
    raise ValueError(
      f'--config.batch_size={config.batch_size} is not divisible by the '
      f'{jax.device_count()} devices'
    )
  per_process = config.batch_size // process_count
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
    state = state.replace(params=warm_start(config.init_from, state.params))

  step_fn = jax.jit(
    make_train_step(model, tx, config),
    in_shardings=(replicated, sharding.data_sharding(mesh)),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )
  step = int(state.step)
  history = []
  pending = None
  t0 = time.time()
  while step < total_steps:
    batch = sharding.device_batch(next(data_iter), mesh)
    state, metrics = step_fn(state, batch)
    step += 1
    if pending is not None:
      history.append(_check(*pending))
    pending = (step, metrics)
    if step % config.log_every_steps == 0 or step == total_steps:
      history.append(_check(*pending))
      pending = None
      m = history[-1]
      rate = config.log_every_steps / max(time.time() - t0, 1e-9)
      t0 = time.time()
      print(
        f'step {step}/{total_steps} loss_occ {m["loss_occ"]:.5f} grad_norm {m["grad_norm"]:.3f}'
        f' ({rate:.2f} steps/s)',
        flush=True,
      )
    ckpt.save(step, state, data_iter.get_state(), force=step == total_steps)
  if pending is not None:
    history.append(_check(*pending))
  ckpt.close()
  _write_json(os.path.join(workdir, 'metrics.json'), history)
  return Run(state=state, step=step, metrics=history)


def warm_start(source: str, params):
  """params with every tensor of the same path and shape taken from `source`.

  source: a workdir (its latest checkpoint). Tensors absent from the source or of another shape
  keep their initial values; both lists are printed.
  """
  if source.endswith('.pth'):
    raise ValueError(f'config.init_from={source!r}: importing PyTorch weights is not available yet')
  ckpt = Checkpoints(source)
  step = ckpt.latest_step()
  if step is None:
    raise ValueError(f'config.init_from={source!r}: no checkpoint in {ckpt.directory}')
  restored = ckpt.manager.restore(step, args=ocp_args_state())['state']
  ckpt.close()
  flat_src = flax.traverse_util.flatten_dict(restored['params'], sep='/')
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  loaded, fresh = [], []
  for k, v in flat.items():
    src = flat_src.get(k)
    if src is not None and tuple(src.shape) == tuple(v.shape):
      flat[k] = jnp.asarray(src, v.dtype)
      loaded.append(k)
    else:
      fresh.append(k)
  print(f'init_from {source} (step {step}): {len(loaded)} tensors loaded, {len(fresh)} fresh')
  for k in fresh:
    print(f'  fresh: {k}')
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def ocp_args_state():
  import orbax.checkpoint as ocp

  return ocp.args.Composite(state=ocp.args.StandardRestore())


def _check(step, metrics) -> dict:
  m = {k: float(np.asarray(v)) for k, v in metrics.items()}
  if not m['finite']:
    raise NonFiniteError(
      f'step {step}: loss or gradients are not finite (loss_occ={m["loss_occ"]}, '
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


def _write_json(path: str, obj) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)
