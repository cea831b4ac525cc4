"""Datasets for snapshot ensembles: registry, offline loaders, on-device augmentation, streaming.

Small datasets (CIFAR, SVHN, Fashion-MNIST, Tiny ImageNet) are loaded whole into host memory as
uint8 NHWC arrays (`load_arrays`) and augmented on device (`augment_batch`); ImageNet is streamed
with tf.data (`make_stream`). Nothing here touches the network: a dataset that is not on disk is a
`DataError` saying where it was looked for and how to get it.

TensorFlow and TFDS are imported lazily, so `import snapjax` stays light.
"""
from __future__ import annotations

import dataclasses
import gzip
import math
import os
import re
import struct
import zlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.errors import ConfigError, DataError

AUGMENTS = ("crop_flip", "none", "imagenet")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the trainer needs to know about one dataset (hashable: usable as a jit static arg)."""
  name: str
  tfds_name: str | None  # TFDS builder name, None if only a local loader exists.
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) of the arrays the model sees.
  in_memory: bool  # True: `load_arrays` + `augment_batch`; False: `make_stream`.
  augment: str  # One of AUGMENTS.
  crop_pad: int  # Zero padding (pixels) before the random crop of "crop_flip".
  mean: tuple[float, ...]  # Per-channel mean, 0..255 units.
  std: tuple[float, ...]  # Per-channel standard deviation, 0..255 units.
  train_split: str  # Split string for training (TFDS syntax).
  eval_split: str  # Split string for the reported test error.
  val_split: str | None  # Held-out validation split, if the paper uses one.
  num_train: int  # Examples in train_split.
  num_eval: int  # Examples in eval_split.

  def __post_init__(self):
    if self.augment not in AUGMENTS:
      raise ConfigError(f"DatasetSpec {self.name}: augment={self.augment!r}, expected one of {AUGMENTS}")
    if len(self.image_shape) != 3 or min(self.image_shape) < 1:
      raise ConfigError(f"DatasetSpec {self.name}: image_shape={self.image_shape}, expected (H, W, C) > 0")
    channels = self.image_shape[2]
    if len(self.mean) != channels or len(self.std) != channels or min(self.std) <= 0:
      raise ConfigError(
          f"DatasetSpec {self.name}: mean={self.mean}, std={self.std}, expected {channels} values "
          "each, std > 0")
    if self.num_classes < 2 or self.crop_pad < 0:
      raise ConfigError(
          f"DatasetSpec {self.name}: num_classes={self.num_classes}, crop_pad={self.crop_pad}, "
          "expected num_classes >= 2 and crop_pad >= 0")


# Per-channel statistics (0..255 units) of the training sets:
# - CIFAR-10/100: the values used by fb.resnet.torch and the DenseNet / Snapshot Ensembles Torch
#   code (CIFAR-10 mean 125.3 123.0 113.9, std 63.0 62.1 66.7; CIFAR-100 mean 129.3 124.1 112.4,
#   std 68.2 65.4 70.4).
# - SVHN (73,257 train images): mean 0.4377 0.4438 0.4728, std 0.1980 0.2010 0.1970, times 255.
# - Fashion-MNIST (60,000 train images): mean 0.2860, std 0.3530, times 255 = 72.94, 90.02
#   (checked against the real files in tests/test_data.py when they are installed).
# - Tiny ImageNet (100,000 train images): mean 0.4802 0.4481 0.3975, std 0.2302 0.2265 0.2262.
# - ImageNet: the usual 0.485 0.456 0.406 / 0.229 0.224 0.225, times 255.
DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        name="cifar10", tfds_name="cifar10", num_classes=10, image_shape=(32, 32, 3),
        in_memory=True, augment="crop_flip", crop_pad=4,
        mean=(125.3, 123.0, 113.9), std=(63.0, 62.1, 66.7),
        train_split="train", eval_split="test", val_split=None,
        num_train=50_000, num_eval=10_000),
    "cifar100": DatasetSpec(
        name="cifar100", tfds_name="cifar100", num_classes=100, image_shape=(32, 32, 3),
        in_memory=True, augment="crop_flip", crop_pad=4,
        mean=(129.3, 124.1, 112.4), std=(68.2, 65.4, 70.4),
        train_split="train", eval_split="test", val_split=None,
        num_train=50_000, num_eval=10_000),
    # The paper holds out 6,000 of the 73,257 training images for validation and uses no
    # augmentation: train on the first 67,257, validate on the last 6,000, report on "test".
    "svhn_cropped": DatasetSpec(
        name="svhn_cropped", tfds_name="svhn_cropped", num_classes=10, image_shape=(32, 32, 3),
        in_memory=True, augment="none", crop_pad=0,
        mean=(111.61, 113.17, 120.56), std=(50.49, 51.26, 50.24),
        train_split="train[:-6000]", eval_split="test", val_split="train[-6000:]",
        num_train=67_257, num_eval=26_032),
    # Streamed; `make_stream` does the random-resized crop / centre crop, so crop_pad is unused.
    "imagenet2012": DatasetSpec(
        name="imagenet2012", tfds_name="imagenet2012", num_classes=1000,
        image_shape=(224, 224, 3), in_memory=False, augment="imagenet", crop_pad=0,
        mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
        train_split="train", eval_split="validation", val_split=None,
        num_train=1_281_167, num_eval=50_000),
    # Loaded from the raw IDX files (see `load_fashion_mnist`); TFDS is the fallback.
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist", tfds_name="fashion_mnist", num_classes=10, image_shape=(28, 28, 1),
        in_memory=True, augment="crop_flip", crop_pad=4,
        mean=(72.94,), std=(90.02,),
        train_split="train", eval_split="test", val_split=None,
        num_train=60_000, num_eval=10_000),
    # 64x64 images: pad 8 (the CIFAR pad 4 scaled with the image). The paper's RGB intensity
    # jitter is not applied. The test set has no public labels, so "val" is the reported split.
    "tiny_imagenet": DatasetSpec(
        name="tiny_imagenet", tfds_name=None, num_classes=200, image_shape=(64, 64, 3),
        in_memory=True, augment="crop_flip", crop_pad=8,
        mean=(122.45, 114.27, 101.36), std=(58.70, 57.76, 57.68),
        train_split="train", eval_split="val", val_split=None,
        num_train=100_000, num_eval=10_000),
}


def get_spec(name: str) -> DatasetSpec:
  """Returns the registered spec called `name`."""
  if name not in DATASETS:
    raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
  return DATASETS[name]


# ----------------------------------------------------------------------------- IDX files

# IDX type codes (http://yann.lecun.com/exdb/mnist/ file format), all big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (gzip-compressed or not) into a native-endian array, checking its length."""
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"cannot read IDX file {path}: {e.strerror}") from None
  if raw[:2] == _GZIP_MAGIC:
    try:
      raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
      raise DataError(f"corrupt or truncated gzip IDX file {path}: {e}") from None
  if len(raw) < 4:
    raise DataError(f"truncated IDX file {path}: expected at least a 4-byte header, found {len(raw)} bytes")
  zero, code, ndim = struct.unpack(">HBB", raw[:4])
  if zero != 0 or code not in _IDX_DTYPES:
    raise DataError(
        f"not an IDX file: {path}: expected magic 0x0000 and type code in "
        f"{sorted(hex(c) for c in _IDX_DTYPES)}, found magic {raw[:4].hex()}")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(
        f"truncated IDX file {path}: expected a {header}-byte header for {ndim} dims, "
        f"found {len(raw)} bytes")
  dims = struct.unpack(f">{ndim}I", raw[4:header])
  dtype = np.dtype(_IDX_DTYPES[code])
  expected = header + math.prod(dims) * dtype.itemsize
  if len(raw) != expected:
    raise DataError(
        f"{'truncated' if len(raw) < expected else 'oversized'} IDX file {path}: expected "
        f"{expected} bytes for shape {dims} of {dtype.name}, found {len(raw)}")
  array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
  return array.astype(dtype.newbyteorder("="))


