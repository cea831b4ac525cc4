"""Paper Table 1: densenet100 on cifar100, B=300 epochs, M=6 cycles, batch 64, alpha0=0.2 (--config.init_lr=0.1 for the other column)."""
from snapjax import config as base


def get_config():
  c = base.paper_config("densenet100", "cifar100")
  return c
