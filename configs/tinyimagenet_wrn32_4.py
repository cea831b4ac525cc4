"""Paper Table 1: wrn32_4 on tiny_imagenet, B=150 epochs, M=6 cycles, batch 128, alpha0=0.2.

`--config configs/tinyimagenet_wrn32_4.py:METHOD` trains another Table 1 column on the same budget, METHOD one of
snapshot (default), snapshot_lr0.1, single, nocycle, single_cycle, dropout, or fge, swa, ema, swag, distill (snapjax.methods.apply_method; distill needs --config.teacher_workdirs).
"""
from snapjax import methods


def get_config(method=None):
  c = methods.paper_config("wrn32_4", "tiny_imagenet")
  c.tiny_imagenet_dir = "/data/tiny-imagenet-200"  # Extracted tiny-imagenet-200/ folder: set yours.
  return methods.apply_method(c, method)
