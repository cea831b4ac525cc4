"""Table 1's methods in small: the quickstart's Fashion-MNIST budget (configs/quickstart.py), minutes on a CPU.

`--config configs/fashion_mnist.py:METHOD`, METHOD one of snapshot (default: the quickstart's own config),
snapshot_lr0.1, single, nocycle, single_cycle, dropout, or fge, swa, ema, swag, distill (snapjax.methods.apply_method; distill needs --config.teacher_workdirs).
Every method trains a ResNet-8 for 30 epochs on the first 10,000 training images without augmentation, batch 128, except dropout:
ResNet-8 has no dropout, so that arm trains the small wide ResNet wrn14_2 with p = 0.2 (its dropout-free twin:
`configs/fashion_mnist.py:single --config.model=wrn14_2`).
"""
from snapjax import methods


def get_config(method=None):
  c = methods.quickstart_config()
  if method == "dropout":
    c.model = "wrn14_2"
  return methods.apply_method(c, method)
