"""What the loop and the trainees share: the hooks, the result, the divergence error and the Trainee interface.

A Trainee is what differs between a one-member run and a K-member run (snapjax/train/one_member.py,
snapjax/train/k_members.py): how its train state is laid out, restored and initialised, where its batches come from
and how its update is compiled, which variables its snapshots hold, and how an error names a member. The loop
(snapjax/train/loop.py) counts in the trainee's steps: the global step of a one-member run, the loop step of a
member run (every member's update once).
"""
import dataclasses
from typing import Any, Callable, Protocol

from snapjax import train_step

PyTree = Any


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
  In a member run the states are the stacked members' and steps are loop steps; wrap_step wraps each member's own
  step function.
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


class Update(Protocol):
  """A trainee's compiled update: update(state, done, n) -> (state, metrics) runs n updates after `done` steps.

  metrics: each value holds one update's value (a scalar, or one entry per member) or, when `stacked`, one row per
  update along a leading axis of steps_per_dispatch (the first n rows filled). flops_per_step: XLA's FLOPs of one
  loop step on all devices (every member's update), read when the first call compiles it (train_step.AotUpdate);
  None before, or where XLA reports none.
  """
  steps_per_dispatch: int
  stacked: bool
  flops_per_step: float | None

  def __call__(self, state: PyTree, done: int, n: int) -> tuple[PyTree, dict[str, Any]]:
    ...


class Trainee(Protocol):
  """What the loop trains: the networks of one run and how they are stepped, saved and named.

  total_steps / snapshot_steps: the loop's last step and the steps after which snapshots are due.
  images_per_step: training images one loop step consumes (every member's batch), for images/s.
  step_unit: "step" or "loop step", as messages name the loop's counter.
  """
  total_steps: int
  snapshot_steps: tuple[int, ...]
  images_per_step: int
  step_unit: str

  def restore_or_init(self) -> tuple[PyTree, int]:
    """The latest train state of the workdir (after checking its snapshots) or a fresh one, and its step."""

  def compile_update(self, start: int) -> Update:
    """The compiled update, its batches starting after `start` steps."""

  def dispatch_end(self, done: int, every: tuple[int | None, ...]) -> int:
    """The last step of the next dispatch: never past a snapshot, a multiple of a period in `every`, the end."""

  def take_snapshots(self, state: PyTree, step: int) -> list[dict[str, Any]]:
    """Score (if the config says so) and save the snapshots due after `step`; their scores."""

  def next_model(self, state: PyTree, step: int) -> PyTree:
    """The state that trains after `step` (SingleCycle's fresh model after a cycle end; else `state`)."""

  def who(self, member: int) -> str:
    """How a divergence message starts for this member ("" for a one-member run)."""

  def global_step(self, member: int, step: int) -> int:
    """The member's own update count after `step` loop steps."""

  def epoch(self, step: int) -> float:
    """The epoch reached after `step` steps (progress lines)."""
