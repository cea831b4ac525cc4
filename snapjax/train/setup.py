"""A run's set-up: the config resolved once into typed `Settings`, and `Run` (data, plan, optimiser, workdir, writer).

`set_up` makes every check of the user's input (config, workdir, data) before anything is compiled or written, then
claims the workdir (snapjax/workdir_lock.py) and opens its checkpoints and metric writer.
"""
import dataclasses
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from snapjax import averaging as averaging_lib, bn_data, checkpoints, distill, experiment, members, train_step
from snapjax import utilisation
from snapjax import weight_space
from snapjax import workdir as workdir_lib, workdir_lock
from snapjax import config as config_lib


@dataclasses.dataclass(frozen=True)
class Settings:
  """The config fields the loop and the trainees act on, read once from a validated config (a ConfigDict is slow
  to read and untyped; these are plain values)."""
  seed: int
  method: str
  batch_size: int
  steps_per_dispatch: int
  log_every_steps: int
  checkpoint_every_steps: int
  eval_snapshots: bool
  num_members: int
  single_cycle_parallel: bool
  dataset: str
  train_split: str  # The config's, or the dataset's own training split when the config leaves it empty.
  is_member_run: bool  # Trains through the member axis (snapjax/members.py: K > 1 or a parallel SingleCycle).
  # Peak FLOP/s of one device for the compute dtype: config.peak_flops, else snapjax.utilisation.PEAK_FLOPS by
  # jax.devices()[0].device_kind; None: unknown (CPU), and progress lines say so.
  peak_flops: float | None
  device_kind: str

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, spec_train_split: str) -> "Settings":
    device_kind = jax.devices()[0].device_kind
    return cls(seed=int(config.seed), method=str(config.method), batch_size=int(config.batch_size),
               steps_per_dispatch=int(config.steps_per_dispatch), log_every_steps=int(config.log_every_steps),
               checkpoint_every_steps=int(config.checkpoint_every_steps), eval_snapshots=bool(config.eval_snapshots),
               num_members=int(config.num_members),
               single_cycle_parallel=bool(config.get("single_cycle_parallel", False)), dataset=str(config.dataset),
               train_split=str(config.train_split or spec_train_split),
               is_member_run=members.is_member_run(config),
               peak_flops=utilisation.device_peak(device_kind, str(config.dtype), float(config.get("peak_flops", 0.0))),
               device_kind=device_kind)



