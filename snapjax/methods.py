"""The paper's method catalogue, apart from the config schema (snapjax/config.py): budgets and Table 1's methods.

`paper_config(model, dataset)` is a Table 1 experiment with the paper's budget (Section 4: epochs B, cycles M,
batch size); `apply_method(config, method)` turns it into another column of Table 1 on the same budget;
`quickstart_config()` is the quickstart's CPU budget. configs/*.py are built from these.
"""
import ml_collections

from snapjax import config as config_lib
from snapjax.errors import ConfigError

# Paper budgets (Section 4): (dataset, model family) -> (B epochs, M cycles, batch size).
PAPER_BUDGETS = {
    ("cifar", "resnet"): (200, 5, 64), ("cifar", "wrn"): (200, 5, 64), ("cifar", "densenet"): (300, 6, 64),
    ("svhn", "resnet"): (40, 5, 64), ("svhn", "wrn"): (40, 5, 64), ("svhn", "densenet"): (40, 5, 64),
    ("tiny_imagenet", "resnet"): (150, 6, 128), ("tiny_imagenet", "wrn"): (150, 6, 128),
    ("tiny_imagenet", "densenet"): (150, 6, 64),
}


def quickstart_config() -> ml_collections.ConfigDict:
  """The quickstart's budget: a ResNet-8 on 10,000 Fashion-MNIST images (Debian's raw IDX files), minutes on a CPU."""
  c = config_lib.base_config()
  c.model = "resnet8"  # One basic block per stage: small enough for a 2-core CPU.
  c.dataset = "fashion_mnist"  # Read from c.fashion_mnist_dir (apt-get install dataset-fashion-mnist).
  c.train_split = "train[:10000]"  # The first 10,000 training images; the test split stays the full 10,000.
  c.val_split = "train[-5000:]"  # eval.py's held-out temperature split: the last 5,000, never trained on.
  c.augment = "none"
  c.num_epochs = 30.0  # B...
  c.num_cycles = 5  # ...and M: 5 cycles of 6 epochs (78 steps each).
  c.init_lr = 0.2  # alpha0.
  c.batch_size = 128  # Larger batches run faster on CPU.
  c.eval_batch_size = 1000
  c.log_every_steps = 78
  c.checkpoint_every_steps = 234
  return c


def paper_config(model: str, dataset: str, init_lr: float = 0.2) -> ml_collections.ConfigDict:
  """A Table 1 experiment with the paper's budget (B, M, batch) for this model family and dataset."""
  group = "cifar" if dataset.startswith("cifar") else "svhn" if dataset.startswith("svhn") else dataset
  family = next((f for f in ("resnet", "wrn", "densenet") if model.startswith(f)), None)
  if (group, family) not in PAPER_BUDGETS:
    raise ValueError(f"no paper budget for model={model!r} on dataset={dataset!r}")
  c = config_lib.base_config()
  c.model, c.dataset, c.init_lr = model, dataset, init_lr
  epochs, c.num_cycles, c.batch_size = PAPER_BUDGETS[(group, family)]
  c.num_epochs = float(epochs)
  if group == "tiny_imagenet":
    c.stem_stride = 2  # 64x64 input: stride 2 in the first convolution of each model.
  return c


# Paper Table 1's methods (paper "Baselines"), the argument of configs/<dataset>_<model>.py:<method>.
PAPER_METHODS = ("snapshot", "snapshot_lr0.1", "single", "nocycle", "single_cycle", "dropout")
NOCYCLE_SNAPSHOTS = 6  # NoCycle Snapshot Ensemble: 6 snapshots equally spaced along the single-model schedule.
DROPOUT_MODELS = ("wrn", "densenet")  # Model families of the paper's Dropout rows (ResNets have no dropout).
# The methods that followed Snapshot Ensembles (issue 20), on the same budget: FGE, SWA, EMA of the weights, SWAG.
FIELD_METHODS = ("fge", "swa", "ema", "swag")
METHODS = PAPER_METHODS + FIELD_METHODS + ("distill",)


def apply_method(c: ml_collections.ConfigDict, method: str | None) -> ml_collections.ConfigDict:
  """Turns a Snapshot Ensemble config into the same budget's Table 1 `method` (in place); returns it.

  Every method keeps the config's budget (epochs, batch size, model, data); only these fields change:
    snapshot (default, also None): the config as it is (alpha0 = init_lr, 0.2 on every Table 1 row).
    snapshot_lr0.1: the Snapshot Ensemble with alpha0 = 0.1.
    single: the single model: step schedule 0.1 -> 0.01 at 50% -> 0.001 at 75%, one snapshot at the end.
    nocycle: the same step schedule with NOCYCLE_SNAPSHOTS snapshots equally spaced (NoCycle Snapshot Ensemble).
    single_cycle: SingleCycle Ensembles: M fresh models, one cosine cycle each, at the config's alpha0.
    dropout: the single model with dropout p = 0.2 (WRN and DenseNet models only).
  and the methods that followed (FIELD_METHODS; README, "FGE, SWA, EMA and SWAG"), all at lr 0.1 as the single model:
    fge: Fast Geometric Ensembling: FGE's schedule (pretraining for 0.8 of the budget, then 2-epoch triangular
      cycles 0.05 -> 0.01 -> 0.05), a snapshot at each cycle's midpoint.
    swa: SWA's schedule (0.1, linear to swa_lr = 0.05, held from swa_start = 0.75 B), the weights averaged once per
      epoch from swa_start; one snapshot, the average, BatchNorm statistics measured on training batches.
    swag: swa, with SWAG's moments (rank 20) saved beside the snapshot; eval.py samples it.
    ema: the single model's step schedule with an exponential average of the weights (decay 0.999) after every
      update; one snapshot, the average.
  and distillation (snapjax/distill.py; README, "Distilling the ensemble into one network"):
    distill: a student on the single model's step schedule (lr 0.1, one snapshot at the end), taught by the
      ensemble of --config.teacher_workdirs (required) with distill_alpha 0.9 and distill_tau 4.

  Raises:
    ConfigError: `method` is not one of METHODS, or dropout for a model without dropout.
  """
  method = method or "snapshot"
  if method not in METHODS:
    raise ConfigError(f"config argument {method!r} is not a method; allowed: {', '.join(METHODS)} "
                      f"(e.g. --config configs/cifar10_wrn32_4.py:single_cycle)")
  if method == "dropout" and not c.model.startswith(DROPOUT_MODELS):
    raise ConfigError(f"method 'dropout' needs a model with dropout (the paper's WRN and DenseNet rows); "
                      f"model={c.model!r} has none; allowed methods for it: "
                      f"{', '.join(m for m in PAPER_METHODS if m != 'dropout')}")
  if method == "snapshot_lr0.1":
    c.init_lr = 0.1
  elif method in ("single", "nocycle", "dropout"):
    c.schedule, c.init_lr = "step", 0.1
    c.num_cycles = NOCYCLE_SNAPSHOTS if method == "nocycle" else 1
    if method == "dropout":
      c.dropout_rate = 0.2
  elif method == "single_cycle":
    c.method = "single_cycle"
  elif method == "distill":
    c.method, c.schedule, c.init_lr, c.num_cycles = "distill", "step", 0.1, 1
  elif method in FIELD_METHODS:
    c.method, c.init_lr, c.num_cycles = method, 0.1, 1
    c.schedule = {"fge": "fge", "swa": "swa", "swag": "swa", "ema": "step"}[method]
  return c
