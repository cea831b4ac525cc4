"""The Trainee of a member run (snapjax/members.py): K members, or SingleCycle's M models, side by side.

One compiled update trains every member, up to steps_per_dispatch loop steps per call; each snapshot saves the K
seed members' variables stacked on a leading member axis (unstacked when K = 1, i.e. a parallel SingleCycle run,
whose workdir then has the sequential run's layout). Its steps are loop steps: every member's update once (equal to
the global step, except in a parallel SingleCycle run, where model c starts at the step the sequential run starts it).
"""
from typing import Any

from absl import logging
import jax
import numpy as np

from snapjax import averaging as averaging_lib, checkpoints, dispatch, ensemble, members as members_lib, scoring
from snapjax import train_step
from snapjax.errors import CheckpointError, ConfigError
from snapjax.train.base import Hooks, PyTree
from snapjax.train.setup import Run


class KMembers:
  """A member run (base.Trainee) over the member plan, mesh and keys of its config."""
  step_unit = "loop step"

  def __init__(self, run: Run, hooks: Hooks):
    s = run.settings
    if not run.exp.spec.in_memory:
      raise ConfigError(f"num_members={s.num_members} needs an in-memory dataset; {s.dataset} is streamed: allowed "
                        f"num_members: 1")
    self.mp = mp = members_lib.make_member_plan(run.config, run.plan, jax.device_count())
    self.mesh = members_lib.member_mesh(mp.groups)
    self.keys = members_lib.member_keys(mp)
    self.run, self.hooks = run, hooks
    self.total_steps, self.snapshot_steps = mp.loop_steps, mp.snapshot_loop_steps()
    self.images_per_step = s.batch_size * mp.size
    # A dispatch never crosses a loop step after which some member starts a new epoch (its data order changes).
    self._epoch_ends = mp.epoch_ends(run.plan.steps_per_epoch)
    sequential_single_cycle = run.settings.method == "single_cycle" and mp.models_per_member == 1
    self._fresh = members_lib.make_fresh(run.exp, run.tx, mp, self.mesh) if sequential_single_cycle else None

  def label(self, j: int) -> str:
    """'member k (seed s)', with the SingleCycle model in a parallel run."""
    mp = self.mp
    model = f", SingleCycle model {mp.models[j]}" if mp.models_per_member > 1 else ""
    return f"member {mp.member_of(j)} (seed {mp.seeds[j]}{model})"

  def who(self, member: int) -> str:
    return f"{self.label(member)} diverged: "

  def global_step(self, member: int, step: int) -> int:
    return self.mp.global_step(member, step)

  def epoch(self, step: int) -> float:
    return step / self.run.plan.steps_per_epoch

  def restore_or_init(self) -> tuple[PyTree, int]:
    """The latest stacked train state of the workdir (its save step is the loop step), or fresh members."""
    run, hooks, mp = self.run, self.hooks, self.mp
    init = members_lib.make_init(run.exp, run.tx, mp, self.mesh)
    start = run.ckpt.latest_state_step()
    if start is None or hooks.on_init is not None:
      state = init(self.keys["init"])
    else:  # Only the restore target: a resumed run does not compile the initialiser.
      state = jax.eval_shape(init, self.keys["init"])
    if hooks.on_init is not None:
      state = hooks.on_init(state)
    if start is not None:
      state = run.ckpt.restore_state(start, checkpoints.abstract_like(state, members_lib.member_sharding(self.mesh)))
      logging.info("Resumed %d members from loop step %d of %d in %s", mp.size, start, mp.loop_steps, run.workdir)
      if hooks.on_state_restored is not None:
        hooks.on_state_restored(start, state)
    start = start or 0
    steps = [int(s) for s in jax.device_get(members_lib.replicate(state["step"], self.mesh))]
    expected = [mp.global_step(j, start) for j in range(mp.size)]
    if steps != expected:
      raise CheckpointError(f"train state at loop step {start} in {run.workdir} holds member steps {steps}, "
                            f"expected {expected}; pass --fresh to retrain")
    self._check_snapshots(start, state)
    return state, start

  def compile_update(self, start: int):
    """The compiled update of every member (members.MemberBatches) around the 1-member step function."""
    del start  # Every member's batches are drawn inside the update from its own step.
    run, hooks = self.run, self.hooks
    smoothout = train_step.make_smoothout(run.config, run.plan)
    num_shards = self.mesh.devices.size

    def make_step(dropout_key):
      step_fn = train_step.make_train_step(run.exp.model, run.tx, run.schedule, dropout_key, smoothout=smoothout,
                                           num_shards=num_shards, averaging=run.averaging, teacher=run.teacher)
      return hooks.wrap_step(step_fn) if hooks.wrap_step else step_fn

    source = members_lib.MemberBatches(run.exp, self.mesh, run.training_arrays(), run.plan, self.mp, self.keys,
                                       run.settings.steps_per_dispatch)
    run.train_arrays = None
    return source.compile(make_step, frozen=run.frozen())

  def dispatch_end(self, done: int, every: tuple[int | None, ...]) -> int:
    return dispatch.dispatch_end(done, self.run.settings.steps_per_dispatch, self.total_steps,
                                 at=self.snapshot_steps + self._epoch_ends, every=every)

  def _snapshot(self, state: PyTree, step: int, js: list[int]) -> tuple[PyTree, dict[str, Any], dict[str, Any] | None]:
    """Variables (stacked over the K seed members when K > 1), metadata and extra items (SWAG's moments) of the
    snapshot at global `step`; for methods swa, ema, swag the averaged networks."""
    mp, averaging = self.mp, self.run.averaging
    extra = None
    if averaging is None:
      variables = members_lib.take({"params": state["params"], "batch_stats": state["batch_stats"]}, js, self.mesh)
    else:
      variables = members_lib.take(averaging_lib.averaged_variables(averaging, state), js, self.mesh)
      # On the data mesh of the BatchNorm batches: from the host copy every process holds (replicated).
      variables = self.run.averaged_snapshot(jax.tree.map(_host, variables), stacked=True)
      if averaging.kind == "swag":
        extra = {"swag": members_lib.take(averaging_lib.swag_moments(state), js, self.mesh)}
    meta = self.run.snapshot_meta(step)
    if mp.num_members > 1:
      meta.update(members=[mp.member_of(j) for j in js], seeds=[mp.seeds[j] for j in js])
    else:
      variables = jax.tree.map(lambda a: a[0], variables)
      extra = None if extra is None else jax.tree.map(lambda a: a[0], extra)
    return variables, meta, extra

  def take_snapshots(self, state: PyTree, i: int) -> list[dict[str, Any]]:
    """Score (if the config says so) and save the snapshots due after loop step i; their scores, per member."""
    run, mp, scores = self.run, self.mp, []
    jax.block_until_ready(state)  # As the one-member trainee's: nothing new compiles beside a gathering all-reduce.
    for step, js in mp.snapshots_at(i).items():
      variables, meta, extra = jax.block_until_ready(self._snapshot(state, step, js))  # Its BatchNorm pass too.
      if run.settings.eval_snapshots:
        stacked = variables if mp.num_members > 1 else ensemble.stack_snapshots([variables])
        s = scoring.score_snapshots(run.exp.apply_fn, stacked, run.exp.test_batches(arrays=run.test_arrays)).members
        for j, sj in zip(js, s):
          scores.append({"member": mp.member_of(j), "step": step, **sj.as_dict()})
          if jax.process_index() == 0:
            logging.info("Snapshot at step %d of %s: test error %.4f, NLL %.4f", step, self.label(j), sj.error, sj.nll)
        errors, nlls = [x.error for x in s], [x.nll for x in s]
        meta.update(test_error=errors if mp.num_members > 1 else errors[0],
                    test_nll=nlls if mp.num_members > 1 else nlls[0])
        run.writer.write_scalars(step, {"snapshot/error": float(np.mean(errors)),
                                        "snapshot/nll": float(np.mean(nlls))})
      if step not in run.ckpt.snapshot_steps():
        run.ckpt.save_snapshot(step, variables, meta, extra=extra)
    return scores

  def _check_snapshots(self, start: int, state: PyTree) -> None:
    """Every snapshot due up to the resumed loop step exists; one due at that very step is re-saved if missing."""
    ckpt = self.run.ckpt
    saved = set(ckpt.snapshot_steps())
    for i in self.snapshot_steps:
      if i > start:
        break
      for step, js in self.mp.snapshots_at(i).items():
        if step in saved:
          continue
        if i != start:
          raise CheckpointError(f"snapshot at step {step} is missing from {ckpt.workdir}/snapshots but the run "
                                f"resumed at loop step {start}; pass --fresh to retrain")
        variables, meta, extra = self._snapshot(state, step, js)
        ckpt.save_snapshot(step, variables, meta, extra=extra)
        logging.warning("Snapshot at step %d was missing; re-saved it from the train state.", step)

  def next_model(self, state: PyTree, i: int) -> PyTree:
    """The sequential SingleCycle hand-over of every member at once (as one_member's, after cycle ends)."""
    snaps = self.run.plan.snapshot_steps
    if self._fresh is None or i not in snaps[:-1]:
      return state
    c = snaps.index(i) + 1
    keys = np.stack([np.asarray(jax.random.fold_in(k, c)) for k in self.keys["init"]])
    state = self._fresh(state, keys)
    if self.hooks.on_init is not None:
      state = self.hooks.on_init(state)
    if jax.process_index() == 0:
      logging.info("SingleCycle: model %d/%d of every member starts at step %d from a fresh init", c + 1,
                   len(snaps), i)
    return state


def _host(a: jax.Array) -> np.ndarray:
  """A replicated array's value, from this process's copy."""
  return np.asarray(a.addressable_data(0))
