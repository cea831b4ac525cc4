"""Snapshot Ensemble training: the loop, in pieces (set-up, restore, batch source, timing, snapshot, stop).

`train_and_evaluate(config, workdir)` is train.py's logic: it trains with the config's cosine cycles, saves and
scores a snapshot at the end of each cycle, saves the train state for resuming, and stops cleanly on a
preemption notice. With method="single_cycle" (the paper's SingleCycle Ensembles baseline) a freshly initialised
model takes over after each snapshot. `Hooks` are explicit injection points for tests and tools.
"""
import dataclasses
import functools
import signal
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from snapjax import checkpoints, data, dispatch, ensemble, experiment, scoring, train_step, workdir as workdir_lib
from snapjax import workdir_lock
from snapjax import config as config_lib
from snapjax.errors import CheckpointError

PyTree = Any


_MAX_UNCHECKED = 1024  # Dispatches the loop may run ahead of its non-finite check between logs and saves.


class TrainingDiverged(RuntimeError):
  """The loss or gradient became non-finite; nothing after the last good save was kept."""


@dataclasses.dataclass
class Hooks:
  """Explicit injection points (tests, probes, tools); every field is optional.

  stop_at(step) -> bool: also stop after this step, exactly as a preemption notice would: asked for every step, it
    stops the run at the end of the dispatch that runs that step (config.steps_per_dispatch).
  wrap_step(step_fn) -> step_fn: wraps the per-batch update (state, x, y) -> (state, metrics) before jit.
  on_state_saved(step, state) / on_state_restored(step, state): see each train state saved or restored.
  on_init(state) -> state: replaces the fresh train state (before any restore), e.g. to perturb it; with
    method="single_cycle" also each later model's fresh state, when it takes over after a cycle end.
  agree_every: several hosts without JAX's preemption service compare their stop flags every this many steps.
  In a member run (snapjax/member_training.py) the states are the stacked members' and steps are loop steps;
  wrap_step wraps each member's own step function.
  """
  stop_at: Callable[[int], bool] | None = None
  wrap_step: Callable[[train_step.StepFn], train_step.StepFn] | None = None
  on_state_saved: Callable[[int, PyTree], None] | None = None
  on_state_restored: Callable[[int, PyTree], None] | None = None
  on_init: Callable[[PyTree], PyTree] | None = None
  agree_every: int = 10


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """How a call ended: preempted (state saved at `step`) or finished (step == total steps)."""
  preempted: bool
  step: int
  snapshot_steps: list[int]  # Every snapshot step of the plan.
  snapshot_scores: list[dict[str, Any]]  # {"step", "error", "nll", "count"} of each snapshot taken in this call.

  def __getitem__(self, key: str) -> Any:  # result["step"]: the mapping view, as in to_dict().
    return getattr(self, key)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def itstime(step: int, every: int | None = None, total: int | None = None, at: tuple[int, ...] = ()) -> bool:
  """Is it time, after `step` updates, for a periodic action (as big_vision's itstime)?

  True at the steps in `at`, every `every` steps, and at the last step `total` when `every` is set.
  """
  return step in at or bool(every) and (step % every == 0 or step == total)


