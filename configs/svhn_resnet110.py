"""Paper Table 1: resnet110 on svhn_cropped, B=40 epochs, M=5 cycles, batch 64, alpha0=0.2.

`--config configs/svhn_resnet110.py:METHOD` trains another Table 1 column on the same budget, METHOD one of
snapshot (default), snapshot_lr0.1, single, nocycle, single_cycle, or fge, swa, ema, swag, distill (snapjax.methods.apply_method; distill needs --config.teacher_workdirs).
"""
from snapjax import methods


def get_config(method=None):
  c = methods.paper_config("resnet110", "svhn_cropped")  # 6,000 train images held out, no augmentation (snapjax.data).
  return methods.apply_method(c, method)
