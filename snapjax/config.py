"""The experiment config: every field with its default, and the check that runs before any compilation."""
import math
from typing import Any

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

# Allowed values of the string-valued fields; models and datasets are checked against their registries.
SCHEDULES = ("cosine_cycles", "step", "fge", "swa")
METHODS = ("snapshot", "single_cycle", "fge", "swa", "ema", "swag", "distill")
AVERAGING_METHODS = ("swa", "ema", "swag")  # One snapshot at the end: the averaged network (snapjax/averaging.py).
SWA_BN = ("recompute", "average")
DISTILL_SOFT_LABELS = ("auto", "step")
SMOOTHOUT_NOISES = ("uniform", "weight", "filter")
MEMBER_STRATEGIES = ("auto", "loop", "map", "vmap")  # How one device group runs its members (snapjax/members.py).
SMOOTHOUT_SCHEDULES = ("constant", "anneal", "tanh")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # Field value -> compute dtype (params stay float32).
AUGMENTS = ("", "crop_flip", "none")
# Fields that may change when a run resumes in its workdir: they do not change what is trained.
MUTABLE_ON_RESUME = frozenset({
    "data_dir", "fashion_mnist_dir", "tiny_imagenet_dir", "eval_batch_size", "log_every_steps",
    "checkpoint_every_steps", "eval_snapshots", "steps_per_dispatch", "peak_flops", "val_split"})