class _Preemption:
  """Turns a preemption notice (SIGTERM on Cloud TPU / spot VMs) into a stop every host takes at the same step.

  One process: a SIGTERM handler sets a flag the loop polls. Several processes: JAX's distributed runtime
  catches SIGTERM itself and its preemption sync manager picks one step for every host
  (multihost_utils.reached_preemption_sync_point, called at every step). A Python handler would replace the
  runtime's and a host stopping alone hangs the others in their next collective, so none is installed then.
  If the runtime's service is off (jax_enable_preemption_service=False), each host keeps its own flag and the
  hosts agree every `agree_every` steps with an allgather of the flags.
  Every host asks once per dispatch (after the same updates on every host), so a run stops at the end of a dispatch.
  """

  def __init__(self, hooks: Hooks):
    self.requested = False
    self._previous = None
    self._sync_manager = False
    self._hooks = hooks
    self._start, self._calls = 0, 0  # The sync point counter is start + dispatches: consecutive, as the service needs.
    self._processes = jax.process_count()

  def __enter__(self):
    """One process: catch SIGTERM from the start, so a notice during set-up or compilation is kept too."""
    if jax.process_count() == 1:
      self._install_handler()
    return self

  def begin(self, start: int) -> None:
    """Called once before the first step (several processes: registers the start step with JAX's service)."""
    self._start = start
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:  # Registers the start step, so a notice that arrives before the first step picks a later one.
        self.requested = multihost_utils.reached_preemption_sync_point(start)
        self._sync_manager = True
      except RuntimeError:  # The preemption service is disabled: fall back to flags and an allgather.
        self._install_handler()

  def _install_handler(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: no handler, the loop never sees a request.
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, first: int, last: int) -> bool:
    """Stop after the dispatch that ran updates first..last? Asked once per dispatch by every host."""
    self._calls += 1
    if self._hooks.stop_at is not None and any([self._hooks.stop_at(s) for s in range(first, last + 1)]):
      return True
    if self._processes == 1:
      return self.requested
    from jax.experimental import multihost_utils
    if self._sync_manager:  # Counter start + dispatches: consecutive on every host (K = 1: the step).
      return self.requested or multihost_utils.reached_preemption_sync_point(self._start + self._calls)
    if last // self._hooks.agree_every == (first - 1) // self._hooks.agree_every:  # No multiple in first..last.
      return False
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))


@dataclasses.dataclass
class _Run:
  """Everything the loop needs, made by `_set_up` once every check of the user's input has passed."""
  config: ml_collections.ConfigDict
  workdir: str
  exp: experiment.Experiment
  plan: train_step.Plan
  tx: Any
  schedule: Any
  train_arrays: tuple[np.ndarray, np.ndarray] | None
  test_arrays: tuple[np.ndarray, np.ndarray] | None
  lock: Any = None
  ckpt: checkpoints.RunCheckpoints | None = None
  writer: Any = None

  def close(self) -> None:
    if self.ckpt is not None:
      self.ckpt.wait()
      self.ckpt.close()
    if self.writer is not None:
      self.writer.flush()
    if self.lock is not None:
      self.lock.release()


def _set_up(config: ml_collections.ConfigDict, workdir: str, fresh: bool) -> _Run:
  """Validate the config, the workdir and the data (nothing compiled or written yet), then claim the workdir."""
  config_lib.validate(config, jax.device_count())
  workdir_lib.check_path(workdir)
  config_dict = config_lib.to_dict(config)
  if not fresh:
    workdir_lib.check_same_run(workdir, config_dict)
  exp = experiment.build(config)
  train_split = config.train_split or exp.spec.train_split
  train_arrays = exp.load_split(train_split) if exp.spec.in_memory else None
  test_arrays = exp.load_test_data()
  num_train = len(train_arrays[1]) if train_arrays is not None else exp.spec.num_train
  plan = train_step.make_plan(config, num_train)
  schedule = train_step.make_schedule(config, plan.total_steps)
  run = _Run(config, workdir, exp, plan, train_step.make_optimizer(config, schedule), schedule, train_arrays,
             test_arrays)
  run.lock = workdir_lock.claim(workdir)  # Refuses a workdir a live run is writing, before anything moves.
  try:
    if fresh:
      workdir_lib.start_fresh(workdir)
    workdir_lib.write_config(workdir, config_dict)
    run.ckpt = checkpoints.RunCheckpoints(workdir)
    run.writer = _make_writer(workdir)
  except BaseException:
    run.close()
    raise
  return run