_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_FASHION_MNIST_HELP = (
    "install them with `apt-get install dataset-fashion-mnist` (puts them in "
    "/usr/share/datasets/fashion-mnist), or download the four files from the Fashion-MNIST project "
    "into a directory and pass --config.fashion_mnist_dir=DIR (train.py) or --fashion_mnist_dir=DIR (eval.py)")


def _find_idx(directory: str, stem: str) -> str:
  """Returns the path of `stem` or `stem.gz` in `directory`, else a DataError listing both."""
  tried = [os.path.join(directory, stem + ".gz"), os.path.join(directory, stem)]
  for path in tried:
    if os.path.isfile(path):
      return path
  raise DataError(f"Fashion-MNIST file not found (tried {', '.join(tried)}); {_FASHION_MNIST_HELP}")


def load_fashion_mnist(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads Fashion-MNIST `split` ("train" or "test") from raw IDX files: (images_NxHxWx1 uint8, labels_N int32)."""
  if split not in _FASHION_MNIST_PREFIX:
    raise ValueError(f"split={split!r}, expected one of {tuple(_FASHION_MNIST_PREFIX)}")
  directory = os.fspath(directory)
  prefix = _FASHION_MNIST_PREFIX[split]
  if not os.path.isdir(directory):
    tried = [os.path.join(directory, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
    raise DataError(
        f"Fashion-MNIST directory {directory} does not exist (looked for {', '.join(tried)}); "
        f"{_FASHION_MNIST_HELP}")
  images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
  labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise DataError(
        f"bad Fashion-MNIST images file {images_path}: expected uint8 N x H x W, found "
        f"{images.dtype} of shape {images.shape}")
  if labels.ndim != 1 or len(labels) != len(images):
    raise DataError(
        f"bad Fashion-MNIST labels file {labels_path}: expected {len(images)} labels (one per "
        f"image in {images_path}), found shape {labels.shape}")
  return images[..., None], labels.astype(np.int32)


# ----------------------------------------------------------------------------- local splits

_SPLIT_RE = re.compile(r"^(\w+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")


def _split_bound(text: str | None, n: int) -> int | None:
  """Turns "12", "-6000" or "50%" into an absolute index for a split of n examples."""
  if text is None:
    return None
  if text.endswith("%"):
    return int(round(int(text[:-1]) * n / 100))
  return int(text)


def slice_split(split: str, sizes: dict[str, int]) -> tuple[str, slice]:
  """Parses "name", "name[a:b]" or "name[a%:b%]" (TFDS syntax) into (name, slice) for local data."""
  match = _SPLIT_RE.match(split.replace(" ", ""))
  if match is None or match.group(1) not in sizes:
    raise ConfigError(
        f"split={split!r}: expected NAME or NAME[start:stop] (ints or percents) with NAME one of "
        f"{sorted(sizes)}")
  name, start, stop = match.groups()
  n = sizes[name]
  return name, slice(_split_bound(start, n), _split_bound(stop, n))


# ----------------------------------------------------------------------------- Tiny ImageNet

_TINY_IMAGENET_HELP = (
    "download and unzip tiny-imagenet-200.zip (Stanford CS231n) and pass "
    "--config.tiny_imagenet_dir=PATH/tiny-imagenet-200 (the directory holding wnids.txt)")


def _tiny_imagenet_root(directory: str | os.PathLike | None) -> str:
  """Returns the directory holding wnids.txt (accepts its parent too)."""
  if directory is None:
    raise DataError(f"tiny_imagenet_dir is not set; {_TINY_IMAGENET_HELP}")
  directory = os.fspath(directory)
  tried = [os.path.join(directory, "wnids.txt"),
           os.path.join(directory, "tiny-imagenet-200", "wnids.txt")]
  for path in tried:
    if os.path.isfile(path):
      return os.path.dirname(path)
  raise DataError(f"Tiny ImageNet not found (tried {', '.join(tried)}); {_TINY_IMAGENET_HELP}")


def _tiny_imagenet_files(root: str, split: str) -> list[tuple[str, int]]:
  """Lists (image path, label) of a Tiny ImageNet split in a fixed order; labels index sorted wnids."""
  with open(os.path.join(root, "wnids.txt")) as f:
    wnids = sorted(line.strip() for line in f if line.strip())
  label_of = {wnid: i for i, wnid in enumerate(wnids)}
  files = []
  if split == "train":
    for wnid in wnids:
      folder = os.path.join(root, "train", wnid, "images")
      if not os.path.isdir(folder):
        raise DataError(f"Tiny ImageNet folder missing: {folder}; {_TINY_IMAGENET_HELP}")
      names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpeg", ".jpg", ".png")))
      files.extend((os.path.join(folder, n), label_of[wnid]) for n in names)
  else:
    annotations = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(annotations):
      raise DataError(f"Tiny ImageNet file missing: {annotations}; {_TINY_IMAGENET_HELP}")
    with open(annotations) as f:
      rows = [line.split("\t") for line in f if line.strip()]
    for row in sorted(rows):
      if len(row) < 2 or row[1].strip() not in label_of:
        raise DataError(
            f"bad line in {annotations}: {chr(9).join(row).strip()!r}; expected "
            "'<file>\\t<wnid listed in wnids.txt>\\t...'")
      files.append((os.path.join(root, "val", "images", row[0]), label_of[row[1].strip()]))
  return files


def load_tiny_imagenet(directory: str | os.PathLike | None, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Decodes Tiny ImageNet `split` ("train", "val", sliceable) from the standard folder layout."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  root = _tiny_imagenet_root(directory)
  name, part = slice_split(split, {"train": 100_000, "val": 10_000})
  files = _tiny_imagenet_files(root, name)[part]
  if not files:
    raise DataError(f"Tiny ImageNet split {split!r} in {root} has no images")
  shape = DATASETS["tiny_imagenet"].image_shape
  images = np.empty((len(files), *shape), np.uint8)
  for i, (path, _) in enumerate(files):
    try:
      with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    except OSError as e:
      raise DataError(f"cannot decode Tiny ImageNet image {path}: {e}") from None
    if array.shape != shape:
      raise DataError(f"Tiny ImageNet image {path} has shape {array.shape}, expected {shape}")
    images[i] = array
  labels = np.array([label for _, label in files], np.int32)
  return images, labels


# ----------------------------------------------------------------------------- TFDS

def _tfds_builder(spec: DatasetSpec, data_dir: str | os.PathLike | None) -> Any:
  """Returns the TFDS builder of `spec` reading from `data_dir`, never downloading."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if spec.tfds_name is None:
    raise ConfigError(f"dataset {spec.name} has no TFDS builder")
  try:
    return tfds.builder(spec.tfds_name, data_dir=None if data_dir is None else os.fspath(data_dir))
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"cannot open TFDS dataset {spec.tfds_name} in data_dir={data_dir}: {first}") from None


