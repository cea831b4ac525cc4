"""Paper Table 1: densenet100 on cifar10, B=300 epochs, M=6 cycles, batch 64, alpha0=0.2.

`--config configs/cifar10_densenet100.py:METHOD` trains another Table 1 column on the same budget, METHOD one of
snapshot (default), snapshot_lr0.1, single, nocycle, single_cycle, dropout (snapjax.config.apply_method).
"""
from snapjax import config as base


def get_config(method=None):
  c = base.paper_config("densenet100", "cifar10")
  return base.apply_method(c, method)
