"""Training batches: the temporal queue, can_bus deltas, BGR images, determinism and resumption."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from uniscene_jax.data import input_pipeline as ip


def test_queue_indices_follow_the_reference_draw():
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(200):
    q = ip.queue_indices(10, rng)
    assert len(q) == 4 and q[-1] == 10 and q[:3] == sorted(q[:3])
    assert set(q[:3]) <= {6, 7, 8, 9}
    seen.add(tuple(q[:3]))
  assert len(seen) == 4  # each of the four history frames gets dropped sometimes
  assert ip.queue_indices(1, rng)[:3] == [0, 0, 0]  # clamped at 0
  assert ip.queue_indices(0, rng) == [0, 0, 0, 0]


def test_queue_deltas():
  can = np.zeros((4, 18))
  can[:, 0] = [100.0, 101.0, 103.0, 50.0]
  can[:, 1] = [5.0, 5.5, 6.0, 7.0]
  can[:, 16] = 1.0
  can[:, 17] = [359.0, 1.0, 2.5, 90.0]
  out, exists = ip.queue_deltas(can, [b'a', b'a', b'a', b'b'])
  np.testing.assert_array_equal(exists, [False, True, True, False])
  np.testing.assert_allclose(out[:, 0], [0, 1, 2, 0])
  np.testing.assert_allclose(out[:, 1], [0, 0.5, 0.5, 0])
  np.testing.assert_allclose(out[:, 17], [0, -358.0, 1.5, 0])  # no wrap, as the reference
  np.testing.assert_array_equal(out[:, 16], 1.0)  # absolute yaw in radians kept


def _reference_queue(index, rnd, records, queue_length=4):
  """The reference dataset's training queue, step by step as it is written there: draw the
  history indices, then walk the frames rewriting each frame's CAN vector in place."""
  import copy

  index_list = list(range(index - queue_length, index))
  rnd.shuffle(index_list)
  index_list = sorted(index_list[1:])
  index_list.append(index)
  queue = [copy.deepcopy(records[max(0, i)]) for i in index_list]
  prev_scene, prev_pos, prev_angle = None, None, None
  for meta in queue:
    if meta['scene_token'] != prev_scene:
      meta['prev_bev_exists'] = False
      prev_scene = meta['scene_token']
      prev_pos = copy.deepcopy(meta['can_bus'][:3])
      prev_angle = copy.deepcopy(meta['can_bus'][-1])
      meta['can_bus'][:3] = 0
      meta['can_bus'][-1] = 0
    else:
      meta['prev_bev_exists'] = True
      tmp_pos = copy.deepcopy(meta['can_bus'][:3])
      tmp_angle = copy.deepcopy(meta['can_bus'][-1])
      meta['can_bus'][:3] -= prev_pos
      meta['can_bus'][-1] -= prev_angle
      prev_pos, prev_angle = copy.deepcopy(tmp_pos), copy.deepcopy(tmp_angle)
  return (
    [max(0, i) for i in index_list],
    np.stack([m['can_bus'] for m in queue]),
    [m['prev_bev_exists'] for m in queue],
  )


def test_queue_equals_the_literal_reference():
  import random

  rng = np.random.default_rng(5)
  scenes = [b'a'] * 6 + [b'b'] * 9 + [b'c'] * 5
  can = rng.normal(0, 50, (len(scenes), 18))
  records = [{'scene_token': s, 'can_bus': c.copy()} for s, c in zip(scenes, can, strict=True)]
  for seed in range(3):
    ours_rng, ref_rng = random.Random(seed), random.Random(seed)  # the same draws for both
    for index in range(len(scenes)):
      idx, ref_can, ref_exists = _reference_queue(index, ref_rng, records)
      assert ip.queue_indices(index, ours_rng) == idx
      got, exists = ip.queue_deltas(can[idx], [scenes[i] for i in idx])
      np.testing.assert_array_equal(exists, ref_exists)
      np.testing.assert_allclose(got, ref_can, rtol=0, atol=1e-12)


@pytest.fixture(scope='module')
def config(tfds_dir):
  return ip.PipelineConfig(data_dir=str(tfds_dir), batch_size=2, seed=3)


