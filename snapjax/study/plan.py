"""The study's plan: its arms, seeds and budget, and the steps (training runs and evaluations) in order.

A step is a dict: "kind" ("train" or "eval"), "key" ("train/ARM/sSEED", "eval/ARM/sSEED", "eval/true_ensemble"),
"arm", "seed", "argv" (the command that runs it) and, for a training run, "workdir", "overrides", "config" and
"plan" (its snapjax.train_step plan); for an evaluation, "workdirs", "out_dir", "analyses" and "needs" (the
training steps it reads). `status` says from the workdirs, read through snapjax's own functions, whether a step is
done.
"""
import os
from typing import Any

from configs import study_fashion_mnist
from snapjax import checkpoints, config as config_lib, report as report_lib, workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The checkout.
CONFIG_FILE = "configs/study_fashion_mnist.py"
WEIGHT_AVERAGE_ARM, TRUE_ENSEMBLE_ARM = "snapshot_weight_average", "true_ensemble"
# Eval-side arms: name -> the training arm whose runs they evaluate.
EVAL_ARMS = {WEIGHT_AVERAGE_ARM: "snapshot", TRUE_ENSEMBLE_ARM: "single"}
ALL_ARMS = (*study_fashion_mnist.ARMS, *EVAL_ARMS)  # What --arms may name.
LABELS = {
    "snapshot": "Snapshot Ensemble (alpha0 = 0.2)",
    "snapshot_lr0.1": "Snapshot Ensemble (alpha0 = 0.1)",
    "single": "Single model (step schedule)",
    "nocycle": "NoCycle Snapshot Ensemble",
    "single_cycle": "SingleCycle Ensembles",
    "snapshot_smoothout": "Snapshot Ensemble + AdaSmoothOut",
    WEIGHT_AVERAGE_ARM: "Weight-averaged snapshots (SE alpha0 = 0.2)",
    TRUE_ENSEMBLE_ARM: "True ensemble of the Single runs",
}
# The pipeline test's budget (--tiny DATA_DIR: tests/helpers.py's 512 generated images): 2 epochs of 16 updates.
TINY_BUDGET = {"train_split": "", "num_epochs": 2.0, "num_cycles": 2, "batch_size": 32, "eval_batch_size": 64,
               "log_every_steps": 8, "checkpoint_every_steps": 8}


def budget_overrides(arm: str, tiny_dir: str | None) -> dict[str, Any]:
  """The --config.<field> overrides of an arm's runs: none for the real study; --tiny's small budget and data."""
  if not tiny_dir:
    return {}
  base = study_fashion_mnist.get_config(arm)
  overrides = {"fashion_mnist_dir": tiny_dir, **TINY_BUDGET}
  if base.schedule == "step":  # The methods fix the single model's and NoCycle's snapshot counts.
    overrides.pop("num_cycles")
  return overrides


def build_config(arm: str, seed: int, overrides: dict[str, Any]):
  """The ConfigDict train.py builds from the arm's command line (train_argv)."""
  c = study_fashion_mnist.get_config(arm)
  c.seed = seed
  for k, v in overrides.items():
    c[k] = v
  return c


def abs_path(path: str) -> str:
  """A path as the plan holds it: absolute (relative paths are relative to the repository root, where the
  subprocesses run)."""
  return os.path.normpath(os.path.join(ROOT, path))


def shown(path: str) -> str:
  """A path as the commands show it: relative to the repository root when it lies inside."""
  rel = os.path.relpath(path, ROOT)
  return path if rel.startswith("..") else rel


def train_argv(arm: str, seed: int, workdir: str, overrides: dict[str, Any]) -> list[str]:
  return ["python", "train.py", "--config", f"{CONFIG_FILE}:{arm}", "--workdir", shown(workdir),
          f"--config.seed={seed}", *[f"--config.{k}={v}" for k, v in overrides.items()]]


def eval_argv(workdirs: list[str], out_dir: str | None, analyses: list[str]) -> list[str]:
  argv = ["python", "eval.py", *[a for wd in workdirs for a in ("--workdir", shown(wd))]]
  if out_dir:
    argv += ["--out_dir", shown(out_dir)]
  if analyses:
    argv.append(f"--analyses={','.join(analyses)}")
  return argv


_NUM_TRAIN: dict[tuple[str, str], int] = {}


