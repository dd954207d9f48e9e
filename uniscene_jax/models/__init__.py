"""Flax models. `build_model` and `init_variables` are the entry points other parts use."""

import jax.numpy as jnp


def model_config_from(config):
  """A ModelConfig from an experiment config (ml_collections) or a ModelConfig itself.

  `config.model.arch == 'det'` gives the detector's DetectorConfig (a ModelConfig subclass).
  """
  from uniscene_jax.models.uniscene import ModelConfig

  if isinstance(config, ModelConfig):
    return config
  arch = config.model.get('arch', 'occ')
  if arch == 'det':
    from uniscene_jax.models.detector import detector_config

    return detector_config(config)
  if arch != 'occ':
    raise ValueError(f"config.model.arch must be 'occ' or 'det', got {arch!r}")
  from uniscene_jax.models.config import model_config

  return model_config(config)


def build_model(config):
  """The model of an experiment config or a ModelConfig: UniSceneOcc (pre-training), or
  UniSceneDet (detection) for a DetectorConfig / `config.model.arch == 'det'`."""
  from uniscene_jax.models.detector import DetectorConfig, UniSceneDet
  from uniscene_jax.models.uniscene import UniSceneOcc

  cfg = model_config_from(config)
  return UniSceneDet(cfg) if isinstance(cfg, DetectorConfig) else UniSceneOcc(cfg)


def init_variables(config, rng) -> dict:
  """{'params', 'batch_stats'} without data; works under jax.eval_shape.

  Every module is run once on inputs of the right widths: the convolutions on a small image
  (their parameters do not depend on its size), the head on zero features of the configured
  levels.
  """
  cfg = model_config_from(config)
  model = build_model(cfg)
  head, enc = cfg.head, cfg.head.encoder

  def touch(module):
    b, n = 1, head.num_cams
    module.features(jnp.zeros((b, n, 64, 64, 3)))
    feats = [jnp.zeros((b, n, h, w, enc.embed_dims)) for h, w in enc.spatial_shapes]
    bev, _ = module.pts_bbox_head.bev(
      feats,
      jnp.tile(jnp.eye(4), (b, n, 1, 1)),
      jnp.tile(jnp.eye(4), (b, 1, 1)),
      jnp.zeros((b, 18)),
      jnp.zeros((b, enc.bev_h * enc.bev_w, enc.embed_dims)),
      jnp.zeros((b,), bool),
    )
    return module.detect(bev) if hasattr(module, 'detect') else module.occupancy(bev)

  variables = model.init(rng, method=touch)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
