"""Quickstart: a Snapshot Ensemble of a ResNet-8 on Fashion-MNIST (Debian's raw IDX files), minutes on a CPU.

A 10,000-image training subset without augmentation: each 6-epoch cycle converges (and starts to
overfit), which is the regime where the paper's ensemble pays off; on this budget, full-data runs keep
improving from cycle to cycle and their last snapshot beats the ensemble (see README).
"""
from snapjax import config as base


def get_config():
  c = base.base_config()
  c.model = "resnet8"  # One basic block per stage: small enough for a 2-core CPU.
  c.dataset = "fashion_mnist"  # Read from c.fashion_mnist_dir (apt-get install dataset-fashion-mnist).
  c.train_split = "train[:10000]"  # The first 10,000 training images; the test split stays the full 10,000.
  c.augment = "none"
  c.num_epochs = 30.0  # B...
  c.num_cycles = 5  # ...and M: 5 cycles of 6 epochs (78 steps each).
  c.init_lr = 0.2  # alpha0.
  c.batch_size = 128  # Larger batches run faster on CPU.
  c.eval_batch_size = 1000
  c.log_every_steps = 78
  c.checkpoint_every_steps = 234
  return c
