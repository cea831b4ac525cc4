"""Shared test data and configs: a tiny generated Fashion-MNIST in raw IDX files, and a tiny run config."""
import gzip
import os
import struct

import numpy as np

from snapjax import config as config_lib

NUM_TRAIN, NUM_TEST = 512, 203  # 203: the last evaluation batch is partial and padded.
MEAN, STD = 72.94, 90.02  # Fashion-MNIST statistics, restated here as the reference normalisation.


def _write_idx(path, array):
  """Independent IDX writer: magic (0, 0, type 0x08, ndim), big-endian dims, raw bytes, gzipped."""
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_tiny_fashion_mnist(directory, seed=0):
  """Learnable 10-class 28x28 data, invariant to crops and flips: class k has brightness 20k plus noise."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for prefix, n in (("train", NUM_TRAIN), ("t10k", NUM_TEST)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = (rng.integers(0, 50, (n, 28, 28)) + 20 * labels[:, None, None]).astype(np.uint8)
    _write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images)
    _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels)
  return directory


def tiny_config(data_dir, **overrides):
  """resnet8 on the tiny data: 16 steps/epoch at batch 32, 4 epochs, 2 cycles (snapshots at 32 and 64)."""
  c = config_lib.base_config()
  c.model = "resnet8"
  c.dataset = "fashion_mnist"
  c.fashion_mnist_dir = str(data_dir)
  c.num_epochs = 4.0
  c.num_cycles = 2
  c.init_lr = 0.1
  c.batch_size = 32
  c.eval_batch_size = 64
  c.log_every_steps = 8
  c.checkpoint_every_steps = 10
  for k, v in overrides.items():
    c[k] = v
  return c