# Fields that must agree between runs whose snapshots eval.py ensembles together (one architecture, one input).
SAME_ACROSS_RUNS = ("model", "dataset", "dtype", "stem_stride", "image_size")


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment (paper Table 1, ResNet-110 on CIFAR-10, alpha0 = 0.2)."""
  c = ml_collections.ConfigDict()
  c.model = "resnet110"  # Name in snapjax.models (resnet20/32/56/110, wrn32_4, densenet40, ...).
  c.dataset = "cifar10"  # Name in snapjax.data.DATASETS.
  c.data_dir = ""  # TFDS data_dir (local path or gs:// bucket); "" = TFDS default (~/tensorflow_datasets).
  c.fashion_mnist_dir = "/usr/share/datasets/fashion-mnist"  # Raw IDX files (Debian dataset-fashion-mnist).
  c.tiny_imagenet_dir = ""  # Extracted tiny-imagenet-200/ folder (image-folder layout).
  c.train_split = ""  # Training split in TFDS syntax, e.g. "train[:10000]" for a subset; "" = the dataset's own.
  c.val_split = ""  # Held-out images for eval.py's temperature scaling, never trained on ("train[-5000:]"); "" = none.
  c.augment = ""  # Training augmentation: "crop_flip", "none", or "" for the dataset's own (paper: crop+flip, SVHN none).
  c.num_epochs = 200.0  # Training budget B in epochs; the loop converts it to update steps once.
  c.num_cycles = 5  # M: cosine cycles (= snapshots); with schedule="step", the number of equally spaced snapshots.
  c.init_lr = 0.2  # alpha0, the learning rate at the start of every cycle.
  # "cosine_cycles" (Snapshot Ensemble, paper Eq. 2), "step" (single-model baseline), "fge" (FGE's pretraining and
  # triangular cycles, method="fge" only) or "swa" (constant, linear to swa_lr, constant: SWA's reference schedule).
  c.schedule = "cosine_cycles"
  # "snapshot": one network trained through every cycle (the paper's method); "single_cycle": a freshly
  # initialised network per cycle (init keyed by seed and cycle), the SingleCycle Ensembles baseline; "fge": Fast
  # Geometric Ensembling (a snapshot at each FGE cycle's midpoint); "swa", "ema", "swag": one network whose weights
  # are averaged in the train state, saved as the run's one snapshot (SWAG: with its moments, sampled by eval.py).
  c.method = "snapshot"
  # FGE (Garipov et al. 2018; schedule="fge"): pretraining for this fraction of num_epochs with the reference's
  # schedule (init_lr held to 50% of num_epochs, linear to 1% by 90%, as its train.py), then cycles.
  c.fge_pretrain_fraction = 0.8  # The reference's 160 of 200 epochs.
  c.fge_cycle_epochs = 2  # Epochs per cycle (even): fge_lr1 -> fge_lr2 at the midpoint (a model) -> fge_lr1.
  c.fge_lr1 = 0.05  # The cycles' rate at their ends (reference README, ResNet/WRN on CIFAR-100).
  c.fge_lr2 = 0.01  # ... and at their midpoints.
  # SWA (Izmailov et al. 2018; schedule="swa"; methods swa, swag): the average collects from epoch swa_start on.
  c.swa_start = config_dict.placeholder(float)  # Epoch the averaging starts at; None = 0.75 * num_epochs.
  c.swa_lr = 0.05  # The constant rate of the averaging phase (reference default; its CIFAR-10 recipes 0.01).
  c.swa_every_steps = config_dict.placeholder(int)  # Collect every this many updates; None = once per epoch.
  # The averaged network's BatchNorm statistics: "recompute" (measured on swa_bn_batches training batches, as the
  # reference's bn_update) or "average" (the running statistics averaged like the weights: torch's use_buffers).
  c.swa_bn = "recompute"
  c.swa_bn_batches = 50  # Training batches of batch_size for "recompute" (and SWAG's samples); 0 = one epoch.
  c.ema_decay = 0.999  # method="ema": average = decay * average + (1 - decay) * weights after every update.
  c.swag_rank = 20  # method="swag": deviation columns kept (the paper's K).
  # method="distill" (Hinton et al. 2015; snapjax/distill.py): the network trained is a student of the finished
  # ensemble of teacher_workdirs, loss (1 - distill_alpha) CE(labels) + distill_alpha tau^2 KL(teacher_tau ||
  # student_tau) with tau = distill_tau; the teacher runs inside the compiled step on every (augmented) batch.
  c.teacher_workdirs = ""  # Comma-separated workdirs of finished runs of the same dataset (train.py --workdir).
  c.teacher_last_m = 0  # The teacher averages the last this many snapshots of each run (and member); 0 = all.
  c.distill_alpha = 0.9  # Weight of the distillation term (RepDistiller's KD recipe: 0.9 with tau = 4).
  c.distill_tau = 4.0  # Temperature of teacher and student in the KL term (its gradient scaled back by tau^2).
  # Where the teacher runs: "auto" = once, before training, on every training image when the batches are not
  # augmented (augment "none": its soft labels are then the same at every epoch), else inside the step on each
  # augmented batch; "step" = inside the step always.
  c.distill_soft_labels = "auto"
  c.batch_size = 64  # Global batch size, split evenly over all devices of all hosts.
  c.eval_batch_size = 500  # Global evaluation batch size (rounded up to a multiple of the device count).
  c.seed = 0  # Seeds initialisation, data order, augmentation and dropout.
  c.momentum = 0.9  # Nesterov momentum (paper's reference code).
  c.nesterov = True  # Nesterov or heavy-ball momentum.
  c.weight_decay = 1e-4  # L2 weight decay added to every gradient, as in the reference code.
  c.dropout_rate = 0.0  # Dropout p for models that support it (paper baseline: 0.2 for WRN and DenseNet).
  # SmoothOut (Wu et al., arXiv 1805.07898): the gradient is taken at uniformly perturbed weights (noise removed
  # before the update). Off while smoothout_a is 0.
  c.smoothout_a = 0.0  # Noise bound a (the authors' --sharpness-smoothing); 0 = off.
  c.smoothout_noise = "uniform"  # "uniform" U(-a, a); "weight" U(-1, 1) * a * |w|; "filter" AdaSmoothOut per filter.
  c.smoothout_chunks = 1  # K: fresh noise for each of K chunks of a batch, gradients averaged (1 = stochastic).
  c.smoothout_schedule = "constant"  # a over training: "constant", "anneal" ((1+t)^-index, square-rooted), "tanh".
  c.smoothout_anneal_index = 0.55  # The exponent of the "anneal" schedule.
  c.smoothout_tanh_scale = 10.0  # The steepness of the "tanh" ramp (tanh(scale * (t/T - 0.5)) + 1) / 2.
  c.dtype = "float32"  # Compute dtype: "float32" or "bfloat16" (parameters stay float32).
  c.stem_stride = 1  # Stride of the first convolution (2 for Tiny ImageNet, per the paper).
  c.image_size = 224  # Train/eval crop size for streamed datasets (ImageNet).
  c.log_every_steps = 100  # Progress line and TensorBoard scalars every this many steps.
  c.checkpoint_every_steps = 1000  # Save the full train state (for resuming) every this many steps.
  c.eval_snapshots = True  # Score every snapshot on the test split when it is taken.
  # Ensemble members trained side by side (snapjax/members.py): member k is the run with seed `seed + k`.
  c.num_members = 1  # K independent networks in one program; 1 = the ordinary run.
  c.member_groups = 0  # Device groups (size of the "member" mesh axis); 0 = auto (gcd of members and devices).
  c.member_strategy = "auto"  # In a device group: "loop" (unrolled), "map" (lax.map), "vmap"; "auto" = loop.
  # method="single_cycle" only: train the M models side by side as members (ceil(T / M) updates each) instead of
  # one after another; the same snapshots as the sequential run.
  c.single_cycle_parallel = False
  # Updates per compiled call (in-memory datasets; streamed ones run 1): up to K steps in one device loop, ending at
  # every snapshot, save and log step, with the same results as K = 1; a preemption stops at the end of a dispatch.
  # 16 measured fastest on CPU and in a small model's regime (docs/performance.md, "Steps per dispatch").
  c.steps_per_dispatch = 16
  # Peak FLOP/s of one device, for the MFU of the progress lines (achieved / (peak x devices)); 0 = look up
  # jax.devices()[0].device_kind in snapjax.utilisation.PEAK_FLOPS (GPUs and TPUs; unknown on CPU).
  c.peak_flops = 0.0
  return c


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Plain JSON-able dict of a config."""
  return config.to_dict()


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config with the fields added to snapjax since it was written, at defaults that keep its behaviour."""
  return {**base_config().to_dict(), **saved}


def resume_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Fields (other than MUTABLE_ON_RESUME) whose values differ: a run of `new` cannot resume a run of `saved`."""
  keys = (set(saved) | set(new)) - MUTABLE_ON_RESUME
  return sorted(k for k in keys if saved.get(k) != new.get(k))


