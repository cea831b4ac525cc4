"""Paper Table 1: resnet110 on cifar10, B=200 epochs, M=5 cycles, batch 64, alpha0=0.2.

`--config configs/cifar10_resnet110.py:METHOD` trains another Table 1 column on the same budget, METHOD one of
snapshot (default), snapshot_lr0.1, single, nocycle, single_cycle, or fge, swa, ema, swag, distill (snapjax.methods.apply_method; distill needs --config.teacher_workdirs).
"""
from snapjax import methods


def get_config(method=None):
  c = methods.paper_config("resnet110", "cifar10")
  return methods.apply_method(c, method)