def _tfds_split(builder: Any, split: Any, **kwargs: Any) -> Any:
  """Opens a split as a tf.data.Dataset, or raises a one-line DataError if it is not prepared."""
  root = os.fspath(builder.data_dir_root)
  how = (
      f"prepare it on a machine with network access (`tfds build {builder.name} --data_dir {root}`; "
      "ImageNet also needs its manual download) or copy a prepared "
      f"{builder.name}/ directory into {root}, then pass that data_dir")
  # A prepared dataset is a complete version folder; TFDS only renames it into place when done.
  # The existence check itself is left to as_dataset, which tfds.testing.mock_data patches.
  if builder.data_path.exists() and not builder.is_prepared():
    raise DataError(f"TFDS dataset {builder.name} at {builder.data_path} is incomplete; {how}")
  try:
    return builder.as_dataset(split=split, **kwargs)
  except AssertionError:
    raise DataError(f"TFDS dataset {builder.name} is not prepared in data_dir={root}; {how}") from None
  except (ValueError, KeyError) as e:
    first = str(e).strip().splitlines()[0]
    raise DataError(f"cannot read split {split!r} of {builder.name} in data_dir={root}: {first}") from None


def _load_tfds_arrays(spec: DatasetSpec, split: str, data_dir: Any) -> tuple[np.ndarray, np.ndarray]:
  """Reads a whole TFDS split into numpy by iterating batches (batch_size=-1 crashes TF 2.21 mocks)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = _tfds_builder(spec, data_dir)
  ds = _tfds_split(builder, split)
  ds = ds.map(lambda ex: (ex["image"], ex["label"])).batch(4096)
  chunks = list(tfds.as_numpy(ds))
  if not chunks:
    raise DataError(f"split {split!r} of {builder.name} in {os.fspath(builder.data_dir_root)} is empty")
  images = np.concatenate([x for x, _ in chunks])
  labels = np.concatenate([y for _, y in chunks]).astype(np.int32)
  return images, labels


def load_arrays(
    spec: DatasetSpec,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    fashion_mnist_dir: str | os.PathLike | None = "/usr/share/datasets/fashion-mnist",
    tiny_imagenet_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole split of an in-memory dataset: (images_NxHxWxC uint8, labels_N int32).

  Every host loads the full split; the trainer places only its addressable shard on its devices.
  Fashion-MNIST comes from the IDX files in `fashion_mnist_dir` (TFDS in `data_dir` if it is None),
  Tiny ImageNet from the folder layout in `tiny_imagenet_dir`, the rest from TFDS in `data_dir`.
  """
  if not isinstance(spec, DatasetSpec):
    raise TypeError(f"spec={spec!r}: expected a DatasetSpec (see snapjax.data.get_spec)")
  if not spec.in_memory:
    raise ConfigError(f"dataset {spec.name} is streamed, not loaded into memory: use make_stream")
  if spec.name == "fashion_mnist" and fashion_mnist_dir is not None:
    name, part = slice_split(split, {"train": 60_000, "test": 10_000})
    images, labels = load_fashion_mnist(fashion_mnist_dir, name)
    images, labels = images[part], labels[part]
    where = os.fspath(fashion_mnist_dir)
  elif spec.name == "tiny_imagenet":
    images, labels = load_tiny_imagenet(tiny_imagenet_dir, split)
    where = os.fspath(tiny_imagenet_dir)
  else:
    images, labels = _load_tfds_arrays(spec, split, data_dir)
    where = f"TFDS data_dir={data_dir}"
  if images.dtype != np.uint8 or images.shape[1:] != spec.image_shape:
    raise DataError(
        f"{spec.name} split {split!r} from {where}: expected uint8 images of shape "
        f"{spec.image_shape}, found {images.dtype} {images.shape[1:]}")
  if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
    raise DataError(
        f"{spec.name} split {split!r} from {where}: labels span [{labels.min()}, {labels.max()}], "
        f"expected [0, {spec.num_classes - 1}]")
  return np.ascontiguousarray(images), labels


