"""The training loop of a member run (snapjax/members.py): K members, or SingleCycle's M models, side by side.

The same loop as training._train (log, save, snapshot, preemption, the non-finite check, resume), over a
stacked train state: one compiled update trains every member, and each snapshot saves the K seed members'
variables stacked on a leading member axis (unstacked when K = 1, i.e. a parallel SingleCycle run, whose
workdir then has the sequential run's layout). train_and_evaluate calls `train` when `members.is_member_run`.
A member run dispatches one update of every member per call (`steps_per_dispatch` applies to 1-member runs); each
member's order of the data is computed when its epoch changes (members.MemberBatches.permutations).
"""
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from snapjax import checkpoints, ensemble, members as members_lib, scoring, train_step
from snapjax import training
from snapjax.errors import CheckpointError, ConfigError

PyTree = Any


class _Members:
  """The member plan, mesh, keys and compiled pieces of one run."""

  def __init__(self, run, hooks: training.Hooks):
    if not run.exp.spec.in_memory:
      raise ConfigError(f"num_members={run.config.num_members} needs an in-memory dataset; {run.config.dataset} "
                        f"is streamed: allowed num_members: 1")
    self.mp = members_lib.make_member_plan(run.config, run.plan, jax.device_count())
    self.mesh = members_lib.member_mesh(self.mp.groups)
    self.keys = members_lib.member_keys(self.mp)
    self.run, self.hooks = run, hooks

  def label(self, j: int) -> str:
    """'member k (seed s)', with the SingleCycle model in a parallel run."""
    mp = self.mp
    model = f", SingleCycle model {mp.models[j]}" if mp.models_per_member > 1 else ""
    return f"member {mp.member_of(j)} (seed {mp.seeds[j]}{model})"


def _restore_or_init(m: _Members) -> tuple[PyTree, int]:
  """The latest stacked train state of the workdir (its save step is the loop step), or fresh members."""
  run, hooks = m.run, m.hooks
  state = members_lib.make_init(run.exp, run.tx, m.mp, m.mesh)(m.keys["init"])
  if hooks.on_init is not None:
    state = hooks.on_init(state)
  start = run.ckpt.latest_state_step()
  if start is not None:
    state = run.ckpt.restore_state(start, checkpoints.abstract_like(state))
    logging.info("Resumed %d members from loop step %d of %d in %s", m.mp.size, start, m.mp.loop_steps,
                 run.workdir)
    if hooks.on_state_restored is not None:
      hooks.on_state_restored(start, state)
  start = start or 0
  steps = [int(s) for s in jax.device_get(members_lib.replicate(state["step"], m.mesh))]
  expected = [m.mp.global_step(j, start) for j in range(m.mp.size)]
  if steps != expected:
    raise CheckpointError(f"train state at loop step {start} in {run.workdir} holds member steps {steps}, "
                          f"expected {expected}; pass --fresh to retrain")
  _check_snapshots(m, start, state)
  return state, start


def _snapshot(m: _Members, state: PyTree, step: int, js: list[int]) -> tuple[PyTree, dict[str, Any]]:
  """Variables (stacked over the K seed members when K > 1) and metadata of the snapshot at global `step`."""
  variables = members_lib.take({"params": state["params"], "batch_stats": state["batch_stats"]}, js, m.mesh)
  meta = training._snapshot_meta(m.run, step)
  if m.mp.num_members > 1:
    meta.update(members=[m.mp.member_of(j) for j in js], seeds=[m.mp.seeds[j] for j in js])
  else:
    variables = jax.tree.map(lambda a: a[0], variables)
  return variables, meta


def _take_snapshots(m: _Members, state: PyTree, i: int) -> list[dict[str, Any]]:
  """Score (if the config says so) and save the snapshots due after loop step i; their scores, per member."""
  run, scores = m.run, []
  for step, js in m.mp.snapshots_at(i).items():
    variables, meta = _snapshot(m, state, step, js)
    if run.config.eval_snapshots:
      stacked = variables if m.mp.num_members > 1 else ensemble.stack_snapshots([variables])
      s = scoring.score_snapshots(run.exp.apply_fn, stacked, run.exp.test_batches(arrays=run.test_arrays)).members
      for j, sj in zip(js, s):
        scores.append({"member": m.mp.member_of(j), "step": step, **sj.as_dict()})
        if jax.process_index() == 0:
          logging.info("Snapshot at step %d of %s: test error %.4f, NLL %.4f", step, m.label(j), sj.error, sj.nll)
      errors, nlls = [x.error for x in s], [x.nll for x in s]
      meta.update(test_error=errors if m.mp.num_members > 1 else errors[0],
                  test_nll=nlls if m.mp.num_members > 1 else nlls[0])
      run.writer.write_scalars(step, {"snapshot/error": float(np.mean(errors)), "snapshot/nll": float(np.mean(nlls))})
    if step not in run.ckpt.snapshot_steps():
      run.ckpt.save_snapshot(step, variables, meta)
  return scores


def _check_snapshots(m: _Members, start: int, state: PyTree) -> None:
  """Every snapshot due up to the resumed loop step exists; one due at that very step is re-saved if missing."""
  saved = set(m.run.ckpt.snapshot_steps())
  for i in m.mp.snapshot_loop_steps():
    if i > start:
      break
    for step, js in m.mp.snapshots_at(i).items():
      if step in saved:
        continue
      if i != start:
        raise CheckpointError(f"snapshot at step {step} is missing from {m.run.ckpt.workdir}/snapshots but the run "
                              f"resumed at loop step {start}; pass --fresh to retrain")
      m.run.ckpt.save_snapshot(step, *_snapshot(m, state, step, js))
      logging.warning("Snapshot at step %d was missing; re-saved it from the train state.", step)


