"""Paper Table 1: resnet110 on svhn_cropped, B=40 epochs, M=5 cycles, batch 64, alpha0=0.2 (--config.init_lr=0.1 for the other column)."""
from snapjax import config as base


def get_config():
  c = base.paper_config("resnet110", "svhn_cropped")  # SVHN: 6,000 train images held out for validation, no augmentation (snapjax.data).
  return c
