"""Quickstart: a small ResNet on Fashion-MNIST from Debian's raw IDX files, train + eval in minutes on a CPU."""
from snapjax import config as base


def get_config():
  c = base.base_config()
  c.model = "resnet8"  # One basic block per stage: small enough for a 2-core CPU.
  c.dataset = "fashion_mnist"  # Read from c.fashion_mnist_dir (apt-get install dataset-fashion-mnist).
  c.num_epochs = 4.0  # B: 4 epochs in all...
  c.num_cycles = 4  # ...M = 4 cycles of one epoch each.
  c.init_lr = 0.2  # alpha0.
  c.batch_size = 128  # Larger batches run faster on CPU.
  c.eval_batch_size = 1000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200
  return c
