"""Shared test fixtures: the embedded synthetic nuScenes world, written once per test session."""

import os
import tempfile

# Tests compile many small programs and run some of them for several steps. LLVM at -O1 compiles
# about 15 % faster than the default -O2 and runs the tiny train step 1.4x slower; at -O0 it
# compiled 35 % faster but ran 15x slower, which cost the train tests more than it saved (suite
# 880 s at -O0, 663 s at -O1). Set before jax starts its backend; subprocesses inherit it (tests
# that set XLA_FLAGS for a subprocess append to it).
os.environ['XLA_FLAGS'] = ' '.join(
  filter(None, (os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=1'))
)

import jax  # noqa: E402
import pytest  # noqa: E402

from uniscene_jax.data import synthetic_world  # noqa: E402

# Tests compile the same small models many times (each train run builds its own jit): a
# compilation cache for this session makes the repeats cheap. Subprocesses inherit it.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='jax_cache_'))
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def pytest_collection_modifyitems(items):
  """Tests marked slow(seconds=N) run first, longest first: with parallel workers (`make test`)
  the long ones then overlap each other and the short ones fill in around them."""

  def seconds(item):
    mark = item.get_closest_marker('slow')
    return -float(mark.kwargs.get('seconds', 10)) if mark else 0.0

  items.sort(key=seconds)  # stable: the rest keep their collection order


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


@pytest.fixture(scope='session')
def tfds_dir(synthetic_world_dir, tmp_path_factory):
  """data_dir holding nuscenes_occ/mini built from the default synthetic world (in-process)."""
  import tensorflow_datasets as tfds

  from data_builders.nuscenes_occ import nuscenes_occ_dataset_builder as nbuilder

  out = tmp_path_factory.mktemp('tfds')
  nbuilder.Builder(data_dir=str(out), config='mini').download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(synthetic_world_dir))
  )
  return out