@dataclasses.dataclass
class Run:
  """Everything a trainee and the loop need, made by `set_up` once every check of the user's input has passed."""
  config: ml_collections.ConfigDict
  settings: Settings
  workdir: str
  exp: experiment.Experiment
  plan: train_step.Plan
  tx: Any
  schedule: Any
  train_arrays: tuple[np.ndarray, np.ndarray] | None  # In-memory datasets; None once on the devices.
  test_arrays: tuple[np.ndarray, np.ndarray] | None
  lock: Any = None
  ckpt: checkpoints.RunCheckpoints | None = None
  writer: Any = None
  averaging: averaging_lib.Averaging | None = None  # Methods swa, ema, swag: the average in the train state.
  bn_arrays: tuple[np.ndarray, np.ndarray] | None = None  # The host training split, for `measure_batch_stats`.
  teacher: distill.Teacher | None = None  # method="distill": the frozen ensemble the student learns from.

  def training_arrays(self) -> tuple[np.ndarray, Any]:
    """The in-memory training split for the batch source: (images, labels), or, for a student whose teacher's soft
    labels are computed before training (distill.Teacher.precomputed), (images, (labels, soft labels))."""
    images, labels = self.train_arrays
    if self.teacher is None or not self.teacher.precomputed:
      return images, labels
    start = time.time()
    soft = distill.precompute_soft_labels(self.teacher, self.exp, images)
    logging.info("Distillation: the teacher's soft labels of the %d training images (%d snapshots), once before "
                 "training (augment=none): %.1f s", len(labels), self.teacher.size, time.time() - start)
    return images, (labels, soft)

  def frozen(self) -> Any:
    """What the compiled update takes besides the state and the data: the teacher's variables when the step runs
    the teacher (method="distill", distill_alpha > 0), else None (the plain program)."""
    return self.teacher.variables if self.teacher is not None and self.teacher.in_step else None

  def averaged_snapshot(self, variables: Any, stacked: bool = False) -> Any:
    """The averaged network's variables to save: its BatchNorm statistics measured again unless swa_bn="average".

    The exact mean over swa_bn_batches training batches of batch_size with the run's augmentation (0: one epoch;
    snapjax/bn_data.py), as the reference's bn_update; with `stacked`, of each member (a leading member axis).
    """
    if self.averaging.average_batch_stats:
      return variables
    num_train = len(self.bn_arrays[1]) if self.bn_arrays is not None else self.exp.spec.num_train
    num = bn_data.num_bn_batches(self.exp, num_train, int(self.config.swa_bn_batches))
    return weight_space.recompute_batch_stats(bn_data.train_apply_fn(self.exp), variables,
                                              bn_data.bn_batches(self.exp, self.bn_arrays, num), stacked=stacked)

  def snapshot_meta(self, step: int) -> dict[str, Any]:
    """Metadata of the snapshot at global `step`: its cycle (1-based), epoch, the method and the model it belongs to.

    "model" is the 0-based index of the network: always 0 for a Snapshot Ensemble (one network through every
    cycle), the cycle's own model (cycle - 1) for SingleCycle Ensembles.
    """
    cycle = self.plan.snapshot_steps.index(step) + 1
    method = self.settings.method
    meta = {"step": step, "cycle": cycle, "epoch": step / self.plan.steps_per_epoch, "method": method,
            "model": cycle - 1 if method == "single_cycle" else 0}
    if self.teacher is not None:  # Which ensemble taught it (TEACHER_FILE has each snapshot's checksum too).
      meta["teacher"] = {k: v for k, v in self.teacher.record().items() if k != "snapshots"}
      meta["teacher"]["workdirs"] = sorted({s["workdir"] for s in self.teacher.sources})
    if self.averaging is not None:  # The averaged network, and how many iterates it averages.
      meta.update(averaged=self.averaging.kind, collected=len(self.averaging.collect_steps(self.plan.total_steps)),
                  batch_stats="averaged" if self.averaging.average_batch_stats else "recomputed")
    return meta

  def last_good(self, unit: str) -> str:
    """What is on disk once every save in flight has committed: the last snapshot and the last train state (its
    step named as `unit`, "step" or "loop step")."""
    self.ckpt.wait()
    saved = self.ckpt.snapshot_steps()
    last = f"step {saved[-1]} ({self.ckpt.snapshot_path(saved[-1])})" if saved else "none"
    state_step = self.ckpt.latest_state_step()
    return f"last good snapshot: {last}; train state kept at {unit} {state_step if state_step is not None else 'none'}"

  def close(self) -> None:
    if self.ckpt is not None:
      self.ckpt.wait()
      self.ckpt.close()
    if self.writer is not None:
      self.writer.flush()
    if self.lock is not None:
      self.lock.release()


def set_up(config: ml_collections.ConfigDict, workdir: str, fresh: bool) -> Run:
  """Validate the config, the workdir and the data (nothing compiled or written yet), then claim the workdir."""
  config_lib.validate(config, jax.device_count())
  workdir_lib.check_path(workdir)
  config_dict = config_lib.to_dict(config)
  if not fresh:
    workdir_lib.check_same_run(workdir, config_dict)
  exp = experiment.build(config)
  settings = Settings.from_config(config, exp.spec.train_split)
  train_arrays = exp.load_split(settings.train_split) if exp.spec.in_memory else None
  test_arrays = exp.load_test_data()
  num_train = len(train_arrays[1]) if train_arrays is not None else exp.spec.num_train
  plan = train_step.make_plan(config, num_train)
  schedule = train_step.make_schedule(config, plan.total_steps, plan.steps_per_epoch)
  averaging = averaging_lib.from_config(config, plan.steps_per_epoch)
  teacher = distill.load_teacher(config, exp)  # method="distill": every teacher run checked, its snapshots restored.
  if teacher is not None and not fresh:
    distill.check_recorded(workdir, teacher)
  run = Run(config, settings, workdir, exp, plan, train_step.make_optimizer(config, schedule), schedule,
            train_arrays, test_arrays, averaging=averaging,
            bn_arrays=train_arrays if averaging is not None and not averaging.average_batch_stats else None,
            teacher=teacher)
  run.lock = workdir_lock.claim(workdir)  # Refuses a workdir a live run is writing, before anything moves.
  try:
    if fresh:
      workdir_lib.start_fresh(workdir)
    workdir_lib.write_config(workdir, config_dict)
    if teacher is not None:
      distill.write_record(workdir, teacher)
    run.ckpt = checkpoints.RunCheckpoints(workdir)
    run.writer = make_writer(workdir)
  except BaseException:
    run.close()
    raise
  return run


def make_writer(workdir: str):
  """TensorBoard + log lines on host 0; nothing on the other hosts (CLU's logging writer would print there)."""
  from clu import metric_writers
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.create_default_writer(workdir, just_logging=False)
