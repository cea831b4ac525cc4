"""Score a run's snapshots and their last-m ensembles on the test split (the logic of eval.py)."""
import dataclasses
import os
from typing import Any

import jax
import ml_collections

from snapjax import checkpoints, ensemble, experiment, report as report_lib, scoring, workdir as workdir_lib
from snapjax import config as config_lib
from snapjax.errors import CheckpointError, ConfigError


@dataclasses.dataclass
class Member:
  workdir: str
  step: int
  variables: Any


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with; CheckpointError if it is not a snapjax run."""
  workdir_lib.check_path(workdir)
  saved = workdir_lib.read_config(workdir)
  if saved is None:
    raise CheckpointError(f"{workdir!r} is not a snapjax run: {os.path.join(workdir, workdir_lib.CONFIG_FILE)} "
                          f"does not exist; pass the --workdir of a train.py run")
  return ml_collections.ConfigDict(saved)


def check_compatible(configs: list[ml_collections.ConfigDict], workdirs: list[str]) -> None:
  """All runs share the architecture and the dataset (class count), or a one-line CheckpointError."""
  from snapjax import data
  for cfg, wd in zip(configs[1:], workdirs[1:]):
    diff = config_lib.ensemble_differences(configs[0], cfg)
    if diff:
      shown = ", ".join(f"{k}: {configs[0].get(k)!r} vs {cfg.get(k)!r}" for k in diff)
      if "dataset" in diff:
        classes = [data.DATASETS[c.dataset].num_classes if c.dataset in data.DATASETS else "?"
                   for c in (configs[0], cfg)]
        shown += f" ({classes[0]} vs {classes[1]} classes)"
      raise CheckpointError(f"runs {workdirs[0]!r} and {wd!r} cannot be ensembled together ({shown})")


def restore_members(workdirs: list[str], exp: experiment.Experiment) -> list[Member]:
  """Every snapshot of every run, in the order given and, within a run, in training order."""
  abstract = exp.abstract_variables()
  members = []
  for wd in workdirs:
    ckpt = checkpoints.RunCheckpoints(wd, read_only=True)
    try:
      steps = ckpt.snapshot_steps()
      if not steps:
        raise CheckpointError(f"no snapshots in workdir {wd!r} ({os.path.join(wd, checkpoints.SNAPSHOT_DIR)} "
                              f"is empty): train first")
      for step in steps:
        variables, _ = ckpt.restore_snapshot(step, abstract)
        members.append(Member(wd, step, variables))
    finally:
      ckpt.close()
  return members


def _count_snapshots(workdirs: list[str]) -> int:
  num = 0
  for wd in workdirs:
    ckpt = checkpoints.RunCheckpoints(wd, read_only=True)
    num += len(ckpt.snapshot_steps())
    ckpt.close()
  return num


def evaluate_runs(workdirs: list[str], *, last_m: int | None = None, out_dir: str | None = None,
                  data_overrides: dict[str, str] | None = None, eval_batch_size: int | None = None,
                  plot: bool = True) -> dict[str, Any]:
  """Scores each snapshot of the runs and every last-m ensemble; writes report.json, report.md and a plot.

  Every check of the input (runs, last_m, test data) runs before anything is restored or compiled.

  Args:
    workdirs: one or more train.py workdirs; the snapshots of several runs (same model and dataset) are
      ensembled in the order given.
    last_m: the headline ensemble's size, the last m snapshots (default: all).
    out_dir: where the report goes (default: WORKDIR/eval of the first run).
    data_overrides: {"data_dir" | "fashion_mnist_dir" | "tiny_imagenet_dir": path} to read the test data
      from elsewhere than the run's config says.
    eval_batch_size: global test batch size (default: the run's config).
    plot: also write error_vs_m.png.

  Returns:
    The report: "snapshots" (each one's workdir, step, error, nll, count), "ensembles" (each last-m), the
    headline "ensemble" and "num_test_examples".

  Raises:
    snapjax.errors.UserError: not a run, incompatible runs, no or corrupt snapshots, bad last_m, missing data.

  Example:
    >>> report = evaluate_runs(["runs/quickstart"], last_m=3)  # doctest: +SKIP
    >>> report["ensemble"]["error"]  # doctest: +SKIP
  """
  if not workdirs:
    raise ConfigError("--workdir is required (give it several times to ensemble several runs)")
  if eval_batch_size is not None and (isinstance(eval_batch_size, bool) or eval_batch_size < 1):
    raise ConfigError(f"eval_batch_size={eval_batch_size!r}; allowed: an integer >= 1 (or unset: the run's own)")
  if out_dir is not None:
    workdir_lib.check_path(out_dir, "--out_dir")
  configs = [load_run_config(wd) for wd in workdirs]
  check_compatible(configs, workdirs)
  config = configs[0]
  for k, v in (data_overrides or {}).items():
    if v:
      config[k] = v
  exp = experiment.build(config)

  # Cheap checks first: snapshot lists and last_m, then the test data, before restoring or compiling anything.
  num_snaps = _count_snapshots(workdirs)
  if last_m is not None and (isinstance(last_m, bool) or not 1 <= last_m <= max(num_snaps, 1)):
    raise ConfigError(f"last_m={last_m} is out of range; allowed: 1..{num_snaps} (the number of snapshots)")
  test_arrays = exp.load_test_data()
  members = restore_members(workdirs, exp)
  num = len(members)
  last_m = last_m or num
  steps = [(m.workdir, m.step) for m in members]
  stacked = ensemble.stack_snapshots([m.variables for m in members])
  del members[:]  # Only the stack is kept in device memory.

  scores = scoring.score_snapshots(exp.apply_fn, stacked, exp.test_batches(eval_batch_size, test_arrays))
  headline = scores.ensemble if last_m == num else scores.last_m[last_m - 1]
  report = {
      "dataset": config.dataset, "model": config.model, "workdirs": list(workdirs),
      "num_test_examples": headline.count,
      "snapshots": [{"workdir": wd, "step": st, **s.as_dict()} for (wd, st), s in zip(steps, scores.members)],
      "ensembles": [{"m": i + 1, **s.as_dict()} for i, s in enumerate(scores.last_m)],
      "ensemble": {"m": last_m, **headline.as_dict()},
  }
  if jax.process_index() == 0:
    report_lib.write_report(report, out_dir or os.path.join(workdirs[0], "eval"), plot=plot)
  return report