def _restore_or_init(run: _Run, init_key: jax.Array, hooks: Hooks) -> tuple[PyTree, int]:
  """The latest train state of the workdir, or a fresh one; checks that every earlier snapshot exists."""
  replicated = run.exp.replicated
  init = jax.jit(functools.partial(train_step.init_state, run.exp, run.tx), out_shardings=replicated)
  start = run.ckpt.latest_state_step()
  if start is None or hooks.on_init is not None:
    state = init(init_key)
  else:  # Only the restore target: a resumed run does not compile the initialiser (seconds: its RNG code).
    state = jax.eval_shape(init, init_key)
  if hooks.on_init is not None:
    state = hooks.on_init(state)
  if start is not None:
    state = run.ckpt.restore_state(start, checkpoints.abstract_like(state, replicated))
    logging.info("Resumed from step %d of %d in %s", start, run.plan.total_steps, run.workdir)
    if hooks.on_state_restored is not None:
      hooks.on_state_restored(start, state)
  start = int(jax.device_get(state["step"]))
  _check_snapshots(run, start, state)
  return state, start


def _batch_source(run: _Run, start: int, data_key: jax.Array, aug_key: jax.Array) -> train_step.BatchSource:
  if run.exp.spec.in_memory:
    source = train_step.InMemoryBatches(run.exp, run.train_arrays, run.plan, data_key, aug_key,
                                        run.config.steps_per_dispatch)
    run.train_arrays = None  # Only the device copy is kept.
    return source
  if run.config.steps_per_dispatch > 1:
    logging.info("steps_per_dispatch=%d: a streamed dataset runs one update per dispatch", run.config.steps_per_dispatch)
  # A resumed stream is reseeded from (seed, resume step): it does not replay the batches already seen, but
  # (unlike the in-memory path) its order is not the one an uninterrupted run would have had.
  split = run.config.train_split or run.exp.spec.train_split
  seed = run.config.seed if start == 0 else data.derive_seed(run.config.seed, start)
  return train_step.StreamedBatches(run.exp.train_stream(split, seed), run.exp)


def _snapshot_variables(state: PyTree) -> PyTree:
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


def _snapshot_meta(run: _Run, step: int) -> dict[str, Any]:
  """Metadata of the snapshot at `step`: its cycle (1-based), epoch, the method and the model it belongs to.

  "model" is the 0-based index of the network: always 0 for a Snapshot Ensemble (one network through every
  cycle), the cycle's own model (cycle - 1) for SingleCycle Ensembles.
  """
  cycle = run.plan.snapshot_steps.index(step) + 1
  return {"step": step, "cycle": cycle, "epoch": step / run.plan.steps_per_epoch, "method": run.config.method,
          "model": cycle - 1 if run.config.method == "single_cycle" else 0}


def _take_snapshot(run: _Run, state: PyTree, step: int) -> dict[str, Any] | None:
  """Score the snapshot of this step (if the config says so) and save it with its score in its metadata."""
  variables = _snapshot_variables(state)
  meta = _snapshot_meta(run, step)
  cycle = meta["cycle"]
  score = None
  if run.config.eval_snapshots:  # Scored before its save starts, so the score lands in its metadata.
    s = scoring.score_snapshots(run.exp.apply_fn, ensemble.stack_snapshots([variables]),
                                run.exp.test_batches(arrays=run.test_arrays)).members[0]
    score = {"step": step, **s.as_dict()}
    meta.update(test_error=s.error, test_nll=s.nll)
    if jax.process_index() == 0:
      logging.info("Snapshot %d/%d at step %d: test error %.4f, NLL %.4f", cycle, len(run.plan.snapshot_steps),
                   step, s.error, s.nll)
    run.writer.write_scalars(step, {"snapshot/error": s.error, "snapshot/nll": s.nll})
  if step not in run.ckpt.snapshot_steps():
    run.ckpt.save_snapshot(step, variables, meta)
  return score


