"""Quickstart: a Snapshot Ensemble of a ResNet-8 on Fashion-MNIST (Debian's raw IDX files), minutes on a CPU.

A 10,000-image training subset without augmentation: each 6-epoch cycle converges (and starts to
overfit), which is the regime where the paper's ensemble pays off; on this budget, full-data runs keep
improving from cycle to cycle and their last snapshot beats the ensemble (see README).
"""
from snapjax import methods


def get_config():
  return methods.quickstart_config()  # Every field, with its comment, in snapjax/config.py.
