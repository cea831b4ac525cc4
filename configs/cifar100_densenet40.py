"""Paper Table 1: densenet40 on cifar100, B=300 epochs, M=6 cycles, batch 64, alpha0=0.2.

`--config configs/cifar100_densenet40.py:METHOD` trains another Table 1 column on the same budget, METHOD one of
snapshot (default), snapshot_lr0.1, single, nocycle, single_cycle, dropout (snapjax.config.apply_method).
"""
from snapjax import config as base


def get_config(method=None):
  c = base.paper_config("densenet40", "cifar100")
  return base.apply_method(c, method)
