"""The one training loop of every run: dispatch, non-finite check, progress, save, snapshot, next model, stop.

`train(run, trainee, preemption, hooks)` drives a Trainee (snapjax/train/base.py): one compiled call per dispatch
of up to steps_per_dispatch updates, each ending where the host acts (a snapshot, a save, a log line, an epoch's
end); the updates' non-finite flags are checked before anything is logged or saved; a preemption notice stops it
after the dispatch in flight with the state saved. What a one-member and a K-member run do differently is the
trainee's (snapjax/train/one_member.py, snapjax/train/k_members.py).
"""
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import numpy as np

from snapjax import progress, utilisation
from snapjax.train.base import Hooks, PyTree, Trainee, TrainingDiverged, TrainResult, itstime
from snapjax.train.preemption import Preemption
from snapjax.train.setup import Run

MAX_UNCHECKED = 1024  # Dispatches the loop may run ahead of its non-finite check between logs and saves.


class Dispatch(NamedTuple):  # A NamedTuple: made at every dispatch, and cheap to make.
  """Updates first..last (the trainee's steps, 1-based) run by one call of the compiled update, and their metrics."""
  first: int
  last: int
  metrics: dict[str, jax.Array]  # One update's values, or (stacked) one row per update, the first ones filled.
  stacked: bool

  def row(self, step: int) -> dict[str, np.ndarray]:
    """The host values of one update's metrics: a scalar, or one entry per member."""
    got = jax.device_get(self.metrics)
    return {k: np.asarray(v[step - self.first] if self.stacked else v) for k, v in got.items()}


def check_finite(dispatches: list[Dispatch], trainee: Trainee, run: Run) -> None:
  """Raise TrainingDiverged, naming the first update (and member) with a non-finite loss or gradient, if any.

  One device sync for all of them: the loop does not wait for each dispatch.
  """
  if not dispatches:
    return
  for d, finite in zip(dispatches, jax.device_get([d.metrics["finite"] for d in dispatches])):
    n = d.last - d.first + 1
    rows = np.reshape(np.asarray(finite)[:n] if d.stacked else finite, (n, -1))
    if rows.all():
      continue
    r, j = np.unravel_index(int(np.argmin(rows)), rows.shape)
    step = d.first + int(r)
    m = {k: np.reshape(v, -1)[min(int(j), np.size(v) - 1)] for k, v in d.row(step).items()}
    # Saves in flight (all of good steps) commit first, so the message names what is on disk.
    raise TrainingDiverged(
        f"{trainee.who(int(j))}non-finite loss or gradient at step {trainee.global_step(int(j), step)} "
        f"(loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}, lr={float(m['lr']):.6g}); "
        f"{run.last_good(trainee.step_unit)}")


def log_progress(run: Run, trainee: Trainee, step: int, metrics: dict[str, np.ndarray],
                 rate: progress.StepRate, flops_per_step: float | None = None) -> None:
  """A progress line (host 0 only) and TensorBoard scalars, the same for every run.

  Loss and accuracy are the members' means, lr their range; SmoothOut's bound a * c(t) where it is on; the achieved
  TFLOP/s (XLA's FLOPs of a loop step, all devices, x steps/s) and MFU (achieved / (peak x devices)) over the window
  since the last line (snapjax/utilisation.py).
  """
  steps_per_s = rate.update(step)
  images = steps_per_s * trainee.images_per_step
  used = utilisation.measure(flops_per_step, steps_per_s, run.settings.peak_flops, jax.device_count())
  mean = {k: float(np.mean(v)) for k, v in metrics.items() if k != "finite"}
  lr = np.asarray(metrics["lr"])
  members = np.size(metrics["loss"])
  if jax.process_index() == 0:
    lr_text = f"{np.min(lr):.5f}" if np.min(lr) == np.max(lr) else f"{np.min(lr):.5f}..{np.max(lr):.5f}"
    extra = f" smoothout_a {mean['smoothout_a']:.5f}" if "smoothout_a" in mean else ""
    who = f" ({members} members)" if members > 1 else ""
    logging.info("%s %d/%d%s epoch %.2f loss %.4f acc %.3f lr %s%s %.0f img/s %s ETA %s", trainee.step_unit, step,
                 trainee.total_steps, who, trainee.epoch(step), mean["loss"], mean["accuracy"], lr_text, extra, images,
                 used.text(), progress.clock(rate.eta(trainee.total_steps - step)))
  scalars = {"train/loss": mean["loss"], "train/accuracy": mean["accuracy"], "train/lr": mean["lr"],
             "train/images_per_sec": images, **used.scalars()}
  if "smoothout_a" in mean:
    scalars["train/smoothout_a"] = mean["smoothout_a"]
  run.writer.write_scalars(step, scalars)