def test_batches_hold_the_queue(config, synthetic_world_dir):
  loader = ip.make_loader(config)
  batch = next(iter(loader))
  assert batch['img'].dtype == np.uint8 and batch['img'].shape == (2, 4, 6, 256, 416, 3)
  assert batch['lidar2img'].shape == (2, 4, 6, 4, 4) and batch['lidar2img'].dtype == np.float32
  assert batch['ego2lidar'].shape == (2, 4, 4, 4) and batch['can_bus'].shape == (2, 4, 18)
  assert batch['prev_bev_exists'].dtype == bool and batch['occ_target'].shape == (2, 200, 200, 16)
  assert not batch['prev_bev_exists'][:, 0].any()
  source = ip.open_source(config.data_dir, config.name, config.split)
  index = {source[i]['sample_token']: i for i in range(len(source))}
  for b in range(2):
    i = index[batch['sample_token'][b]]
    record = source[i]
    np.testing.assert_array_equal(batch['occ_target'][b], record['occ_binary'])
    np.testing.assert_allclose(batch['lidar2img'][b, -1], record['lidar2img'], rtol=1e-6)
    # Images: BGR as cv2 reads the files, zero padding below and to the right.
    from nuscenes.nuscenes import NuScenes

    nusc = NuScenes('v1.0-mini', str(synthetic_world_dir / 'nuscenes'), verbose=False)
    sample = nusc.get('sample', record['sample_token'].decode())
    sd = nusc.get('sample_data', sample['data']['CAM_BACK'])
    bgr = cv2.imread(os.path.join(nusc.dataroot, sd['filename']))
    img = batch['img'][b, -1, 3]
    np.testing.assert_array_equal(img[:225, :400], bgr)
    assert not img[225:].any() and not img[:, 400:].any()
    # can_bus of the current frame: delta to the previous queue frame when in the same scene.
    if batch['prev_bev_exists'][b, -1]:
      prev = source[index[batch['sample_token'][b]] - 1]  # one of the history frames
      delta = batch['can_bus'][b, -1, :3]
      assert np.linalg.norm(delta) > 0
      assert (
        np.linalg.norm(delta) <= np.linalg.norm(record['can_bus'][:3] - prev['can_bus'][:3]) * 2.01
      )


def test_record_reader_decodes_as_tfds(config):
  import tensorflow_datasets as tfds

  keys = tuple(tfds.builder(config.name, data_dir=config.data_dir).info.features)
  assert len(keys) == 23  # every feature of the contract, of each kind
  for split in ('train', 'val'):
    want = ip.open_source(config.data_dir, config.name, split, decode_images=False)
    got = ip.RecordReader(config.data_dir, config.name, split, keys)
    assert len(got) == len(want) > 0
    for i in range(len(want)):
      a, b = want[i], got[i]
      for k in keys:
        if isinstance(a[k], np.ndarray):
          assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
          np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
          assert type(a[k]) is type(b[k]) and list(np.ravel(a[k])) == list(np.ravel(b[k])), k
    assert got[0]['occ_binary'].any() and len(got[0]['images']) == 6
  with pytest.raises(ValueError, match=r"no feature 'occ_flow'"):
    ip.RecordReader(config.data_dir, config.name, 'train', ('images', 'occ_flow'))


def test_same_seed_same_batches_and_exact_resume(config):
  def tokens(it, n):
    return [tuple(next(it)['sample_token']) for _ in range(n)]

  a = tokens(iter(ip.make_loader(config)), 4)
  assert a == tokens(iter(ip.make_loader(config)), 4)
  other = ip.PipelineConfig(**{**config.__dict__, 'seed': 4})
  assert a != tokens(iter(ip.make_loader(other)), 4)
  it = iter(ip.make_loader(config))
  tokens(it, 2)
  state = it.get_state()
  rest = tokens(it, 2)
  resumed = iter(ip.make_loader(config))
  resumed.set_state(state)
  assert tokens(resumed, 2) == rest == a[2:]