# ----------------------------------------------------------------------------- augmentation

def normalize(images: jax.Array | np.ndarray, spec: DatasetSpec) -> jax.Array:
  """Returns float32 (images - mean) / std with the spec's per-channel statistics."""
  x = jnp.asarray(images).astype(jnp.float32)
  channels = len(spec.mean)
  if x.ndim < 1 or x.shape[-1] != channels:
    raise ValueError(f"images shape {x.shape}: expected the last axis to have {channels} channels")
  bshape = (1,) * (x.ndim - 1) + (channels,)
  mean = jnp.asarray(spec.mean, jnp.float32).reshape(bshape)
  std = jnp.asarray(spec.std, jnp.float32).reshape(bshape)
  return (x - mean) / std


def sample_crop_flip(rng: jax.Array, batch: int, pad: int) -> tuple[jax.Array, jax.Array]:
  """Samples per-example crop offsets_Bx2 (row, col) uniform in [0, 2*pad] and flips_B (bool)."""
  if batch < 1 or pad < 0:
    raise ValueError(f"batch={batch}, pad={pad}: expected batch >= 1 and pad >= 0")
  offset_rng, flip_rng = jax.random.split(rng)
  offsets_Bx2 = jax.random.randint(offset_rng, (batch, 2), 0, 2 * pad + 1, dtype=jnp.int32)
  flips_B = jax.random.bernoulli(flip_rng, 0.5, (batch,))
  return offsets_Bx2, flips_B