def log_peak(run: Run, trainee: Trainee, flops_per_step: float | None) -> None:
  """Once per run, where the MFU comes from: the step's FLOPs and the device's peak (host 0)."""
  if jax.process_index() != 0:
    return
  s = run.settings
  flops = f"{flops_per_step / 1e9:,.3g} GFLOP per {trainee.step_unit} (XLA's cost analysis, {jax.device_count()} " \
          f"devices)" if flops_per_step else "no FLOPs from XLA's cost analysis"
  peak = (f"peak {s.peak_flops / 1e12:,.4g} TFLOP/s per device ({s.device_kind})" if s.peak_flops else
          f"MFU n/a: no peak FLOP/s known for {s.device_kind!r}; set --config.peak_flops")
  logging.info("Utilisation: %s; %s", flops, peak)


def _save_state(run: Run, step: int, state: PyTree, hooks: Hooks) -> None:
  if hooks.on_state_saved is not None:
    hooks.on_state_saved(step, state)
  run.ckpt.save_state(step, state)


class _Due(NamedTuple):
  """What the host does after a dispatch."""
  snapshot: bool
  save: bool
  log: bool


def _due(run: Run, trainee: Trainee, step: int) -> _Due:
  s, total = run.settings, trainee.total_steps
  return _Due(snapshot=itstime(step, at=trainee.snapshot_steps),
              save=itstime(step, s.checkpoint_every_steps, total, at=trainee.snapshot_steps),
              log=itstime(step, s.log_every_steps, total))


def _stop(run: Run, trainee: Trainee, step: int, state: PyTree, saved: bool, hooks: Hooks,
          scores: list[dict[str, Any]]) -> TrainResult:
  """A preempted run's end: its state saved at `step` (if the dispatch's own save did not), every save committed."""
  if not saved:
    _save_state(run, step, state, hooks)
  run.ckpt.wait()
  logging.warning("Preempted: state saved at %s %d of %d; re-run the same command to resume.", trainee.step_unit,
                  step, trainee.total_steps)
  return TrainResult(True, step, list(run.plan.snapshot_steps), scores)


def train(run: Run, trainee: Trainee, preemption: Preemption, hooks: Hooks) -> TrainResult:
  """The loop: restore or init, then dispatch after dispatch until the last step or a stop; see the module doc."""
  state, start = trainee.restore_or_init()
  state = trainee.next_model(state, start)  # Resumed at a cycle end: SingleCycle's next model starts first.
  update = trainee.compile_update(start)
  every = (run.settings.log_every_steps, run.settings.checkpoint_every_steps)
  scores, pending = [], []  # Dispatches not yet checked for non-finite values.
  rate = progress.StepRate(time.time(), start)
  preemption.begin(start)
  step = start  # Updates done.
  while step < trainee.total_steps:
    first = step + 1
    step = trainee.dispatch_end(step, every)
    state, metrics = update(state, first - 1, step - first + 1)
    if first == start + 1:  # The first call compiled the update and read its FLOPs.
      log_peak(run, trainee, update.flops_per_step)
    done = Dispatch(first, step, metrics, update.stacked)
    pending.append(done)
    if len(pending) > MAX_UNCHECKED:  # Bounds what is held, and the updates run past a divergence.
      check_finite(pending[:-1], trainee, run)
      del pending[:-1]
    due = _due(run, trainee, step)
    if due.save or due.log:  # Nothing non-finite is logged or saved.
      check_finite(pending, trainee, run)
      pending.clear()
    if due.log:
      log_progress(run, trainee, step, done.row(step), rate, update.flops_per_step)
    if due.snapshot:
      scores.extend(trainee.take_snapshots(state, step))
    if due.save:
      _save_state(run, step, state, hooks)
    if preemption.should_stop(first, step) and step < trainee.total_steps:  # Every host asks after every dispatch.
      check_finite(pending, trainee, run)
      return _stop(run, trainee, step, state, due.save, hooks, scores)
    state = trainee.next_model(state, step)  # After the snapshot and its state save.
  check_finite(pending, trainee, run)
  run.ckpt.wait()  # Still under the SIGTERM handler: a notice now cannot cut the final saves.
  return TrainResult(False, trainee.total_steps, list(run.plan.snapshot_steps), scores)