def _next_model_fn(run: _Run, init_key: jax.Array, hooks: Hooks) -> Callable[[PyTree, int], PyTree]:
  """(state, step) -> state: SingleCycle Ensembles' hand-over from model k to model k + 1 at the end of cycle k.

  Called after the snapshot at `step` and its train-state save (a state saved at a cycle end holds the model
  that ended there), and on resuming at such a step. At the end of cycle k (1-based) before the last, params,
  batch_stats and the optimiser state (momentum) become those of model k (0-based), a fresh init keyed by
  fold_in(init_key, k); model 0 is the Snapshot Ensemble's own init (init_key). The step and the optimiser's
  integer update counts go on, so the data order, the dropout rng and the schedule continue as in a Snapshot
  Ensemble of the same seed. Anywhere else, and for method="snapshot", the state is returned as it is.
  """
  snapshot_steps = run.plan.snapshot_steps
  if run.config.method != "single_cycle":
    return lambda state, step: state

  def fresh(key, state):
    new = train_step.init_state(run.exp, run.tx, key)
    keep_counts = lambda old, init: old if jnp.issubdtype(old.dtype, jnp.integer) else init
    return {**new, "step": state["step"], "opt_state": jax.tree.map(keep_counts, state["opt_state"],
                                                                     new["opt_state"])}

  fresh = jax.jit(fresh, out_shardings=run.exp.replicated)

  def next_model(state: PyTree, step: int) -> PyTree:
    if step not in snapshot_steps[:-1]:
      return state
    k = snapshot_steps.index(step) + 1
    state = fresh(jax.random.fold_in(init_key, k), state)
    if hooks.on_init is not None:
      state = hooks.on_init(state)
    if jax.process_index() == 0:
      logging.info("SingleCycle: model %d/%d starts at step %d from a fresh init", k + 1, len(snapshot_steps), step)
    return state

  return next_model


def _save_state(run: _Run, step: int, state: PyTree, hooks: Hooks) -> None:
  if hooks.on_state_saved is not None:
    hooks.on_state_saved(step, state)
  run.ckpt.save_state(step, state)


