"""Paper Table 1: resnet110 on cifar100, B=200 epochs, M=5 cycles, batch 64, alpha0=0.2 (--config.init_lr=0.1 for the other column)."""
from snapjax import config as base


def get_config():
  c = base.paper_config("resnet110", "cifar100")
  return c
