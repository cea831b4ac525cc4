"""Tests for snapjax.data against independent references (struct-written IDX, NumPy crops, naive loops)."""
import gzip
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from snapjax import data
from snapjax.errors import ConfigError, DataError

REAL_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_IDX_FORMATS = {np.uint8: (0x08, "B"), np.int8: (0x09, "b"), np.int16: (0x0B, "h"),
                np.int32: (0x0C, "i"), np.float32: (0x0D, "f"), np.float64: (0x0E, "d")}


def write_idx(path, array, compress=False, code=None):
  """Writes `array` as an IDX file element by element with struct (independent of read_idx)."""
  array = np.asarray(array)
  default_code, fmt = _IDX_FORMATS[array.dtype.type]
  raw = struct.pack(">HBB", 0, default_code if code is None else code, array.ndim)
  raw += struct.pack(f">{array.ndim}I", *array.shape)
  raw += struct.pack(f">{array.size}{fmt}", *array.ravel().tolist())
  with open(path, "wb") as f:
    f.write(gzip.compress(raw) if compress else raw)
  return path


def write_fashion_dir(directory, n_train=5, n_test=3, compress=True, seed=0):
  """Writes tiny Fashion-MNIST IDX files; returns {split: (images NxHxW, labels N)}."""
  rng = np.random.default_rng(seed)
  out = {}
  for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"), images, compress)
    write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"), labels, compress)
    out[split] = (images, labels)
  return out


# ----------------------------------------------------------------------------- registry

def test_get_spec_returns_registered_specs():
  assert set(data.DATASETS) == {
      "cifar10", "cifar100", "svhn_cropped", "imagenet2012", "fashion_mnist", "tiny_imagenet"}
  for name, spec in data.DATASETS.items():
    assert data.get_spec(name) is spec and spec.name == name


def test_get_spec_unknown_name_lists_known_names():
  with pytest.raises(ConfigError) as err:
    data.get_spec("mnist")
  message = str(err.value)
  assert "\n" not in message and "'mnist'" in message
  assert all(name in message for name in data.DATASETS)


def test_registry_matches_paper_facts():
  # Paper: CIFAR 50k/10k with pad-4 crop + flip; SVHN 73,257 train with 6,000 held out, no
  # augmentation, 26,032 test; Tiny ImageNet 200 classes of 64x64.
  for name in ("cifar10", "cifar100"):
    spec = data.get_spec(name)
    assert (spec.num_train, spec.num_eval, spec.augment, spec.crop_pad) == (50_000, 10_000, "crop_flip", 4)
  svhn = data.get_spec("svhn_cropped")
  assert svhn.augment == "none" and svhn.num_eval == 26_032 and svhn.eval_split == "test"
  _, train = data.slice_split(svhn.train_split, {"train": 73_257})
  _, val = data.slice_split(svhn.val_split, {"train": 73_257})
  index = np.arange(73_257)
  assert len(index[train]) == svhn.num_train == 67_257 and len(index[val]) == 6_000
  assert not set(index[train]) & set(index[val])
  tiny = data.get_spec("tiny_imagenet")
  assert tiny.num_classes == 200 and tiny.image_shape == (64, 64, 3)
  assert not data.get_spec("imagenet2012").in_memory


def test_spec_rejects_inconsistent_fields():
  good = data.get_spec("cifar10")
  with pytest.raises(ConfigError, match="augment"):
    data.DatasetSpec(**{**good.__dict__, "augment": "autoaugment"})
  with pytest.raises(ConfigError, match="mean"):
    data.DatasetSpec(**{**good.__dict__, "mean": (1.0,)})


def test_slice_split_matches_python_slicing():
  sizes = {"train": 10, "test": 4}
  index = np.arange(10)
  cases = {"train": index, "train[:3]": index[:3], "train[-4:]": index[-4:],
           "train[2:-2]": index[2:-2], "train[:50%]": index[:5], "train[-30%:]": index[7:]}
  for split, expected in cases.items():
    name, part = data.slice_split(split, sizes)
    assert name == "train"
    np.testing.assert_array_equal(index[part], expected, err_msg=split)
  for bad in ("validation", "train[1:2:3]", "train+test", "train[a:]"):
    with pytest.raises(ConfigError, match="split"):
      data.slice_split(bad, sizes)