def _train(run: _Run, preemption: _Preemption, hooks: Hooks) -> TrainResult:
  """The loop: one compiled call per dispatch of up to steps_per_dispatch updates, ending wherever the host acts;
  logs, saves and snapshots when it is time; stops when asked."""
  init_key, data_key, aug_key, dropout_key = jax.random.split(jax.random.PRNGKey(run.config.seed), 4)
  state, start = _restore_or_init(run, init_key, hooks)
  next_model = _next_model_fn(run, init_key, hooks)
  state = next_model(state, start)  # Resumed at a cycle end: SingleCycle's next model starts before any update.
  step_fn = train_step.make_train_step(run.exp.model, run.tx, run.schedule, dropout_key,
                                       smoothout=train_step.make_smoothout(run.config, run.plan),
                                       num_shards=run.exp.mesh.devices.size)
  source = _batch_source(run, start, data_key, aug_key)
  update = source.compile(hooks.wrap_step(step_fn) if hooks.wrap_step else step_fn)
  plan, config, scores = run.plan, run.config, []
  log_every, save_every = config.log_every_steps, config.checkpoint_every_steps  # Read once: ConfigDict is slow.
  pending = []  # Dispatches not yet checked for non-finite values: checked before anything is logged or saved.
  window = _Window(time.time(), start)
  preemption.begin(start)
  step = start  # Updates done.
  while step < plan.total_steps:
    first = step + 1
    step = dispatch.dispatch_end(step, source.steps_per_dispatch, plan.total_steps, at=plan.snapshot_steps,
                                 every=(log_every, save_every, source.period))
    state, metrics = update(state, first - 1, step - first + 1)
    done = _Dispatch(first, step, metrics)
    pending.append(done)
    if len(pending) > _MAX_UNCHECKED:  # Bounds what is held, and the updates run past a divergence.
      _check_finite(pending[:-1], run.ckpt)
      del pending[:-1]
    snapshot = itstime(step, at=plan.snapshot_steps)
    save = itstime(step, save_every, plan.total_steps, at=plan.snapshot_steps)
    log = itstime(step, log_every, plan.total_steps)
    if save or log:  # Nothing non-finite is logged or saved.
      _check_finite(pending, run.ckpt)
      pending.clear()
    if log:
      _log_progress(run, step, done.metrics(step), window)
    if snapshot and (score := _take_snapshot(run, state, step)) is not None:
      scores.append(score)
    if save:
      _save_state(run, step, state, hooks)
    if preemption.should_stop(first, step) and step < plan.total_steps:  # Every host asks after every dispatch.
      _check_finite(pending, run.ckpt)
      if not save:
        _save_state(run, step, state, hooks)
      run.ckpt.wait()
      logging.warning("Preempted: state saved at step %d of %d; re-run the same command to resume.",
                      step, plan.total_steps)
      return TrainResult(True, step, list(plan.snapshot_steps), scores)
    state = next_model(state, step)  # After the snapshot and its state save; python-level, at snapshot steps only.
  _check_finite(pending, run.ckpt)
  run.ckpt.wait()  # Still under the SIGTERM handler: a notice now cannot cut the final saves.
  return TrainResult(False, plan.total_steps, list(plan.snapshot_steps), scores)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False,
                       hooks: Hooks | None = None) -> TrainResult:
  """Trains a Snapshot Ensemble in `workdir` (resuming the run there), saving and scoring a snapshot per cycle.

  Every check of the user's input (config, workdir, data) runs before anything is written or compiled; a
  workdir that a live run is writing is refused. A preemption notice (SIGTERM) at any point saves the
  state after the dispatch in flight (one step unless config.steps_per_dispatch > 1) and returns a preempted
  result; re-running the same call resumes.

  Args:
    config: the experiment (`snapjax.config.base_config()` and configs/*.py document every field).
    workdir: a local directory or a bucket URL; created if missing.
    fresh: move an existing run in workdir aside (to WORKDIR/previous-<time>/) instead of refusing a run of
      another config, after every check has passed.
    hooks: optional injection points (tests, probes).

  Returns:
    A `TrainResult`: preempted or not, the last step done, the snapshot steps and the scores taken.

  Raises:
    snapjax.errors.UserError: bad config, workdir or data (a one-line message).
    TrainingDiverged: a non-finite loss or gradient (the message names the last good snapshot).

  Example:
    >>> from snapjax import config as config_lib, training
    >>> c = config_lib.base_config(); c.model = "resnet8"; c.dataset = "fashion_mnist"  # doctest: +SKIP
    >>> training.train_and_evaluate(c, "runs/fmnist").snapshot_steps  # doctest: +SKIP
  """
  hooks = hooks or Hooks()
  with _Preemption(hooks) as preemption:
    run = _set_up(config, workdir, fresh)
    try:
      return _train_fn(config)(run, preemption, hooks)
    finally:
      run.close()


def _train_fn(config: ml_collections.ConfigDict) -> Callable[[_Run, _Preemption, Hooks], TrainResult]:
  """The loop of this config: `_train`, or members side by side (snapjax/member_training.py, num_members > 1)."""
  from snapjax import members  # Imported here: member_training imports this module.
  if not members.is_member_run(config):
    return _train
  from snapjax import member_training
  return member_training.train


def _check_snapshots(run: _Run, start: int, state: PyTree) -> None:
  """Every snapshot up to the resumed step exists; the one at the resumed step is re-saved if its save was cut."""
  saved = set(run.ckpt.snapshot_steps())
  for s in run.plan.snapshot_steps:
    if s > start or s in saved:
      continue
    if s == start:  # Killed after the state save committed but before the snapshot's: the state has it.
      run.ckpt.save_snapshot(s, _snapshot_variables(state), _snapshot_meta(run, s))
      logging.warning("Snapshot at step %d was missing; re-saved it from the train state.", s)
    else:
      raise CheckpointError(
          f"snapshot at step {s} is missing from {run.ckpt.workdir}/snapshots but the run resumed at step {start}; "
          f"pass --fresh to retrain")


