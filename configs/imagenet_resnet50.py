"""Paper Section 4: ResNet-50 on ImageNet, B=90 epochs, M=2 cycles, batch 256, streamed with tf.data.

`--config configs/imagenet_resnet50.py:METHOD` trains a baseline on the same budget, METHOD one of snapshot
(default), snapshot_lr0.1 (the same here: alpha0 is already 0.1), single (the paper's single model), nocycle,
single_cycle, or fge, swa, ema, swag, distill (snapjax.methods.apply_method; distill needs --config.teacher_workdirs).
"""
from snapjax import config as base, methods


def get_config(method=None):
  c = base.base_config()
  c.model = "resnet50"
  c.dataset = "imagenet2012"  # Prepared TFDS dataset in c.data_dir (e.g. a gs:// bucket on Cloud TPU).
  c.num_epochs = 90.0  # B.
  c.num_cycles = 2  # M = 2 (23.33% top-1 error in the paper); M = 3 also reported.
  c.batch_size = 256
  c.init_lr = 0.1  # alpha0 for batch 256.
  c.eval_batch_size = 1024
  c.dtype = "bfloat16"  # bf16 compute on TPU/GPU; parameters stay float32.
  c.log_every_steps = 500
  c.checkpoint_every_steps = 2000
  return methods.apply_method(c, method)