def test_process_shards_are_disjoint(config):
  cfg = ip.PipelineConfig(**{**config.__dict__, 'num_epochs': 1, 'batch_size': 1})
  shards = [
    {t for batch in ip.make_loader(cfg, p, 2) for t in batch['sample_token']} for p in range(2)
  ]
  assert shards[0] and shards[1] and not shards[0] & shards[1]
  assert len(shards[0] | shards[1]) == 8  # 9 records, drop_remainder over 2 shards


def test_worker_processes_and_no_tensorflow(config):
  code = (
    'import sys\n'
    'from uniscene_jax.data import input_pipeline as ip\n'
    'if __name__ == "__main__":\n'
    f'  cfg = ip.PipelineConfig(data_dir={config.data_dir!r}, batch_size=2, worker_count=2)\n'
    '  it = iter(ip.make_loader(cfg))\n'
    '  b = [next(it) for _ in range(3)]\n'
    '  assert b[2]["img"].shape[:3] == (2, 4, 6)\n'
    '  # images decoded into shared memory by the workers = decoded in this process\n'
    '  import dataclasses, numpy as np\n'
    '  one = dataclasses.replace(cfg, num_epochs=1, shuffle=False)\n'
    '  def samples(c):\n'
    '    return {t: im for b in ip.make_loader(c) for t, im in zip(b["sample_token"], b["img"])}\n'
    '  got, want = samples(one), samples(dataclasses.replace(one, worker_count=0))\n'
    '  assert len(got) == 8 and got.keys() == want.keys()\n'
    '  for t in want:\n'
    '    np.testing.assert_array_equal(got[t], want[t])\n'
    '  assert "tensorflow" not in sys.modules, "the input pipeline imported TensorFlow"\n'
  )
  subprocess.run([sys.executable, '-c', code], check=True, timeout=300, cwd=os.getcwd())


def test_decode_queue_pads_and_names_a_bad_image():
  rng = np.random.default_rng(2)

  def jpeg(h, w, value):
    image = np.clip(value + rng.integers(-8, 9, (h, w, 3)), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode('.jpg', image)
    assert ok
    return buf.tobytes()

  frames = [[jpeg(40, 70, 10 * (t + n) + 20) for n in range(2)] for t in range(3)]
  out = ip.decode_queue(frames, 32)
  assert out.shape == (3, 2, 64, 96, 3) and out.dtype == np.uint8
  # The pixels OpenCV decodes (the reference reads images with cv2), exactly.
  want = cv2.imdecode(np.frombuffer(frames[2][1], np.uint8), cv2.IMREAD_COLOR)
  np.testing.assert_array_equal(out[2, 1, :40, :70], want)
  assert not out[:, :, 40:].any() and not out[..., 70:, :].any()
  frames[1][1] = jpeg(41, 70, 0)
  with pytest.raises(ValueError, match=r'frame 1 camera 1: \(41, 70, 3\)'):
    ip.decode_queue(frames)
  frames[1][1] = b'not an image'
  with pytest.raises(ValueError, match='frame 1 camera 1: undecodable JPEG'):
    ip.decode_queue(frames)


def test_jpeg_size_reads_the_frame_header():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
  for params in ([], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]):
    ok, buf = cv2.imencode('.jpg', image, params)
    assert ok
    assert ip.jpeg_size(buf.tobytes()) == (37, 53)
  ok, png = cv2.imencode('.png', image)
  with pytest.raises(ValueError, match='not a JPEG'):
    ip.jpeg_size(png.tobytes())


