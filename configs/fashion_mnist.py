"""Table 1's methods in small: the quickstart's Fashion-MNIST budget (configs/quickstart.py), minutes on a CPU.

`--config configs/fashion_mnist.py:METHOD`, METHOD one of snapshot (default: the quickstart's own config),
snapshot_lr0.1, single, nocycle, single_cycle, dropout (snapjax.config.apply_method). Every method trains a
ResNet-8 for 30 epochs on the first 10,000 training images without augmentation, batch 128, except dropout:
ResNet-8 has no dropout, so that arm trains the small wide ResNet wrn14_2 with p = 0.2 (its dropout-free twin:
`configs/fashion_mnist.py:single --config.model=wrn14_2`).
"""
from snapjax import config as base


def get_config(method=None):
  c = base.base_config()
  c.model = "wrn14_2" if method == "dropout" else "resnet8"
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
  return base.apply_method(c, method)