def ensemble_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
  """SAME_ACROSS_RUNS fields that differ: the snapshots of runs `a` and `b` cannot be ensembled together."""
  return [k for k in SAME_ACROSS_RUNS if a.get(k) != b.get(k)]


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """The dtype the model computes in (its parameters stay float32)."""
  return DTYPES[config.dtype]


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Keyword arguments of snapjax.models.get for this config (only the options a model needs to accept)."""
  kwargs = {"dtype": compute_dtype(config)}
  if config.stem_stride != 1:
    kwargs["stem_stride"] = config.stem_stride
  if config.dropout_rate:
    kwargs["dropout_rate"] = config.dropout_rate
  return kwargs


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raise ConfigError (one line, names the field and allowed values) for any bad field."""
  from snapjax import data, models  # Imported here: registries are only needed for the check.
  from snapjax.errors import ConfigError

  known = set(base_config().keys())
  unknown = sorted(set(config.keys()) - known)
  if unknown:
    raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
  if config.model not in models.names():
    raise ConfigError(f"model={config.model!r} is not known; allowed: {', '.join(models.names())}")
  if config.dataset not in data.DATASETS:
    raise ConfigError(f"dataset={config.dataset!r} is not known; allowed: {', '.join(sorted(data.DATASETS))}")
  if not isinstance(config.train_split, str):
    raise ConfigError(f"train_split must be a split string such as 'train[:10000]' (or '' for the dataset's "
                      f"own), got {config.train_split!r}")
  if not isinstance(config.val_split, str) or (config.val_split and not data.DATASETS[config.dataset].in_memory):
    raise ConfigError(f"val_split must be a split string of an in-memory dataset such as 'train[-5000:]' (or '' "
                      f"for none), got {config.val_split!r}")
  if config.train_split and not data.DATASETS[config.dataset].in_memory:
    raise ConfigError(f"train_split={config.train_split!r} is only supported for in-memory datasets; "
                      f"{config.dataset} is streamed: leave train_split empty")
  if config.augment not in AUGMENTS or (config.augment and not data.DATASETS[config.dataset].in_memory):
    raise ConfigError(f"augment={config.augment!r} is not allowed for {config.dataset}; allowed: '' (the dataset's "
                      f"own){', crop_flip, none' if data.DATASETS[config.dataset].in_memory else ''}")
  if config.schedule not in SCHEDULES:
    raise ConfigError(f"schedule={config.schedule!r} is not known; allowed: {', '.join(SCHEDULES)}")
  if config.method not in METHODS:
    raise ConfigError(f"method={config.method!r} is not known; allowed: {', '.join(METHODS)}")
  if config.method == "single_cycle" and config.schedule != "cosine_cycles":
    raise ConfigError(f"method='single_cycle' trains one cosine cycle per model: it needs "
                      f"schedule='cosine_cycles', got schedule={config.schedule!r}")
  validate_methods(config)
  if config.smoothout_noise not in SMOOTHOUT_NOISES:
    raise ConfigError(f"smoothout_noise={config.smoothout_noise!r} is not known; allowed: "
                      f"{', '.join(SMOOTHOUT_NOISES)}")
  if config.smoothout_schedule not in SMOOTHOUT_SCHEDULES:
    raise ConfigError(f"smoothout_schedule={config.smoothout_schedule!r} is not known; allowed: "
                      f"{', '.join(SMOOTHOUT_SCHEDULES)}")
  if config.dtype not in DTYPES:
    raise ConfigError(f"dtype={config.dtype!r} is not known; allowed: {', '.join(DTYPES)}")

  def positive_int(name):
    v = config[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")

  for name in ("num_cycles", "batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_steps",
               "smoothout_chunks", "steps_per_dispatch"):
    positive_int(name)
  if config.stem_stride not in (1, 2):
    raise ConfigError(f"stem_stride must be 1 or 2, got {config.stem_stride!r}")
  for name in ("num_epochs", "init_lr"):
    v = config[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
      raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
  for name, lo, hi in (("momentum", 0.0, 1.0), ("dropout_rate", 0.0, 1.0)):
    v = config[name]
    if not isinstance(v, (int, float)) or not lo <= v < hi:
      raise ConfigError(f"{name} must be in [{lo}, {hi}), got {v!r}")
  for name in ("smoothout_a", "smoothout_anneal_index", "smoothout_tanh_scale"):
    v = config[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
      raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
  v = config.peak_flops
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
    raise ConfigError(f"peak_flops must be a finite number >= 0 (FLOP/s of one device, e.g. 989e12; 0 = look up the "
                      f"device), got {v!r}")
  validate_members(config, num_devices)
  if not isinstance(config.weight_decay, (int, float)) or config.weight_decay < 0:
    raise ConfigError(f"weight_decay must be >= 0, got {config.weight_decay!r}")
  if config.batch_size % num_devices:
    raise ConfigError(
        f"batch_size={config.batch_size} is not divisible by the device count {num_devices}; "
        f"allowed: a multiple of {num_devices}")
  if config.smoothout_a and (config.batch_size // num_devices) % config.smoothout_chunks:
    raise ConfigError(
        f"smoothout_chunks={config.smoothout_chunks} does not divide the per-device batch "
        f"{config.batch_size // num_devices} (batch_size={config.batch_size} over {num_devices} devices); "
        f"allowed: a divisor of {config.batch_size // num_devices}")


def _finite_positive(config: ml_collections.ConfigDict, name: str, upper: float | None = None) -> None:
  from snapjax.errors import ConfigError
  v = config[name]
  if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
      or (upper is not None and v >= upper)):
    bound = f"in (0, {upper})" if upper is not None else "> 0"
    raise ConfigError(f"{name} must be a finite number {bound}, got {v!r}")


def validate_methods(config: ml_collections.ConfigDict) -> None:
  """ConfigError (one line) for FGE, SWA, EMA and SWAG fields that are bad or do not fit the method or budget."""
  from snapjax.errors import ConfigError
  method, schedule = config.method, config.schedule
  if (method == "fge") != (schedule == "fge"):
    raise ConfigError(f"method='fge' and schedule='fge' go together (FGE's snapshots are its cycle midpoints), got "
                      f"method={method!r}, schedule={schedule!r}; allowed: both 'fge', or neither")
  if method in ("swa", "swag") and schedule != "swa":
    raise ConfigError(f"method={method!r} averages the SWA phase: it needs schedule='swa', got schedule={schedule!r}")
  if method in AVERAGING_METHODS and config.num_cycles != 1:
    raise ConfigError(f"method={method!r} saves one snapshot, the averaged network, at the end: it needs "
                      f"num_cycles=1, got num_cycles={config.num_cycles!r}")
  for name in ("fge_lr1", "fge_lr2", "swa_lr"):
    _finite_positive(config, name)
  _finite_positive(config, "fge_pretrain_fraction", 1.0)
  _finite_positive(config, "ema_decay", 1.0)
  v = config.fge_cycle_epochs
  if isinstance(v, bool) or not isinstance(v, int) or v < 2 or v % 2:
    raise ConfigError(f"fge_cycle_epochs must be an even integer >= 2 (the model is collected at the cycle's "
                      f"midpoint epoch), got {v!r}")
  if schedule == "fge":
    left = config.num_epochs * (1 - config.fge_pretrain_fraction)
    if v > left + 1e-9:
      raise ConfigError(f"fge_cycle_epochs={v} is longer than the {left:g} epochs left after pretraining "
                        f"(num_epochs={config.num_epochs} x (1 - fge_pretrain_fraction={config.fge_pretrain_fraction}))"
                        f"; allowed: an even number <= {left:g}")
  v = config.swa_start
  if v is not None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
      raise ConfigError(f"swa_start must be None (0.75 * num_epochs) or an epoch > 0, got {v!r}")
    if schedule == "swa" and v > config.num_epochs:
      raise ConfigError(f"swa_start={v} is past the end of training (num_epochs={config.num_epochs}); allowed: "
                        f"0 < swa_start <= {config.num_epochs}")
  v = config.swa_every_steps
  if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
    raise ConfigError(f"swa_every_steps must be None (once per epoch) or an integer >= 1, got {v!r}")
  if config.swa_bn not in SWA_BN:
    raise ConfigError(f"swa_bn={config.swa_bn!r} is not known; allowed: {', '.join(SWA_BN)}")
  if method == "swag" and config.swa_bn != "recompute":
    raise ConfigError("method='swag' measures each sample's BatchNorm statistics on training batches: it needs "
                      f"swa_bn='recompute', got swa_bn={config.swa_bn!r}")
  v = config.swa_bn_batches
  if isinstance(v, bool) or not isinstance(v, int) or v < 0:
    raise ConfigError(f"swa_bn_batches must be an integer >= 0 (0: one epoch), got {v!r}")
  v = config.swag_rank
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise ConfigError(f"swag_rank must be an integer >= 1, got {v!r}")
  validate_distill(config)


def validate_distill(config: ml_collections.ConfigDict) -> None:
  """ConfigError (one line) for distillation fields that are bad or set without method="distill".

  The teacher runs themselves (present, finished, same data) are checked by snapjax.distill.load_teacher.
  """
  from snapjax.errors import ConfigError
  method, workdirs = config.method, config.teacher_workdirs
  if not isinstance(workdirs, str):
    raise ConfigError(f"teacher_workdirs must be a string of comma-separated workdirs, got {workdirs!r}")
  named = [w for w in (p.strip() for p in workdirs.split(",")) if w]
  if method == "distill" and not named:
    raise ConfigError("method='distill' needs its teacher: set teacher_workdirs to the workdirs of finished runs, "
                      "comma-separated (e.g. --config.teacher_workdirs=runs/quickstart)")
  if method != "distill" and named:
    raise ConfigError(f"teacher_workdirs={workdirs!r} is only read by method='distill', got method={method!r}; "
                      f"allowed: '' for this method")
  v = config.teacher_last_m
  if isinstance(v, bool) or not isinstance(v, int) or v < 0:
    raise ConfigError(f"teacher_last_m must be an integer >= 0 (0: every snapshot), got {v!r}")
  v = config.distill_alpha
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
    raise ConfigError(f"distill_alpha must be a number in [0, 1] (the distillation term's weight), got {v!r}")
  _finite_positive(config, "distill_tau")
  if config.distill_soft_labels not in DISTILL_SOFT_LABELS:
    raise ConfigError(f"distill_soft_labels={config.distill_soft_labels!r} is not known; allowed: "
                      f"{', '.join(DISTILL_SOFT_LABELS)}")
  if method == "distill" and config.smoothout_a:
    raise ConfigError(f"method='distill' trains with the plain step: it needs smoothout_a=0, got "
                      f"smoothout_a={config.smoothout_a!r}")


def training_members(config: ml_collections.ConfigDict) -> int:
  """Networks trained side by side: num_members, times the M models of a parallel SingleCycle run."""
  parallel = config.get("single_cycle_parallel", False) and config.method == "single_cycle"
  return config.get("num_members", 1) * (config.num_cycles if parallel else 1)


def member_group_choices(config: ml_collections.ConfigDict, num_devices: int) -> list[int]:
  """The member_groups values that fit: divisors of both the training members and the device count."""
  k = training_members(config)
  return [g for g in range(1, min(k, num_devices) + 1) if k % g == 0 and num_devices % g == 0]


def validate_members(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """ConfigError (one line, naming the valid values) for member fields that do not fit the config or devices."""
  from snapjax.errors import ConfigError
  v = config.num_members
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise ConfigError(f"num_members must be an integer >= 1, got {v!r}")
  if config.member_strategy not in MEMBER_STRATEGIES:
    raise ConfigError(f"member_strategy={config.member_strategy!r} is not known; allowed: "
                      f"{', '.join(MEMBER_STRATEGIES)}")
  if not isinstance(config.single_cycle_parallel, bool):
    raise ConfigError(f"single_cycle_parallel must be True or False, got {config.single_cycle_parallel!r}")
  if config.single_cycle_parallel and config.method != "single_cycle":
    raise ConfigError(f"single_cycle_parallel=True trains SingleCycle's models side by side: it needs "
                      f"method='single_cycle', got method={config.method!r}")
  g = config.member_groups
  choices = member_group_choices(config, num_devices)
  if isinstance(g, bool) or not isinstance(g, int) or (g != 0 and g not in choices):
    raise ConfigError(f"member_groups={g!r} does not fit {training_members(config)} training member(s) on "
                      f"{num_devices} device(s); allowed: 0 (auto), {', '.join(map(str, choices))}")