@pytest.mark.parametrize('shared_memory', [False, True])
def test_queue_batch_decodes_into_the_batch(shared_memory):
  from grain.multiprocessing import SharedMemoryArray

  rng = np.random.default_rng(1)

  def queue():
    images = rng.integers(0, 256, (2, 3, 40, 70, 3), dtype=np.uint8)
    return tuple(tuple(cv2.imencode('.jpg', im)[1].tobytes() for im in frame) for frame in images)

  samples = [{'img': queue(), 'can_bus': np.full(18, i, np.float32)} for i in range(2)]
  fn = ip.QueueBatch(32)
  if shared_memory:
    fn.enable_shared_memory_output()
  batch = fn(samples)
  if shared_memory:  # one block in /dev/shm, attached as the consuming process does
    assert isinstance(batch, ip.SharedBatch)
    batch = ip._Attached().batch(batch)
  assert batch.keys() == {'img', 'can_bus'}
  assert not isinstance(batch['img'], SharedMemoryArray)
  want = np.stack([ip.decode_queue(s['img'], 32) for s in samples])
  assert batch['img'].shape == (2, 2, 3, 64, 96, 3)
  np.testing.assert_array_equal(batch['img'], want)
  np.testing.assert_array_equal(batch['can_bus'][:, 0], [0, 1])
  # Decoding into a used buffer still leaves zero padding.
  out = np.full(want.shape[1:], 255, np.uint8)
  np.testing.assert_array_equal(ip.decode_queue(samples[1]['img'], 32, out), want[1])
  with pytest.raises(ValueError, match='out is uint8'):
    ip.decode_queue(samples[1]['img'], 32, out[:, :, :32])


def test_image_blocks_are_reused_once_the_consumer_lets_go():
  import gc

  rng = np.random.default_rng(3)

  def samples(n):
    images = rng.integers(0, 256, (n, 1, 2, 40, 70, 3), dtype=np.uint8)
    return [
      {
        'img': tuple(tuple(cv2.imencode('.jpg', im)[1].tobytes() for im in f) for f in q),
        'can_bus': np.array([2 * i, 2 * i + 1], np.float32),
        'token': np.bytes_(f'sample{i}'),
      }
      for i, q in enumerate(images)
    ]

  fn = ip.QueueBatch(32)
  fn.enable_shared_memory_output()
  attached = ip._Attached()
  first = fn(samples(2))
  held = attached.batch(first)['img']
  assert not os.path.exists(first.path)  # unlinked once both sides have it mapped
  second_samples = samples(2)
  second = fn(second_samples)
  assert second.path != first.path  # the first block is still held: a new one
  view = held[1, 0]  # a view keeps the block busy too
  del held
  gc.collect()
  third = fn(samples(2))
  assert third.path not in (first.path, second.path)
  del view
  gc.collect()
  fourth_samples = samples(2)
  fourth = fn(fourth_samples)
  assert fourth.path == first.path  # released: reused, refilled with this batch's images
  want = np.stack([ip.decode_queue(s['img'], 32) for s in fourth_samples])
  got = attached.batch(fourth)
  np.testing.assert_array_equal(got['img'], want)
  np.testing.assert_array_equal(got['can_bus'], [[0.0, 1.0], [2.0, 3.0]])
  assert got['token'].tolist() == [b'sample0', b'sample1']
  np.testing.assert_array_equal(
    attached.batch(second)['img'],
    np.stack([ip.decode_queue(s['img'], 32) for s in second_samples]),
  )
  assert len(fn._blocks.blocks) == 3
  unattached = fn(samples(1))  # another shape: another block
  assert len(fn._blocks.blocks) == 4

  # A block is refilled without clearing its padding only after a batch of the same images.
  def sized(h):
    image = rng.integers(0, 256, (h, 70, 3), dtype=np.uint8)
    return [{'img': ((cv2.imencode('.jpg', image)[1].tobytes(),),), 'can_bus': np.zeros(2)}]

  small, paths = sized(40), set()
  for batch_samples in (sized(50), small, small):  # 50 and 40 rows both pad to 64
    batch = fn(batch_samples)
    paths.add(batch.path)
    got = attached.batch(batch)['img']
    np.testing.assert_array_equal(got[0], ip.decode_queue(batch_samples[0]['img'], 32))
    del got
    gc.collect()
  assert len(paths) == 1  # one block, reused
  # A worker's exit removes its free blocks; a busy one may be a batch on its way to the
  # consuming process (here the third and the other-shape batches, never attached), which
  # removes it at its exit.
  fn._blocks.close()
  left = {path for path, *_ in fn._blocks.blocks if os.path.exists(path)}
  assert left == {third.path, unattached.path}
  ip._remove_orphan_blocks(os.getppid())
  assert not any(os.path.exists(path) for path, *_ in fn._blocks.blocks)