def crop_flip(images_BxHxWxC: jax.Array, offsets_Bx2: jax.Array, flips_B: jax.Array, pad: int) -> jax.Array:
  """Zero-pads by `pad`, crops HxW at the given offsets and mirrors where flips_B is True."""
  _, h, w, c = images_BxHxWxC.shape
  padded = jnp.pad(images_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(image, offset, flip):
    crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, offsets_Bx2, flips_B)


def augment_batch(rng: jax.Array, images: jax.Array, spec: DatasetSpec, *, train: bool) -> jax.Array:
  """Normalises a batch and, for training with "crop_flip", random-crops and flips each example.

  As in the Torch code the paper used, images are normalised first and then zero-padded, so the
  padding is the mean colour. For "imagenet", `make_stream` already did the crops: floating inputs
  are returned as float32 unchanged (already normalised), uint8 inputs are normalised.
  """
  if images.ndim != 4:
    raise ValueError(f"images shape {images.shape}: expected B x H x W x C")
  if spec.augment == "imagenet" and jnp.issubdtype(images.dtype, jnp.floating):
    return images.astype(jnp.float32)
  x = normalize(images, spec)
  if train and spec.augment == "crop_flip":
    offsets_Bx2, flips_B = sample_crop_flip(rng, images.shape[0], spec.crop_pad)
    x = crop_flip(x, offsets_Bx2, flips_B, spec.crop_pad)
  return x