class _Dispatch(NamedTuple):  # A NamedTuple: made at every dispatch, and cheap to make.
  """Updates first..last (as logged: 1-based), run by one call of the compiled update, and their metrics."""
  first: int
  last: int
  stacked: dict[str, jax.Array]  # Scalars (one update per call) or one row per update (the first ones filled).

  def metrics(self, step: int) -> dict[str, np.ndarray]:
    """The host values of one update's metrics."""
    return {k: np.reshape(v, -1)[step - self.first] for k, v in jax.device_get(self.stacked).items()}


@dataclasses.dataclass
class _Window:
  """Wall-clock window for images/s and ETA."""
  t0: float
  step0: int


def _check_finite(dispatches: list[_Dispatch], ckpt: checkpoints.RunCheckpoints) -> None:
  """Raise TrainingDiverged, naming the first such update, if any update of these dispatches had a non-finite loss
  or gradient. One device sync for all of them: the loop does not wait for each dispatch."""
  if not dispatches:
    return
  for d, finite in zip(dispatches, jax.device_get([d.stacked["finite"] for d in dispatches])):
    finite = np.reshape(finite, -1)[: d.last - d.first + 1]
    if finite.all():
      continue
    step = d.first + int(np.argmin(finite))
    m = d.metrics(step)
    ckpt.wait()  # Saves in flight (all of good steps) commit first, so the message names what is on disk.
    saved = ckpt.snapshot_steps()
    last = f"step {saved[-1]} ({ckpt.snapshot_path(saved[-1])})" if saved else "none"
    state_step = ckpt.latest_state_step()
    raise TrainingDiverged(
        f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, "
        f"grad_norm={float(m['grad_norm'])}, lr={float(m['lr']):.6g}); last good snapshot: {last}; "
        f"train state kept at step {state_step if state_step is not None else 'none'}")


def _log_progress(run: _Run, step: int, metrics, window: _Window) -> None:
  """A progress line (host 0 only) and TensorBoard scalars: loss, accuracy, lr, images/s, ETA."""
  m = jax.device_get(metrics)
  now = time.time()
  rate = (step - window.step0) / max(now - window.t0, 1e-9)
  eta = (run.plan.total_steps - step) / max(rate, 1e-9)
  batch_size, total = run.config.batch_size, run.plan.total_steps
  if jax.process_index() == 0:
    logging.info("step %d/%d epoch %.2f loss %.4f acc %.3f lr %.5f %.0f img/s ETA %s", step, total,
                 step / run.plan.steps_per_epoch, m["loss"], m["accuracy"], m["lr"], rate * batch_size,
                 f"{int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
  scalars = {"train/loss": float(m["loss"]), "train/accuracy": float(m["accuracy"]), "train/lr": float(m["lr"]),
             "train/images_per_sec": rate * batch_size}
  if "smoothout_a" in m:  # SmoothOut's noise bound a * c(t) at this step.
    scalars["train/smoothout_a"] = float(m["smoothout_a"])
  run.writer.write_scalars(step, scalars)
  window.t0, window.step0 = now, step


def _make_writer(workdir: str):
  """TensorBoard + log lines on host 0; nothing on the other hosts (CLU's logging writer would print there)."""
  from clu import metric_writers
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.create_default_writer(workdir, just_logging=False)


def main(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False,
         hooks: Hooks | None = None) -> TrainResult:
  """Entry point of train.py: train; a divergence becomes one `error:` line and exit code 1."""
  try:
    return train_and_evaluate(config, workdir, fresh=fresh, hooks=hooks)
  except TrainingDiverged as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None
