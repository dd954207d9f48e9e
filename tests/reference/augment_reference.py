"""The reference's image augmentation, step by step in numpy and OpenCV as its data pipeline runs
it on each image (mmdet3d's PhotoMetricDistortionMultiViewImage, mmcv's normalisation and
padding, BEVFormer's GridMask): the baseline of tests/test_augment.py and tools/bench_augment."""

import cv2
import numpy as np

MEAN_BGR = np.array([103.530, 116.280, 123.675], np.float32)


def photometric_reference(img, p):
  """mmdet3d's PhotoMetricDistortion on one float32 BGR image, with the draws given."""
  img = img.copy()
  if p['brightness_on']:
    img += p['brightness']
  if p['contrast_on'] and not p['contrast_last']:
    img *= p['contrast']
  img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
  if p['saturation_on']:
    img[..., 1] *= p['saturation']
  if p['hue_on']:
    img[..., 0] += p['hue']
    img[..., 0][img[..., 0] > 360] -= 360
    img[..., 0][img[..., 0] < 0] += 360
  img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
  if p['contrast_on'] and p['contrast_last']:
    img *= p['contrast']
  if p['swap_on']:
    img = img[..., p['permutation']]
  return img


def grid_mask_reference(d, st_h, st_w, h, w, ratio=0.5):
  """BEVFormer's GridMask (mode 1, no rotation) for period d and band starts, [h, w] 0/1."""
  hh, ww = int(1.5 * h), int(1.5 * w)
  band = min(max(int(ratio * d + 0.5), 1), d - 1)
  mask = np.ones((hh, ww), np.float32)
  for i in range(hh // d):
    s = d * i + st_h
    mask[s : min(s + band, hh), :] = 0
  for i in range(ww // d):
    s = d * i + st_w
    mask[:, s : min(s + band, ww)] = 0
  mask = mask[(hh - h) // 2 : (hh - h) // 2 + h, (ww - w) // 2 : (ww - w) // 2 + w]
  return 1 - mask


def normalize_and_pad(img, divisor=32):
  """mmcv's imnormalize (mean subtracted, std 1, BGR kept) then padding bottom/right with 0."""
  img = img - MEAN_BGR
  h, w = img.shape[:2]
  out = np.zeros((-(-h // divisor) * divisor, -(-w // divisor) * divisor, 3), np.float32)
  out[:h, :w] = img
  return out