# ----------------------------------------------------------------------------- evaluation

def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields (x_BxHxWxC, y_B, mask_B) covering every example once; the last batch is zero-padded, mask 0."""
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
  if len(images) != len(labels):
    raise ValueError(f"images has {len(images)} examples but labels has {len(labels)}")
  n = len(images)
  for start in range(0, n, batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    real = len(x)
    mask = np.zeros((batch_size,), np.float32)
    mask[:real] = 1.0
    if real < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - real, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros((batch_size - real,), y.dtype)])
    yield x, y, mask


# ----------------------------------------------------------------------------- streaming

def derive_seed(*parts: int) -> int:
  """A 63-bit seed mixed from non-negative ints (NumPy's SeedSequence hash).

  Distinct tuples give unrelated seeds, unlike sums such as seed + step, where seed 0 resumed at step 1
  would read the stream of seed 1.
  """
  hi, lo = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
  return (int(hi) << 31) ^ int(lo)


def _host_split_sizes(builder: Any, split: str, count: int) -> list[int] | None:
  """Examples per host of `split`, or None when TFDS does not know them (e.g. under mock_data)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return [builder.info.splits[s].num_examples for s in tfds.even_splits(split, n=count)]
  except (KeyError, ValueError):
    return None


def eval_num_batches(host_sizes: list[int], batch_size: int) -> int:
  """Batches every host runs so the largest host shard is covered (hosts must run the same count)."""
  return max(1, max(-(-n // batch_size) for n in host_sizes))


def make_stream(
    spec: DatasetSpec,
    split: str,
    *,
    batch_size_per_host: int,
    data_dir: str | os.PathLike | None,
    train: bool,
    seed: int,
    image_size: int = 224,
    shuffle_buffer: int = 10_000,
) -> Iterator[dict[str, np.ndarray]]:
  """Streams this host's shard of a TFDS split as {"image" f32 normalised NHWC, "label" i32, "mask" f32}.

  Train: shuffled, repeated, random-resized crop (area 8-100%, aspect 3/4-4/3) + flip, full batches.
  Eval: resize the short side to image_size*256/224, centre crop, one pass, last batch padded with
  mask 0; every host yields the same number of batches when the split sizes are known.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if spec.augment != "imagenet":
    raise ConfigError(f"make_stream supports augment='imagenet' datasets, got {spec.name} ({spec.augment})")
  for arg, value in (("batch_size_per_host", batch_size_per_host), ("image_size", image_size),
                     ("shuffle_buffer", shuffle_buffer)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{arg}={value!r}: expected a positive int")
  index, count = jax.process_index(), jax.process_count()
  builder = _tfds_builder(spec, data_dir)
  host_split = tfds.split_for_jax_process(split, process_index=index, process_count=count)
  ds = _tfds_split(
      builder, host_split, shuffle_files=train,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=seed, skip_prefetch=True))
  mean = tf.constant(spec.mean, tf.float32)
  std = tf.constant(spec.std, tf.float32)
  size = [image_size, image_size]

  def finish(image, label, mask):
    image = (tf.cast(image, tf.float32) - mean) / std
    image = tf.ensure_shape(image, [image_size, image_size, 3])
    return {"image": image, "label": tf.cast(label, tf.int32), "mask": tf.cast(mask, tf.float32)}

  def train_example(i, ex):
    key = tf.constant(derive_seed(seed, index, 0), tf.int64)
    shape = tf.image.extract_jpeg_shape(ex["image"])
    begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=tf.stack([key, 2 * i]),
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], box_size[0], box_size[1]])
    image = tf.io.decode_and_crop_jpeg(ex["image"], window, channels=3)
    image = tf.image.resize(image, size, method="bilinear", antialias=True)
    image = tf.image.stateless_random_flip_left_right(image, seed=tf.stack([key, 2 * i + 1]))
    return finish(image, ex["label"], 1.0)

  def eval_example(ex):
    image = tf.io.decode_jpeg(ex["image"], channels=3)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    short = float(round(image_size * 256 / 224))
    new_hw = tf.cast(tf.math.ceil(hw * short / tf.reduce_min(hw)), tf.int32)
    image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
    top, left = (new_hw[0] - image_size) // 2, (new_hw[1] - image_size) // 2
    image = image[top:top + image_size, left:left + image_size]
    return finish(image, ex["label"], 1.0)

  if train:
    ds = ds.shuffle(shuffle_buffer, seed=derive_seed(seed, index, 1), reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate().map(train_example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size_per_host, drop_remainder=True)
  else:
    ds = ds.map(eval_example, num_parallel_calls=tf.data.AUTOTUNE)
    padding = tf.data.Dataset.from_tensors({
        "image": tf.zeros([image_size, image_size, 3], tf.float32),
        "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0, tf.float32)})
    sizes = _host_split_sizes(builder, split, count)
    if sizes is not None:
      num_batches = eval_num_batches(sizes, batch_size_per_host)
      ds = ds.concatenate(padding.repeat()).take(num_batches * batch_size_per_host)
    elif count == 1:  # Split size unknown (mock data): pad the last batch only.
      ds = ds.concatenate(padding.repeat(batch_size_per_host - 1))
    else:
      raise DataError(
          f"split sizes of {builder.name} {split!r} are unknown in {os.fspath(builder.data_dir_root)}; "
          "multi-host evaluation needs them to give every host the same number of batches")
    ds = ds.batch(batch_size_per_host, drop_remainder=True)
  return iter(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)))
