"""Corrupted copies of image sets at 5 severities, deterministic and offline (in the spirit of MNIST-C / CIFAR-10-C).

Ten corruptions in four families: noise (gaussian_noise, shot_noise, impulse_noise), blur (gaussian_blur,
motion_blur), geometric (rotate, shear, translate) and photometric (contrast, brightness). Images are uint8
(N, H, W, C) as the datasets provide them; the result is uint8 of the same shape. The random corruptions draw from
``np.random.default_rng([seed, index of the corruption])``, the same draws at every severity, so the same seed gives
the same images and a higher severity moves every image further from the clean one.
"""
import numpy as np
from scipy import ndimage

SEVERITIES = (1, 2, 3, 4, 5)
_GAUSSIAN_SIGMA = (0.04, 0.08, 0.12, 0.18, 0.26)  # x 255.
_SHOT_PHOTONS = (60, 25, 12, 5, 3)  # Poisson rate at full intensity.
_IMPULSE_FRACTION = (0.02, 0.05, 0.09, 0.15, 0.25)
_BLUR_SIGMA = (0.4, 0.7, 1.0, 1.4, 2.0)  # Pixels at 28 px; scaled with the image size.
_MOTION_LENGTH = (3, 5, 7, 9, 13)  # Pixels at 28 px; odd, so the blur stays centred.
_ROTATE_DEGREES = (8, 16, 25, 35, 50)
_SHEAR = (0.1, 0.2, 0.3, 0.45, 0.6)
_TRANSLATE = (1, 2, 3, 4, 6)  # Pixels at 28 px.
_CONTRAST = (0.7, 0.5, 0.35, 0.22, 0.12)  # Factor towards each image's mean.
_BRIGHTNESS = (0.08, 0.16, 0.25, 0.35, 0.5)  # x 255 added.


def _px(value: float, images: np.ndarray) -> float:
  return value * images.shape[1] / 28.0


def _gaussian_noise(x, s, rng):
  return x + _GAUSSIAN_SIGMA[s - 1] * 255.0 * rng.standard_normal(x.shape)


def _shot_noise(x, s, rng):
  lam = _SHOT_PHOTONS[s - 1]
  return rng.poisson(x / 255.0 * lam) / lam * 255.0


def _impulse_noise(x, s, rng):
  u, salt = rng.uniform(size=x.shape), rng.uniform(size=x.shape) < 0.5
  return np.where(u < _IMPULSE_FRACTION[s - 1], np.where(salt, 255.0, 0.0), x)


def _gaussian_blur(x, s, rng):
  sigma = _px(_BLUR_SIGMA[s - 1], x)
  return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest")


def _motion_blur(x, s, rng):
  length = 2 * round((_px(_MOTION_LENGTH[s - 1], x) - 1) / 2) + 1
  return ndimage.uniform_filter1d(x, size=length, axis=2, mode="nearest")


def _affine(x, matrix_2x2):
  """x warped by a 2x2 map of (row, col) about the image centre, bilinear, zeros outside."""
  h, w = x.shape[1:3]
  m = np.eye(4)
  m[1:3, 1:3] = matrix_2x2
  centre = np.array([0, (h - 1) / 2, (w - 1) / 2, 0])
  return ndimage.affine_transform(x, m, offset=centre - m @ centre, order=1, mode="constant", cval=0.0)


def _rotate(x, s, rng):
  a = np.deg2rad(_ROTATE_DEGREES[s - 1])
  return _affine(x, np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]))


def _shear(x, s, rng):
  return _affine(x, np.array([[1.0, _SHEAR[s - 1]], [0.0, 1.0]]))


def _translate(x, s, rng):
  d = round(_px(_TRANSLATE[s - 1], x))
  return ndimage.shift(x, (0, d, d, 0), order=0, mode="constant", cval=0.0)


def _contrast(x, s, rng):
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  return (x - mean) * _CONTRAST[s - 1] + mean


def _brightness(x, s, rng):
  return x + _BRIGHTNESS[s - 1] * 255.0


CORRUPTIONS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur, "motion_blur": _motion_blur,
    "rotate": _rotate, "shear": _shear, "translate": _translate,
    "contrast": _contrast, "brightness": _brightness,
}


def corrupt(images_NxHxWxC: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
  """The images with corruption `name` at `severity` (1..5): uint8 of the same shape, deterministic in seed."""
  if name not in CORRUPTIONS:
    raise ValueError(f"corruption {name!r} is not known; allowed: {', '.join(CORRUPTIONS)}")
  if severity not in SEVERITIES:
    raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
  images = np.asarray(images_NxHxWxC)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {images.dtype} {images.shape}")
  rng = np.random.default_rng([seed, list(CORRUPTIONS).index(name)])
  out = CORRUPTIONS[name](images.astype(np.float64), severity, rng)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)
