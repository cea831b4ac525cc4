"""The Trainee of a one-member run: one network (or SingleCycle's models one after another), replicated on the mesh.

Its steps are global steps; its batches come from the in-memory split on the devices (up to steps_per_dispatch
updates per call) or from a host stream (ImageNet, one update per call) (snapjax/train_step.py).
"""
import functools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

from snapjax import averaging as averaging_lib, checkpoints, data, dispatch, ensemble, scoring, train_step
from snapjax.errors import CheckpointError
from snapjax.train.base import Hooks, PyTree
from snapjax.train.setup import Run


class OneMember:
  """A one-member run (base.Trainee): its steps are the network's global steps."""
  step_unit = "step"

  def __init__(self, run: Run, hooks: Hooks):
    self.run, self.hooks = run, hooks
    self.total_steps, self.snapshot_steps = run.plan.total_steps, run.plan.snapshot_steps
    self.images_per_step = run.settings.batch_size
    self.init_key, self._data_key, self._aug_key, self._dropout_key = jax.random.split(
        jax.random.PRNGKey(run.settings.seed), 4)
    self._period, self._steps_per_dispatch = None, 1  # The batch source's, once compiled.
    self._next_model = _next_model_fn(run, self.init_key, hooks)

  def restore_or_init(self) -> tuple[PyTree, int]:
    run, hooks = self.run, self.hooks
    replicated = run.exp.replicated
    init = jax.jit(functools.partial(train_step.init_state, run.exp, run.tx), out_shardings=replicated)
    start = run.ckpt.latest_state_step()
    if start is None or hooks.on_init is not None:
      state = init(self.init_key)
    else:  # Only the restore target: a resumed run does not compile the initialiser (seconds: its RNG code).
      state = jax.eval_shape(init, self.init_key)
    if hooks.on_init is not None:
      state = hooks.on_init(state)
    if start is not None:
      state = run.ckpt.restore_state(start, checkpoints.abstract_like(state, replicated))
      logging.info("Resumed from step %d of %d in %s", start, self.total_steps, run.workdir)
      if hooks.on_state_restored is not None:
        hooks.on_state_restored(start, state)
    start = int(jax.device_get(state["step"]))
    self._check_snapshots(start, state)
    return state, start

  def compile_update(self, start: int) -> train_step.AotUpdate:
    run = self.run
    step_fn = train_step.make_train_step(run.exp.model, run.tx, run.schedule, self._dropout_key,
                                         smoothout=train_step.make_smoothout(run.config, run.plan),
                                         num_shards=run.exp.mesh.devices.size, averaging=run.averaging,
                                         teacher=run.teacher)
    source = self._batch_source(start)
    self._period, self._steps_per_dispatch = source.period, source.steps_per_dispatch
    return source.compile(self.hooks.wrap_step(step_fn) if self.hooks.wrap_step else step_fn, frozen=run.frozen())

  def _batch_source(self, start: int) -> train_step.BatchSource:
    run, s = self.run, self.run.settings
    if run.exp.spec.in_memory:
      source = train_step.InMemoryBatches(run.exp, run.training_arrays(), run.plan, self._data_key, self._aug_key,
                                          s.steps_per_dispatch)
      run.train_arrays = None  # Only the device copy is kept.
      return source
    if s.steps_per_dispatch > 1:
      logging.info("steps_per_dispatch=%d: a streamed dataset runs one update per dispatch", s.steps_per_dispatch)
    # A resumed stream is reseeded from (seed, resume step): it does not replay the batches already seen, but
    # (unlike the in-memory path) its order is not the one an uninterrupted run would have had.
    seed = s.seed if start == 0 else data.derive_seed(s.seed, start)
    return train_step.StreamedBatches(run.exp.train_stream(s.train_split, seed), run.exp)

  def dispatch_end(self, done: int, every: tuple[int | None, ...]) -> int:
    return dispatch.dispatch_end(done, self._steps_per_dispatch, self.total_steps, at=self.snapshot_steps,
                                 every=(*every, self._period))

  def take_snapshots(self, state: PyTree, step: int) -> list[dict[str, Any]]:
    """Score the snapshot of this step (if the config says so) and save it with its score in its metadata."""
    run = self.run
    # The dispatched updates, and the averaged network's BatchNorm pass (SWA, SWAG), finish first: new programs (the
    # snapshot's eager ops, its scoring) are compiled and run on an idle XLA:CPU thread pool, never beside a program
    # whose cross-device all-reduce is still gathering.
    jax.block_until_ready(state)
    variables, extra = jax.block_until_ready(self._snapshot_variables(state))
    meta = run.snapshot_meta(step)
    scores = []
    if run.settings.eval_snapshots:  # Scored before its save starts, so the score lands in its metadata.
      s = scoring.score_snapshots(run.exp.apply_fn, ensemble.stack_snapshots([variables]),
                                  run.exp.test_batches(arrays=run.test_arrays)).members[0]
      scores.append({"step": step, **s.as_dict()})
      meta.update(test_error=s.error, test_nll=s.nll)
      if jax.process_index() == 0:
        logging.info("Snapshot %d/%d at step %d: test error %.4f, NLL %.4f", meta["cycle"], len(self.snapshot_steps),
                     step, s.error, s.nll)
      run.writer.write_scalars(step, {"snapshot/error": s.error, "snapshot/nll": s.nll})
    if step not in run.ckpt.snapshot_steps():
      run.ckpt.save_snapshot(step, variables, meta, extra=extra)
    return scores

  def _snapshot_variables(self, state: PyTree) -> tuple[PyTree, dict[str, PyTree] | None]:
    """A snapshot's variables (the averaged network's for methods swa, ema, swag) and extra items (SWAG's moments)."""
    averaging = self.run.averaging
    if averaging is None:
      return snapshot_variables(state), None
    variables = self.run.averaged_snapshot(averaging_lib.averaged_variables(averaging, state))
    return variables, {"swag": averaging_lib.swag_moments(state)} if averaging.kind == "swag" else None

  def next_model(self, state: PyTree, step: int) -> PyTree:
    return self._next_model(state, step)

  def who(self, member: int) -> str:
    return ""

  def global_step(self, member: int, step: int) -> int:
    return step

  def epoch(self, step: int) -> float:
    return step / self.run.plan.steps_per_epoch

  def _check_snapshots(self, start: int, state: PyTree) -> None:
    """Every snapshot up to the resumed step exists; the one at the resumed step is re-saved if its save was cut."""
    run = self.run
    saved = set(run.ckpt.snapshot_steps())
    for s in self.snapshot_steps:
      if s > start or s in saved:
        continue
      if s == start:  # Killed after the state save committed but before the snapshot's: the state has it.
        variables, extra = self._snapshot_variables(state)
        run.ckpt.save_snapshot(s, variables, run.snapshot_meta(s), extra=extra)
        logging.warning("Snapshot at step %d was missing; re-saved it from the train state.", s)
      else:
        raise CheckpointError(
            f"snapshot at step {s} is missing from {run.ckpt.workdir}/snapshots but the run resumed at step {start}; "
            f"pass --fresh to retrain")


def snapshot_variables(state: PyTree) -> PyTree:
  """The variables a snapshot of a train state holds: params and BatchNorm statistics."""
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


def _next_model_fn(run: Run, init_key: jax.Array, hooks: Hooks):
  """(state, step) -> state: SingleCycle Ensembles' hand-over from model k to model k + 1 at the end of cycle k.

  Called after the snapshot at `step` and its train-state save (a state saved at a cycle end holds the model
  that ended there), and on resuming at such a step. At the end of cycle k (1-based) before the last, params,
  batch_stats and the optimiser state (momentum) become those of model k (0-based), a fresh init keyed by
  fold_in(init_key, k); model 0 is the Snapshot Ensemble's own init (init_key). The step and the optimiser's
  integer update counts go on, so the data order, the dropout rng and the schedule continue as in a Snapshot
  Ensemble of the same seed. Anywhere else, and for method="snapshot", the state is returned as it is.
  """
  snapshot_steps = run.plan.snapshot_steps
  if run.settings.method != "single_cycle":
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
