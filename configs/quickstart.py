"""Quickstart: a Snapshot Ensemble of a ResNet-8 on Fashion-MNIST (Debian's raw IDX files), minutes on a CPU.

A 10,000-image training subset without augmentation: each 6-epoch cycle converges (and starts to
overfit), which is the regime where the paper's ensemble pays off; on this budget, full-data runs keep
improving from cycle to cycle and their last snapshot beats the ensemble (see README).

`configs/quickstart.py:METHOD` trains another method on this budget (snapjax.methods.apply_method; the same as
`configs/fashion_mnist.py:METHOD`), e.g. `:fge`, `:swa`, `:swag`, `:ema`, or
`:distill --config.teacher_workdirs=runs/quickstart` (a ResNet-8 student of the quickstart's ensemble).
"""
from snapjax import methods


def get_config(method=None):
  # Every field, with its comment, in snapjax/config.py.
  return methods.apply_method(methods.quickstart_config(), method)
