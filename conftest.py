"""Shared test fixtures: the embedded synthetic nuScenes world, written once per test session."""

import pytest

from uniscene_jax.data import synthetic_world


@pytest.fixture(scope='session')
def synthetic_world_dir(tmp_path_factory):
  """Root of the default synthetic world (nuscenes/, can_bus/, synthetic_world.json)."""
  root = tmp_path_factory.mktemp('world') / 'default'
  synthetic_world.write_world(str(root), synthetic_world.WorldOptions())
  return root


@pytest.fixture(scope='session')
def nusc(synthetic_world_dir):
  from nuscenes.nuscenes import NuScenes

  return NuScenes(
    version='v1.0-mini', dataroot=str(synthetic_world_dir / 'nuscenes'), verbose=False
  )