def num_train(config) -> int:
  """Training set size of a config (read once per data directory and split)."""
  key = (config.fashion_mnist_dir, config.train_split)
  if key not in _NUM_TRAIN:
    from snapjax import experiment
    exp = experiment.build(config)
    _NUM_TRAIN[key] = len(exp.load_split(config.train_split or exp.spec.train_split)[1])
  return _NUM_TRAIN[key]


def _train_steps(out: str, arm: str, seed: int, tiny_dir: str | None, analyses: list[str]) -> list[dict[str, Any]]:
  """One arm's run of one seed and its evaluation (the report in the workdir's default eval directory)."""
  from snapjax import train_step
  overrides = budget_overrides(arm, tiny_dir)
  config = build_config(arm, seed, overrides)
  wd = os.path.join(out, arm, f"s{seed}")
  train = {"kind": "train", "key": f"train/{arm}/s{seed}", "arm": arm, "seed": seed, "workdir": wd,
           "overrides": overrides, "config": config, "plan": train_step.make_plan(config, num_train(config)),
           "argv": train_argv(arm, seed, wd, overrides)}
  return [train, {"kind": "eval", "key": f"eval/{arm}/s{seed}", "arm": arm, "seed": seed, "workdirs": [wd],
                  "out_dir": workdir_lib.eval_dir(wd), "analyses": analyses, "needs": [train],
                  "argv": eval_argv([wd], None, analyses)}]


def make_plan(out: str, arms: list[str], seeds: list[int], tiny_dir: str | None) -> list[dict[str, Any]]:
  """The steps in order: for each seed, each training arm's train and eval; then the true ensemble's eval."""
  train_arms = [a for a in study_fashion_mnist.ARMS if a in arms or any(EVAL_ARMS.get(e) == a for e in arms)]
  steps = []
  for seed in seeds:
    for arm in train_arms:
      analyses = ["weight_average"] if arm == EVAL_ARMS[WEIGHT_AVERAGE_ARM] and WEIGHT_AVERAGE_ARM in arms else []
      steps += _train_steps(out, arm, seed, tiny_dir, analyses)
  if TRUE_ENSEMBLE_ARM in arms:
    needs = [s for s in steps if s["kind"] == "train" and s["arm"] == EVAL_ARMS[TRUE_ENSEMBLE_ARM]]
    wds = [s["workdir"] for s in needs]
    od = os.path.join(out, TRUE_ENSEMBLE_ARM, "eval")
    steps.append({"kind": "eval", "key": f"eval/{TRUE_ENSEMBLE_ARM}", "arm": TRUE_ENSEMBLE_ARM, "seed": None,
                  "workdirs": wds, "out_dir": od, "analyses": [], "needs": needs, "argv": eval_argv(wds, od, [])})
  return steps


def check_workdir(step: dict[str, Any]) -> None:
  """A workdir holding a run of another config is an error before anything runs (train.py would refuse it)."""
  saved = workdir_lib.read_config(step["workdir"])
  if saved is not None:
    diff = config_lib.resume_differences(saved, config_lib.to_dict(step["config"]))
    if diff:
      raise SystemExit(f"error: {step['workdir']} holds a run of another config (fields {', '.join(diff)}); "
                       f"use another --out")


def status(step: dict[str, Any]) -> str:
  """'done', 'resume' (a train run with some progress), 'todo', or 'waiting' (an eval whose runs are not done).

  A run is done when its last snapshot is saved; an evaluation when its report covers exactly the snapshots its
  runs hold now, with every analysis it asks for.
  """
  if step["kind"] == "train":
    if step["plan"].total_steps in checkpoints.saved_snapshot_steps(step["workdir"]):
      return "done"
    return "resume" if workdir_lib.read_config(step["workdir"]) is not None else "todo"
  if not all(status(t) == "done" for t in step["needs"]):
    return "waiting"
  rep = report_lib.read_report(step["out_dir"])
  if rep is None:
    return "todo"
  have = [(abs_path(s["workdir"]), s["step"]) for s in rep.get("snapshots", [])]
  want = [(wd, st) for wd in step["workdirs"] for st in checkpoints.saved_snapshot_steps(wd)]
  fresh = [abs_path(w) for w in rep.get("workdirs", [])] == step["workdirs"] and have == want
  return "done" if fresh and all(a in rep for a in step["analyses"]) else "todo"

