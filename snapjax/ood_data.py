"""Out-of-distribution sets, offline, in each dataset's raw image format (uint8 (N, H, W, C)).

Fashion-MNIST: scikit-learn's UCI optical digits (1,797 8x8 images shipped inside the package) upscaled to 20x20
and centred in 28x28, as MNIST's digits are (a real, MNIST-like far-OOD set), plus uniform and Gaussian noise
images. CIFAR-10 / CIFAR-100 / SVHN (uncertainty-baselines' protocol): the other datasets' test splits from the
run's TFDS data_dir, skipped when not prepared there; noise images for every in-memory dataset.
"""
import os
import re
from typing import Callable

import numpy as np
from scipy import ndimage

from snapjax import data
from snapjax.errors import UserError

NUM_NOISE = 2000  # Noise images per noise set.
NOISE_SEED = 0
# Dataset -> the TFDS datasets whose test split is its OOD set.
TFDS_OOD = {"cifar10": ("svhn_cropped", "cifar100"), "cifar100": ("svhn_cropped", "cifar10"),
            "svhn_cropped": ("cifar10",)}


def digits_28x28() -> np.ndarray:
  """scikit-learn's 1,797 handwritten digits as uint8 (1797, 28, 28, 1): 0..16 to 0..255, bilinear 8 -> 20 px,
  4 px of black border; light strokes on black, as MNIST."""
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:
    raise UserError("the digits OOD set needs scikit-learn: pip install scikit-learn (or pip install -e .)") from e
  images = load_digits().images.astype(np.float64) * (255.0 / 16.0)  # (1797, 8, 8).
  big = ndimage.zoom(images, (1, 2.5, 2.5), order=1, mode="nearest", grid_mode=True)
  out = np.zeros((len(images), 28, 28), np.float64)
  out[:, 4:24, 4:24] = big
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)[..., None]


def noise_images(shape: tuple[int, int, int], kind: str, num: int = NUM_NOISE, seed: int = NOISE_SEED) -> np.ndarray:
  """uint8 noise images: "uniform" U{0..255} or "gaussian" N(128, 64^2) clipped, per pixel, seeded."""
  rng = np.random.default_rng([seed, 0 if kind == "uniform" else 1])
  if kind == "uniform":
    return rng.integers(0, 256, (num, *shape), dtype=np.uint8)
  if kind == "gaussian":
    return np.clip(np.rint(128 + 64 * rng.standard_normal((num, *shape))), 0, 255).astype(np.uint8)
  raise ValueError(f"kind={kind!r}; allowed: uniform, gaussian")


def ood_sets(spec: data.DatasetSpec, data_dir: str | None,
             num_noise: int = NUM_NOISE) -> tuple[dict[str, Callable[[], np.ndarray]], list[str]]:
  """({name: loader of its uint8 images}, skipped) for an in-memory dataset; skipped holds one line per set that
  is not available (a TFDS dataset not prepared in data_dir)."""
  sets, skipped = {}, []
  if spec.name == "fashion_mnist":
    sets["digits"] = digits_28x28
  for name in TFDS_OOD.get(spec.name, ()):
    other = data.get_spec(name)
    root = _tfds_root(data_dir)
    if "://" not in root and not os.path.isdir(os.path.join(root, other.tfds_name)):
      skipped.append(f"OOD set {name} skipped: {other.tfds_name} is not prepared in TFDS data_dir={root} "
                     f"(tfds build {other.tfds_name} --data_dir {root} to add it)")
      continue
    sets[name] = lambda other=other: data.load_arrays(other, other.eval_split, data_dir=data_dir)[0]
  for kind in ("uniform", "gaussian"):
    sets[f"{kind}_noise"] = lambda kind=kind: noise_images(spec.image_shape, kind, num_noise)
  return sets, skipped



CIFAR10_C = "cifar10_corrupted"  # TFDS's CIFAR-10-C: one builder config per corruption and severity, "NAME_SEVERITY".
_C_CONFIG = re.compile(r"^([a-z_]+)_([1-5])$")


def _tfds_root(data_dir: str | None) -> str:
  return os.path.expanduser(data_dir or os.path.join("~", "tensorflow_datasets"))


def cifar10_c_configs(data_dir: str | None) -> list[tuple[str, int]]:
  """(corruption, severity) of every CIFAR-10-C config prepared in the TFDS data_dir (none: an empty list)."""
  folder = os.path.join(_tfds_root(data_dir), CIFAR10_C)
  if "://" in folder or not os.path.isdir(folder):
    return []
  found = [_C_CONFIG.match(name) for name in sorted(os.listdir(folder))]
  return [(m.group(1), int(m.group(2))) for m in found if m and os.path.isdir(os.path.join(folder, m.group(0)))]


def load_cifar10_c(data_dir: str | None, corruption: str, severity: int,
                   num: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The first `num` (all: None) test images and labels of one CIFAR-10-C config, uint8 (n, 32, 32, 3) and int32."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(f"{CIFAR10_C}/{corruption}_{severity}", data_dir=_tfds_root(data_dir))
  ds = builder.as_dataset(split="test" if num is None else f"test[:{num}]", shuffle_files=False)
  chunks = list(tfds.as_numpy(ds.map(lambda ex: (ex["image"], ex["label"])).batch(1024)))
  if not chunks:
    raise UserError(f"{CIFAR10_C}/{corruption}_{severity} in {_tfds_root(data_dir)} has no test examples")
  keep = slice(None, num)  # The split string already cuts it; kept for readers that do not slice.
  return (np.concatenate([x for x, _ in chunks]).astype(np.uint8)[keep],
          np.concatenate([y for _, y in chunks]).astype(np.int32)[keep])
