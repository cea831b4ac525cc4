"""Paper Table 1: resnet110 on tiny_imagenet, B=150 epochs, M=6 cycles, batch 128, alpha0=0.2 (--config.init_lr=0.1 for the other column)."""
from snapjax import config as base


def get_config():
  c = base.paper_config("resnet110", "tiny_imagenet")
  c.tiny_imagenet_dir = "/data/tiny-imagenet-200"  # Extracted tiny-imagenet-200/ folder: set yours.
  return c
