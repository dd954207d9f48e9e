r"""Benchmark: the training image augmentation on the device against the reference's per-image
numpy / OpenCV steps, on the same images, in one run.

    python -m uniscene_jax.tools.bench_augment [--image_size 900 1600] [--queue 4] [--repeats 3]

One sample of `--queue` frames x 6 cameras (random uint8 BGR, padded to a multiple of 32):
  jax        `augment.augment_batch` in training mode (photometric distortion of every image,
             normalisation, GridMask on the current frame), jitted, a fresh key per call;
  reference  the same steps as the reference's data pipeline runs them, image by image in one
             process: float conversion, PhotoMetricDistortion with OpenCV's HSV conversions,
             normalisation and padding, GridMask on the current frame's images
             (tests/reference/augment_reference.py).
Medians of --repeats after a warm-up. Run from the repository root.
"""

import argparse
import os
import time

import numpy as np


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--image_size', type=int, nargs=2, default=(900, 1600), metavar=('H', 'W'))
  p.add_argument('--queue', type=int, default=4)
  p.add_argument('--repeats', type=int, default=3)
  args = p.parse_args(argv)
  import jax

  from tests.reference import augment_reference as ref
  from uniscene_jax.data import augment
  from uniscene_jax.models.config import padded_size

  h, w = args.image_size
  ph, pw = padded_size((h, w))
  rng = np.random.default_rng(0)
  img = np.zeros((1, args.queue, 6, ph, pw, 3), np.uint8)
  img[..., :h, :w, :] = rng.integers(0, 256, (1, args.queue, 6, h, w, 3), dtype=np.uint8)

  fn = jax.jit(lambda k, x: augment.augment_batch(k, x, (h, w), True))
  device_img = jax.device_put(img)
  keys = iter(jax.random.split(jax.random.key(0), args.repeats + 1))

  def run_jax():
    fn(next(keys), device_img).block_until_ready()

  def run_reference():
    out = np.empty(img.shape, np.float32)
    for t in range(args.queue):
      for n in range(6):
        draws = {
          'brightness_on': rng.random() < 0.5,
          'brightness': rng.uniform(-32, 32),
          'contrast_last': rng.random() < 0.5,
          'contrast_on': rng.random() < 0.5,
          'contrast': rng.uniform(0.5, 1.5),
          'saturation_on': rng.random() < 0.5,
          'saturation': rng.uniform(0.5, 1.5),
          'hue_on': rng.random() < 0.5,
          'hue': rng.uniform(-18, 18),
          'swap_on': rng.random() < 0.5,
          'permutation': rng.permutation(3),
        }
        x = ref.photometric_reference(img[0, t, n, :h, :w].astype(np.float32), draws)
        out[0, t, n] = ref.normalize_and_pad(x)
    d = int(rng.integers(2, ph))
    mask = ref.grid_mask_reference(d, int(rng.integers(0, d)), int(rng.integers(0, d)), ph, pw)
    out[0, -1] *= mask[None, :, :, None]
    return out

  times = {}
  for name, run in (
    ('jax (device, jitted)', run_jax),
    ('reference (numpy, OpenCV)', run_reference),
  ):
    t0 = time.perf_counter()
    run()  # warm-up (compilation for jax)
    first = time.perf_counter() - t0
    samples = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      run()
      samples.append(time.perf_counter() - t0)
    times[name] = float(np.median(samples))
    print(f'{name:28s} {times[name]:7.3f} s per sample (warm-up {first:.2f} s)')
  jax_s, ref_s = times.values()
  print(
    f'{args.queue} frames x 6 cameras of {h} x {w} (padded {ph} x {pw}), {os.cpu_count()} cores; '
    f'ratio jax / reference {jax_s / ref_s:.2f}; load average {os.getloadavg()[0]:.2f}'
  )


if __name__ == '__main__':
  main()
