#!/usr/bin/env bash
# Quickstart: install snapjax and Debian's Fashion-MNIST files, train a snapshot ensemble, evaluate it.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-runs/quickstart}
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
python3 -m pip install -q -e .
python3 train.py --config configs/quickstart.py --workdir "$WORKDIR"
python3 eval.py --workdir "$WORKDIR"
