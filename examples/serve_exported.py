"""Serve an exported ensemble with jax and numpy only: score it on Fashion-MNIST's raw IDX test files.

  python eval.py --workdir runs/quickstart --export runs/quickstart/ensemble.jax
  python examples/serve_exported.py runs/quickstart/ensemble.jax [--idx_dir /usr/share/datasets/fashion-mnist]

Imports neither snapjax nor Flax (it checks): the file is all a server needs.
"""
import argparse
import gzip
import os
import sys

import jax
import numpy as np


def read_idx(path: str) -> np.ndarray:
  """A (gzipped) IDX file of unsigned bytes: magic (0, 0, 0x08, ndim), big-endian dims, data."""
  with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
    raw = f.read()
  ndim = raw[3]
  dims = np.frombuffer(raw[4:4 + 4 * ndim], ">u4")
  return np.frombuffer(raw[4 + 4 * ndim:], np.uint8).reshape(dims)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("file", help="the file eval.py --export wrote")
  parser.add_argument("--idx_dir", default="/usr/share/datasets/fashion-mnist")
  parser.add_argument("--batch", type=int, default=1000)
  args = parser.parse_args()
  images = read_idx(os.path.join(args.idx_dir, "t10k-images-idx3-ubyte.gz"))[..., None]  # (N, 28, 28, 1) uint8.
  labels = read_idx(os.path.join(args.idx_dir, "t10k-labels-idx1-ubyte.gz"))
  with open(args.file, "rb") as f:
    served = jax.export.deserialize(f.read())
  probs = np.concatenate([np.asarray(served.call(images[i:i + args.batch]))
                          for i in range(0, len(images), args.batch)])
  error = np.mean(probs.argmax(-1) != labels)
  nll = -np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12)))
  loaded = sorted(m for m in ("snapjax", "flax") if m in sys.modules)
  print(f"test error {100 * error:.2f}% NLL {nll:.4f} on {len(labels)} examples; snapjax/flax loaded: "
        f"{', '.join(loaded) or 'none'}")


if __name__ == "__main__":
  main()
