"""Paper Table 1: densenet40 on cifar100, B=300 epochs, M=6 cycles, batch 64, alpha0=0.2 (--config.init_lr=0.1 for the other column)."""
from snapjax import config as base


def get_config():
  c = base.paper_config("densenet40", "cifar100")
  return c