def _next_model_fn(m: _Members):
  """(state, i) -> state: the sequential SingleCycle hand-over of every member at once (training._next_model_fn)."""
  run, mp = m.run, m.mp
  if run.config.method != "single_cycle" or mp.models_per_member > 1:
    return lambda state, i: state
  fresh = members_lib.make_fresh(run.exp, run.tx, mp, m.mesh)
  snaps = run.plan.snapshot_steps

  def next_model(state, i):
    if i not in snaps[:-1]:
      return state
    c = snaps.index(i) + 1
    keys = np.stack([np.asarray(jax.random.fold_in(k, c)) for k in m.keys["init"]])
    state = fresh(state, keys)
    if m.hooks.on_init is not None:
      state = m.hooks.on_init(state)
    if jax.process_index() == 0:
      logging.info("SingleCycle: model %d/%d of every member starts at step %d from a fresh init", c + 1,
                   len(snaps), i)
    return state

  return next_model


def _check_finite(m: _Members, pending) -> None:
  """TrainingDiverged naming the first member whose loss or gradient was non-finite at that loop step."""
  i, metrics = pending
  finite = np.asarray(jax.device_get(metrics["finite"]))
  if finite.all():
    return
  j = int(np.argmin(finite))
  got = jax.device_get(metrics)
  ckpt = m.run.ckpt
  ckpt.wait()
  saved = ckpt.snapshot_steps()
  last = f"step {saved[-1]} ({ckpt.snapshot_path(saved[-1])})" if saved else "none"
  state_step = ckpt.latest_state_step()
  raise training.TrainingDiverged(
      f"{m.label(j)} diverged: non-finite loss or gradient at step {m.mp.global_step(j, i)} "
      f"(loss={float(got['loss'][j])}, grad_norm={float(got['grad_norm'][j])}, lr={float(got['lr'][j]):.6g}); "
      f"last good snapshot: {last}; train state kept at loop step {state_step if state_step is not None else 'none'}")


def _log_progress(m: _Members, i: int, metrics, window: training._Window) -> None:
  """A progress line (host 0): the members' mean loss and accuracy, their lr range, images/s of all members."""
  got = jax.device_get(metrics)
  now = time.time()
  rate = (i - window.step0) / max(now - window.t0, 1e-9)
  images = rate * m.run.config.batch_size * m.mp.size
  if jax.process_index() == 0:
    logging.info("loop step %d/%d (%d members) loss %.4f acc %.3f lr %.5f..%.5f %.0f img/s", i, m.mp.loop_steps,
                 m.mp.size, np.mean(got["loss"]), np.mean(got["accuracy"]), np.min(got["lr"]), np.max(got["lr"]),
                 images)
  m.run.writer.write_scalars(i, {"train/loss": float(np.mean(got["loss"])),
                                 "train/accuracy": float(np.mean(got["accuracy"])),
                                 "train/images_per_sec": images})
  window.t0, window.step0 = now, i


def _make_update(m: _Members):
  """The compiled update of every member (members.MemberBatches) around the 1-member step function."""
  run, hooks = m.run, m.hooks
  smoothout = train_step.make_smoothout(run.config, run.plan)
  num_shards = m.mesh.devices.size

  def make_step(dropout_key):
    step_fn = train_step.make_train_step(run.exp.model, run.tx, run.schedule, dropout_key, smoothout=smoothout,
                                         num_shards=num_shards)
    return hooks.wrap_step(step_fn) if hooks.wrap_step else step_fn

  source = members_lib.MemberBatches(run.exp, m.mesh, run.train_arrays, run.plan, m.mp, m.keys)
  run.train_arrays = None
  return source.compile(make_step)


def train(run, preemption, hooks: training.Hooks) -> training.TrainResult:
  """training._train for members: `step` in the result and the saves is the loop step (= the global step,
  except in a parallel SingleCycle run); snapshot_scores carry each member."""
  m = _Members(run, hooks)
  mp, config = m.mp, run.config
  state, start = _restore_or_init(m)
  next_model = _next_model_fn(m)
  state = next_model(state, start)
  update = _make_update(m)
  at, scores, pending = mp.snapshot_loop_steps(), [], None
  window = training._Window(time.time(), start)
  preemption.begin(start)
  for i in range(start + 1, mp.loop_steps + 1):
    state, metrics = update(state, i)
    if pending is not None:
      _check_finite(m, pending)
    pending = (i, metrics)
    snapshot = training.itstime(i, at=at)
    save = training.itstime(i, config.checkpoint_every_steps, mp.loop_steps, at=at)
    log = training.itstime(i, config.log_every_steps, mp.loop_steps)
    if save or log:
      _check_finite(m, pending)
      pending = None
    if log:
      _log_progress(m, i, metrics, window)
    if snapshot:
      scores.extend(_take_snapshots(m, state, i))
    if save:
      training._save_state(run, i, state, hooks)
    if preemption.should_stop(i, i) and i < mp.loop_steps:
      if pending is not None:
        _check_finite(m, pending)
      if not save:
        training._save_state(run, i, state, hooks)
      run.ckpt.wait()
      logging.warning("Preempted: state saved at loop step %d of %d; re-run the same command to resume.", i,
                      mp.loop_steps)
      return training.TrainResult(True, i, list(run.plan.snapshot_steps), scores)
    state = next_model(state, i)
  if pending is not None:
    _check_finite(m, pending)
  run.ckpt.wait()
  return training.TrainResult(False, mp.loop_steps, list(run.plan.snapshot_steps), scores)
