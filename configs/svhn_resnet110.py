"""Paper Table 1: resnet110 on svhn_cropped, B=40 epochs, M=5 cycles, batch 64, alpha0=0.2.

`--config configs/svhn_resnet110.py:METHOD` trains another Table 1 column on the same budget, METHOD one of
snapshot (default), snapshot_lr0.1, single, nocycle, single_cycle (snapjax.config.apply_method).
"""
from snapjax import config as base


def get_config(method=None):
  c = base.paper_config("resnet110", "svhn_cropped")  # 6,000 train images held out, no augmentation (snapjax.data).
  return base.apply_method(c, method)
