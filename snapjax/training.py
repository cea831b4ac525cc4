"""train.py's logic: `train_and_evaluate(config, workdir)` trains a Snapshot Ensemble and `main` is its entry point.

It trains with the config's cosine cycles, saves and scores a snapshot at the end of each cycle, saves the train
state for resuming, and stops cleanly on a preemption notice. With method="single_cycle" (the paper's SingleCycle
Ensembles baseline) a freshly initialised model takes over after each snapshot; with num_members = K > 1, K
members train side by side. The loop and its pieces are in snapjax/train/ (its docstring lists them); `Hooks` are
explicit injection points for tests and tools.
"""
import ml_collections
from absl import logging

from snapjax.train import loop, setup
from snapjax.train.base import Hooks, TrainingDiverged, TrainResult, itstime
from snapjax.train.k_members import KMembers
from snapjax.train.one_member import OneMember
from snapjax.train.preemption import Preemption

__all__ = ["Hooks", "TrainResult", "TrainingDiverged", "itstime", "main", "train_and_evaluate"]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False,
                       hooks: Hooks | None = None) -> TrainResult:
  """Trains a Snapshot Ensemble in `workdir` (resuming the run there), saving and scoring a snapshot per cycle.

  Every check of the user's input (config, workdir, data) runs before anything is written or compiled; a
  workdir that a live run is writing is refused. A preemption notice (SIGTERM) at any point saves the
  state after the dispatch in flight (config.steps_per_dispatch updates at most) and returns a preempted
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
  with Preemption(hooks) as preemption:
    run = setup.set_up(config, workdir, fresh)
    try:
      trainee = KMembers(run, hooks) if run.settings.is_member_run else OneMember(run, hooks)
      return loop.train(run, trainee, preemption, hooks)
    finally:
      run.close()


def main(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False,
         hooks: Hooks | None = None) -> TrainResult:
  """Entry point of train.py: train; a divergence becomes one `error:` line and exit code 1."""
  try:
    return train_and_evaluate(config, workdir, fresh=fresh, hooks=hooks)
  except TrainingDiverged as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None