# ----------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trips_struct_written_files(tmp_path, dtype, compress):
  rng = np.random.default_rng(1)
  expected = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
  path = write_idx(tmp_path / "x.idx", expected, compress)
  got = data.read_idx(path)
  assert got.dtype == np.dtype(dtype) and got.dtype.isnative
  np.testing.assert_array_equal(got, expected)


def test_read_idx_one_dimensional(tmp_path):
  labels = np.array([3, 1, 4, 1, 5], np.uint8)
  np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "l", labels)), labels)


def test_read_idx_truncated_file_names_path_and_sizes(tmp_path):
  path = write_idx(tmp_path / "images.idx", np.zeros((2, 3, 4), np.uint8))
  raw = open(path, "rb").read()
  open(path, "wb").write(raw[:-5])
  expected_bytes = 4 + 3 * 4 + 24
  with pytest.raises(DataError) as err:
    data.read_idx(path)
  message = str(err.value)
  assert str(path) in message and "truncated" in message
  assert f"expected {expected_bytes} bytes" in message and f"found {expected_bytes - 5}" in message
  open(path, "wb").write(raw + b"\0")
  with pytest.raises(DataError, match=f"oversized.*found {expected_bytes + 1}"):
    data.read_idx(path)


def test_read_idx_truncated_gzip_and_bad_header(tmp_path):
  path = write_idx(tmp_path / "images.gz", np.arange(600, dtype=np.int32), compress=True)
  raw = open(path, "rb").read()
  open(path, "wb").write(raw[: len(raw) // 2])
  with pytest.raises(DataError, match=f"gzip.*{path}"):
    data.read_idx(path)
  bad_code = write_idx(tmp_path / "code.idx", np.zeros(3, np.uint8), code=0x07)
  with pytest.raises(DataError, match=f"not an IDX file: {bad_code}"):
    data.read_idx(bad_code)
  text = tmp_path / "text.idx"
  text.write_text("hello world")
  with pytest.raises(DataError, match="not an IDX file"):
    data.read_idx(text)
  short = tmp_path / "short.idx"
  short.write_bytes(b"\0\0")
  with pytest.raises(DataError, match="truncated"):
    data.read_idx(short)


def test_read_idx_missing_file_names_path(tmp_path):
  with pytest.raises(DataError, match=str(tmp_path / "nope.idx")):
    data.read_idx(tmp_path / "nope.idx")


# ----------------------------------------------------------------------------- Fashion-MNIST

@pytest.mark.parametrize("compress", [True, False])
def test_load_fashion_mnist_tiny_files(tmp_path, compress):
  written = write_fashion_dir(tmp_path, compress=compress)
  for split, (images, labels) in written.items():
    got_images, got_labels = data.load_fashion_mnist(tmp_path, split)
    assert got_images.shape == (len(images), 28, 28, 1) and got_images.dtype == np.uint8
    assert got_labels.dtype == np.int32
    np.testing.assert_array_equal(got_images[..., 0], images)
    np.testing.assert_array_equal(got_labels, labels)


def test_load_fashion_mnist_missing_directory_says_where_and_how(tmp_path):
  missing = tmp_path / "absent"
  with pytest.raises(DataError) as err:
    data.load_fashion_mnist(missing, "train")
  message = str(err.value)
  assert "\n" not in message
  assert str(missing / "train-images-idx3-ubyte.gz") in message
  assert "apt-get install dataset-fashion-mnist" in message and "--config.fashion_mnist_dir" in message


def test_load_fashion_mnist_missing_file_lists_paths_tried(tmp_path):
  write_fashion_dir(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(DataError) as err:
    data.load_fashion_mnist(tmp_path, "test")
  message = str(err.value)
  assert "\n" not in message and "apt-get install dataset-fashion-mnist" in message
  assert f"tried {tmp_path / 't10k-labels-idx1-ubyte.gz'}, {tmp_path / 't10k-labels-idx1-ubyte'})" in message


def test_load_fashion_mnist_label_count_mismatch(tmp_path):
  write_fashion_dir(tmp_path)
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8), compress=True)
  with pytest.raises(DataError, match="expected 5 labels"):
    data.load_fashion_mnist(tmp_path, "train")


def test_load_arrays_fashion_mnist_slices_idx_split(tmp_path):
  images, labels = write_fashion_dir(tmp_path, n_train=6)["train"]
  spec = data.get_spec("fashion_mnist")
  x, y = data.load_arrays(spec, "train[-2:]", fashion_mnist_dir=tmp_path)
  np.testing.assert_array_equal(x[..., 0], images[-2:])
  np.testing.assert_array_equal(y, labels[-2:])


@pytest.mark.skipif(not os.path.isdir(REAL_FASHION_MNIST), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_files():
  spec = data.get_spec("fashion_mnist")
  train_x, train_y = data.load_arrays(spec, "train")
  test_x, test_y = data.load_arrays(spec, "test")
  assert train_x.shape == (60_000, 28, 28, 1) and test_x.shape == (10_000, 28, 28, 1)
  # Published: 10 balanced classes, 6,000 train and 1,000 test images each.
  np.testing.assert_array_equal(np.bincount(train_y, minlength=10), [6_000] * 10)
  np.testing.assert_array_equal(np.bincount(test_y, minlength=10), [1_000] * 10)
  assert train_y.min() == 0 and train_y.max() == 9
  # The registry's statistics are those of the training images.
  pixels = train_x.astype(np.float64)
  assert abs(pixels.mean() - spec.mean[0]) < 0.01 and abs(pixels.std() - spec.std[0]) < 0.01


# ----------------------------------------------------------------------------- Tiny ImageNet

def _write_tiny_imagenet(root):
  """A 2-class Tiny ImageNet layout with constant-colour images; returns expected (colours, labels)."""
  wnids = ["n02", "n01"]  # Unsorted on purpose: labels follow sorted order (n01 -> 0, n02 -> 1).
  os.makedirs(root / "val" / "images")
  (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
  colours = {}
  for wnid, base in (("n01", 10), ("n02", 200)):
    folder = root / "train" / wnid / "images"
    os.makedirs(folder)
    for i in range(2):
      colour = (base + 20 * i, 40, 90)
      Image.new("RGB", (64, 64), colour).save(folder / f"{wnid}_{i}.JPEG", quality=100)
      colours[("train", wnid, i)] = colour
  Image.new("L", (64, 64), 128).save(root / "val" / "images" / "val_0.JPEG", quality=100)
  Image.new("RGB", (64, 64), (5, 250, 5)).save(root / "val" / "images" / "val_1.JPEG", quality=100)
  (root / "val" / "val_annotations.txt").write_text(
      "val_1.JPEG\tn01\t0\t0\t63\t63\nval_0.JPEG\tn02\t1\t2\t60\t60\n")
  train = ([colours[("train", "n01", i)] for i in range(2)] + [colours[("train", "n02", i)] for i in range(2)],
           [0, 0, 1, 1])
  val = ([(128, 128, 128), (5, 250, 5)], [1, 0])  # Sorted by file name: val_0, val_1.
  return {"train": train, "val": val}


def test_load_arrays_tiny_imagenet_layout(tmp_path):
  expected = _write_tiny_imagenet(tmp_path / "tiny-imagenet-200")
  spec = data.get_spec("tiny_imagenet")
  for split, (colours, labels) in expected.items():
    for directory in (tmp_path, tmp_path / "tiny-imagenet-200"):
      x, y = data.load_arrays(spec, split, tiny_imagenet_dir=directory)
      assert x.shape == (len(labels), 64, 64, 3) and x.dtype == np.uint8 and y.dtype == np.int32
      np.testing.assert_array_equal(y, labels)
      reference = np.broadcast_to(np.array(colours, np.float64)[:, None, None, :], x.shape)
      assert np.abs(x - reference).max() <= 2, split
  x, y = data.load_arrays(spec, "train[1:3]", tiny_imagenet_dir=tmp_path)
  np.testing.assert_array_equal(y, [0, 1])


def test_tiny_imagenet_errors_say_where_and_how(tmp_path):
  spec = data.get_spec("tiny_imagenet")
  with pytest.raises(DataError, match="tiny_imagenet_dir is not set"):
    data.load_arrays(spec, "train")
  with pytest.raises(DataError, match=str(tmp_path / "wnids.txt")):
    data.load_arrays(spec, "train", tiny_imagenet_dir=tmp_path)
  root = tmp_path / "tiny-imagenet-200"
  _write_tiny_imagenet(root)
  Image.new("RGB", (32, 32)).save(root / "train" / "n01" / "images" / "n01_9.JPEG")
  with pytest.raises(DataError, match="n01_9.JPEG has shape"):
    data.load_arrays(spec, "train", tiny_imagenet_dir=root)


# ----------------------------------------------------------------------------- TFDS

def test_load_arrays_cifar10_mock_data():
  import tensorflow_datasets as tfds
  spec = data.get_spec("cifar10")
  with tfds.testing.mock_data(num_examples=7):
    x, y = data.load_arrays(spec, "train", data_dir="/nonexistent")
    reference = [ex for ex in tfds.as_numpy(tfds.builder("cifar10").as_dataset(split="train"))]
  assert x.shape == (7, 32, 32, 3) and x.dtype == np.uint8
  assert y.shape == (7,) and y.dtype == np.int32 and y.min() >= 0 and y.max() < 10
  np.testing.assert_array_equal(x, np.stack([ex["image"] for ex in reference]))
  np.testing.assert_array_equal(y, [ex["label"] for ex in reference])


def test_load_arrays_fashion_mnist_falls_back_to_tfds():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=3):
    x, y = data.load_arrays(data.get_spec("fashion_mnist"), "test", fashion_mnist_dir=None)
  assert x.shape == (3, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32


@pytest.mark.timeout(60)
def test_unprepared_tfds_dataset_raises_without_network(tmp_path):
  with pytest.raises(DataError) as err:
    data.load_arrays(data.get_spec("cifar10"), "train", data_dir=tmp_path)
  message = str(err.value)
  assert "\n" not in message and str(tmp_path) in message and "tfds build cifar10" in message
  assert "downloads" not in os.listdir(tmp_path)  # Nothing was fetched.


@pytest.mark.timeout(60)
def test_incomplete_tfds_dataset_raises(tmp_path):
  import tensorflow_datasets as tfds
  os.makedirs(tfds.builder("svhn_cropped", data_dir=tmp_path).data_path)
  with pytest.raises(DataError, match="incomplete"):
    data.load_arrays(data.get_spec("svhn_cropped"), "test", data_dir=tmp_path)


def test_load_arrays_rejects_streamed_dataset():
  with pytest.raises(ConfigError, match="make_stream"):
    data.load_arrays(data.get_spec("imagenet2012"), "train")


# ----------------------------------------------------------------------------- augmentation

def _numpy_normalize(images, spec):
  return (images.astype(np.float32) - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)


def test_normalize_matches_numpy():
  rng = np.random.default_rng(2)
  for name in ("cifar10", "fashion_mnist"):
    spec = data.get_spec(name)
    images = rng.integers(0, 256, (3, *spec.image_shape), dtype=np.uint8)
    got = data.normalize(images, spec)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _numpy_normalize(images, spec), rtol=1e-6, atol=1e-6)


def _numpy_crop_flip(normalized, offsets, flips, pad):
  """Reference: zero-pad the normalised batch, slice each crop with NumPy, mirror when flipped."""
  _, h, w, _ = normalized.shape
  padded = np.pad(normalized, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.empty_like(normalized)
  for b in range(len(normalized)):
    crop = padded[b, offsets[b, 0]:offsets[b, 0] + h, offsets[b, 1]:offsets[b, 1] + w]
    out[b] = crop[:, ::-1] if flips[b] else crop
  return out


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
def test_augment_batch_matches_numpy_reference(name):
  spec = data.get_spec(name)
  images = np.random.default_rng(3).integers(0, 256, (16, *spec.image_shape), dtype=np.uint8)
  rng = jax.random.PRNGKey(7)
  augment = jax.jit(data.augment_batch, static_argnames=("spec", "train"))
  got = augment(rng, images, spec=spec, train=True)
  assert got.dtype == jnp.float32 and got.shape == images.shape
  offsets, flips = map(np.asarray, data.sample_crop_flip(rng, 16, spec.crop_pad))
  expected = _numpy_crop_flip(_numpy_normalize(images, spec), offsets, flips, spec.crop_pad)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  assert flips.any() and not flips.all() and (offsets != spec.crop_pad).any()


def test_augment_batch_outputs_come_from_padded_input_and_cover_all_offsets():
  spec = data.get_spec("cifar10")
  pad, batch = spec.crop_pad, 300
  images = np.random.default_rng(4).integers(0, 256, (batch, 6, 6, 3), dtype=np.uint8)
  got = np.asarray(data.augment_batch(jax.random.PRNGKey(11), images, spec, train=True))
  padded = np.pad(_numpy_normalize(images, spec), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  found = []
  for b in range(batch):  # Brute force over every crop window and flip of the padded input.
    matches = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (0, 1)
               if np.allclose(got[b], padded[b, dy:dy + 6, dx:dx + 6][:, ::-1 if f else 1], atol=1e-5)]
    assert matches, f"example {b} is not a crop of its padded input"
    found.append(matches[0])
  found = np.array(found)
  assert set(found[:, 0]) == set(found[:, 1]) == set(range(2 * pad + 1))
  assert 0.3 < found[:, 2].mean() < 0.7


def test_sample_crop_flip_is_uniform():
  offsets, flips = map(np.asarray, data.sample_crop_flip(jax.random.PRNGKey(0), 9_000, 4))
  assert offsets.dtype == np.int32 and offsets.shape == (9_000, 2)
  for axis in range(2):
    counts = np.bincount(offsets[:, axis], minlength=9)
    assert len(counts) == 9 and counts.min() > 850 and counts.max() < 1150  # 1000 +- 5 sigma
  assert 0.47 < flips.mean() < 0.53
  with pytest.raises(ValueError, match="pad=-1"):
    data.sample_crop_flip(jax.random.PRNGKey(0), 4, -1)


def test_augment_batch_without_crops_only_normalizes():
  rng = jax.random.PRNGKey(0)
  for name, train in (("cifar10", False), ("svhn_cropped", True), ("imagenet2012", False)):
    spec = data.get_spec(name)
    images = np.random.default_rng(5).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    got = data.augment_batch(rng, images, spec, train=train)
    np.testing.assert_allclose(got, _numpy_normalize(images, spec), rtol=1e-6, atol=1e-6)
  streamed = np.random.default_rng(6).standard_normal((2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_array_equal(
      data.augment_batch(rng, streamed, data.get_spec("imagenet2012"), train=True), streamed)


# ----------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("batch_size", [1, 4, 5, 11, 16])
def test_eval_batches_count_every_example_once(batch_size):
  n = 11
  images = np.arange(n * 2 * 2 * 1, dtype=np.uint8).reshape(n, 2, 2, 1) + 1
  labels = np.arange(n, dtype=np.int32) + 1
  batches = list(data.eval_batches(images, labels, batch_size))
  assert len(batches) == -(-n // batch_size)
  for x, y, mask in batches:
    assert x.shape == (batch_size, 2, 2, 1) and y.shape == mask.shape == (batch_size,)
    assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    assert (x[mask == 0] == 0).all() and (y[mask == 0] == 0).all()
  masks = np.concatenate([m for _, _, m in batches])
  assert masks.sum() == n
  np.testing.assert_array_equal(np.concatenate([x for x, _, _ in batches])[masks == 1], images)
  np.testing.assert_array_equal(np.concatenate([y for _, y, _ in batches])[masks == 1], labels)


def test_eval_batches_rejects_bad_arguments():
  images, labels = np.zeros((3, 2, 2, 1), np.uint8), np.zeros(3, np.int32)
  with pytest.raises(ValueError, match="batch_size=0"):
    list(data.eval_batches(images, labels, 0))
  with pytest.raises(ValueError, match="labels"):
    list(data.eval_batches(images, labels[:2], 2))


def test_eval_num_batches_matches_naive_count():
  for sizes in ([4, 4, 3], [5], [0, 1], [8, 8]):
    for batch in (1, 2, 3, 8):
      naive = max(1, max(len(range(0, n, batch)) for n in sizes))
      assert data.eval_num_batches(sizes, batch) == naive


# ----------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("n", [6, 7])
def test_make_stream_eval_visits_each_example_once(n):
  import tensorflow_datasets as tfds
  spec = data.get_spec("imagenet2012")
  batch, size = 3, 32
  with tfds.testing.mock_data(num_examples=n):
    stream = data.make_stream(spec, "validation", batch_size_per_host=batch, data_dir=None,
                              train=False, seed=0, image_size=size)
    batches = list(stream)
    reference = list(tfds.as_numpy(tfds.builder("imagenet2012").as_dataset(split="validation")))
  assert len(batches) == -(-n // batch)
  for b in batches:
    assert b["image"].shape == (batch, size, size, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["mask"].dtype == np.float32
  masks = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(masks, [1.0] * n + [0.0] * (len(masks) - n))
  labels = np.concatenate([b["label"] for b in batches])[:n]
  np.testing.assert_array_equal(labels, [ex["label"] for ex in reference])
  # Undo the normalisation: a centre crop of a resized 0..255 image stays in 0..255 and is close to
  # a PIL resize + centre crop of the source (mock images are noise, JPEG-coded for the stream, so
  # only loosely: about 28 per pixel for the centre crop against about 50 for a corner crop).
  for i, ex in enumerate(reference):
    pixels = batches[i // batch]["image"][i % batch] * np.array(spec.std) + np.array(spec.mean)
    assert pixels.min() > -0.5 and pixels.max() < 255.5
    source = Image.fromarray(ex["image"])
    short = round(size * 256 / 224)
    scale = short / min(source.size)
    w, h = int(np.ceil(source.size[0] * scale)), int(np.ceil(source.size[1] * scale))
    resized = np.asarray(source.resize((w, h), Image.BILINEAR), np.float64)
    top, left = (h - size) // 2, (w - size) // 2
    central = resized[top:top + size, left:left + size]
    np.testing.assert_allclose(pixels.mean(axis=(0, 1)), central.mean(axis=(0, 1)), atol=8)
    assert np.abs(pixels - central).mean() < 38


def test_make_stream_eval_pads_to_the_largest_host_shard(monkeypatch):
  import tensorflow_datasets as tfds
  n, batch = 4, 3
  # Pretend another host holds 9 examples: this host must run ceil(9 / 3) = 3 batches too.
  monkeypatch.setattr(data, "_host_split_sizes", lambda builder, split, count: [n, 9])
  with tfds.testing.mock_data(num_examples=n):
    batches = list(data.make_stream(data.get_spec("imagenet2012"), "validation",
                                    batch_size_per_host=batch, data_dir=None, train=False, seed=0,
                                    image_size=8))
  masks = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(masks, [1.0] * n + [0.0] * (9 - n))
  assert all(b["image"].shape == (batch, 8, 8, 3) for b in batches)


def test_make_stream_multi_host_eval_needs_split_sizes(monkeypatch):
  import tensorflow_datasets as tfds
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(DataError, match="same number of batches"):
      data.make_stream(data.get_spec("imagenet2012"), "validation", batch_size_per_host=2,
                       data_dir=None, train=False, seed=0, image_size=8)


def test_make_stream_train_repeats_and_is_deterministic():
  import tensorflow_datasets as tfds
  spec = data.get_spec("imagenet2012")

  def take(seed, count):
    stream = data.make_stream(spec, "train", batch_size_per_host=4, data_dir=None, train=True,
                              seed=seed, image_size=16, shuffle_buffer=8)
    return [next(stream) for _ in range(count)]

  with tfds.testing.mock_data(num_examples=5):
    first, again, other = take(0, 4), take(0, 4), take(1, 4)
    labels = {int(ex["label"]) for ex in tfds.as_numpy(tfds.builder("imagenet2012").as_dataset(split="train"))}
  for b in first:  # 16 examples from a 5-example split: the stream repeats.
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    np.testing.assert_array_equal(b["mask"], np.ones(4, np.float32))
    assert set(b["label"].tolist()) <= labels and b["label"].dtype == np.int32
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_make_stream_rejects_bad_arguments(tmp_path):
  with pytest.raises(ConfigError, match="make_stream"):
    data.make_stream(data.get_spec("cifar10"), "train", batch_size_per_host=4, data_dir=None,
                     train=True, seed=0)
  with pytest.raises(ValueError, match="batch_size_per_host=0"):
    data.make_stream(data.get_spec("imagenet2012"), "train", batch_size_per_host=0,
                     data_dir=None, train=True, seed=0)
  with pytest.raises(DataError, match="tfds build imagenet2012"):
    data.make_stream(data.get_spec("imagenet2012"), "validation", batch_size_per_host=4,
                     data_dir=tmp_path, train=False, seed=0)
