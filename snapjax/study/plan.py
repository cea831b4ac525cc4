"""The study's plan: its arms, seeds and budget, and the steps (training runs, evaluations, the serving
measurement) in order.

A step is a dict: "kind" ("train", "eval" or "serve"), "key" ("train/ARM/sSEED", "eval/ARM/sSEED",
"eval/true_ensemble", "eval/deep_ensemble", "serve/network"), "arm", "seed", "argv" (the command that runs it),
"needs" (the steps it reads, which must be done first) and, for a training run, "workdir", "overrides", "config" and
"plan" (its snapjax.train_step plan); for an evaluation, "workdirs", "out_dir", "analyses" and "options" (eval.py's
--swag_samples and --shift_examples); for the serving measurement, "workdir" and "out_file". `status` says from
the workdirs, read through snapjax's own functions, whether a step is done.

Every evaluation runs ANALYSES (OOD detection and dataset shift) beside eval.py's default uncertainty analyses.
The distill arm's run of seed s is taught by the snapshot arm's run of seed s and comes after it. The deep ensemble
is the single arm's runs of seeds 0..N-1 (N = --deep_ensemble_size, 5 by default: the study's seeds and as many
more single runs as it takes, trained for the deep ensemble only), evaluated once as one ensemble.
"""
import os
from typing import Any

from configs import study_fashion_mnist
from snapjax import checkpoints, config as config_lib, report as report_lib, workdir as workdir_lib
from snapjax.study import serving

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # The checkout.
CONFIG_FILE = "configs/study_fashion_mnist.py"
WEIGHT_AVERAGE_ARM, TRUE_ENSEMBLE_ARM, DEEP_ENSEMBLE_ARM = "snapshot_weight_average", "true_ensemble", "deep_ensemble"
# Eval-side arms: name -> the training arm whose runs they evaluate.
EVAL_ARMS = {WEIGHT_AVERAGE_ARM: "snapshot", TRUE_ENSEMBLE_ARM: "single", DEEP_ENSEMBLE_ARM: "single"}
POOLED_ARMS = (TRUE_ENSEMBLE_ARM, DEEP_ENSEMBLE_ARM)  # One evaluation over several seeds' runs: one number.
DISTILL_ARM = "distill"
DEEP_ENSEMBLE_SIZE = 5  # Ashukha et al.'s reference: independently trained networks, here seeds 0..4.
ANALYSES = ("ood", "shift")  # Every evaluation's --analyses (eval.py: OOD AUROC, error and NLL per shift severity).
SERVE_KEY = "serve/network"
ALL_ARMS = (*study_fashion_mnist.ARMS, *EVAL_ARMS)  # What --arms may name.
LABELS = {
    "snapshot": "Snapshot Ensemble (alpha0 = 0.2)",
    "snapshot_lr0.1": "Snapshot Ensemble (alpha0 = 0.1)",
    "single": "Single model (step schedule)",
    "nocycle": "NoCycle Snapshot Ensemble",
    "single_cycle": "SingleCycle Ensembles",
    "snapshot_smoothout": "Snapshot Ensemble + AdaSmoothOut",
    "fge": "FGE (Fast Geometric Ensembling)",
    "swa": "SWA (Stochastic Weight Averaging)",
    "swag": "SWAG (SWA-Gaussian)",
    DISTILL_ARM: "Distilled student of the Snapshot Ensemble",
    WEIGHT_AVERAGE_ARM: "Weight-averaged snapshots (SE alpha0 = 0.2)",
    TRUE_ENSEMBLE_ARM: "True ensemble of the Single runs",
    DEEP_ENSEMBLE_ARM: "Deep ensemble of independent Single runs",
}
# The pipeline test's budget (--tiny DATA_DIR: tests/helpers.py's 512 generated images): 2 epochs of 16 updates.
TINY_BUDGET = {"train_split": "", "num_epochs": 2.0, "num_cycles": 2, "batch_size": 32, "eval_batch_size": 64,
               "log_every_steps": 8, "checkpoint_every_steps": 8}
# The same 32 updates for the arms whose schedules need more epochs: FGE (8 epochs of 4 updates: 4 of pretraining,
# two 2-epoch cycles, so two snapshots), SWA and SWAG (a collection every 4 updates from epoch 1.5 on, so SWAG has
# several iterates).
TINY_ARM_BUDGET = {"fge": {"num_epochs": 8.0, "batch_size": 128, "fge_pretrain_fraction": 0.5},
                   "swa": {"swa_every_steps": 4}, "swag": {"swa_every_steps": 4}}
# eval.py's options in the real study (its defaults) and on --tiny (2 SWAG samples, 16 images per shift cell).
EVAL_OPTIONS = {"swag_samples": 30, "shift_examples": 1000}
TINY_EVAL_OPTIONS = {"swag_samples": 2, "shift_examples": 16}


def budget_overrides(arm: str, tiny_dir: str | None) -> dict[str, Any]:
  """The --config.<field> overrides of an arm's runs: none for the real study; --tiny's small budget and data."""
  if not tiny_dir:
    return {}
  base = study_fashion_mnist.get_config(arm)
  overrides = {"fashion_mnist_dir": tiny_dir, **TINY_BUDGET}
  if base.schedule != "cosine_cycles":  # The methods fix the other schedules' snapshot counts.
    overrides.pop("num_cycles")
  overrides.update(TINY_ARM_BUDGET.get(arm, {}))
  return overrides


def teacher_workdir(out: str, seed: int) -> str:
  """The workdir of the run that teaches the distill arm's student of `seed`: the snapshot arm's run of that seed."""
  return os.path.join(out, study_fashion_mnist.DISTILL_TEACHER, f"s{seed}")


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


def eval_argv(workdirs: list[str], out_dir: str | None, analyses: list[str],
              options: dict[str, int] | None = None) -> list[str]:
  """eval.py's command line; `options` ({"swag_samples", "shift_examples"}) only where they differ from
  EVAL_OPTIONS (eval.py's defaults), so the real study's commands are the plain ones."""
  argv = ["python", "eval.py", *[a for wd in workdirs for a in ("--workdir", shown(wd))]]
  if out_dir:
    argv += ["--out_dir", shown(out_dir)]
  if analyses:
    argv.append(f"--analyses={','.join(analyses)}")
  argv += [f"--{k}={v}" for k, v in (options or {}).items() if v != EVAL_OPTIONS[k]]
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


def _train_step(out: str, arm: str, seed: int, tiny_dir: str | None,
                needs: list[dict[str, Any]]) -> dict[str, Any]:
  """One arm's training run of one seed; the distill arm's names its teacher, the same seed's snapshot run."""
  from snapjax import train_step
  overrides = budget_overrides(arm, tiny_dir)
  if arm == DISTILL_ARM:
    overrides["teacher_workdirs"] = shown(teacher_workdir(out, seed))
  config = build_config(arm, seed, overrides)
  wd = os.path.join(out, arm, f"s{seed}")
  return {"kind": "train", "key": f"train/{arm}/s{seed}", "arm": arm, "seed": seed, "workdir": wd,
          "overrides": overrides, "config": config, "plan": train_step.make_plan(config, num_train(config)),
          "needs": needs, "argv": train_argv(arm, seed, wd, overrides)}


def _eval_step(key: str, arm: str, seed: int | None, needs: list[dict[str, Any]], out_dir: str | None,
               analyses: list[str], options: dict[str, int]) -> dict[str, Any]:
  """An evaluation of the runs of `needs` (the report in out_dir, or the first run's default eval directory)."""
  wds = [s["workdir"] for s in needs]
  if arm != "swag":  # Only a SWAG run's evaluation samples networks.
    options = {k: v for k, v in options.items() if k != "swag_samples"}
  return {"kind": "eval", "key": key, "arm": arm, "seed": seed, "workdirs": wds,
          "out_dir": out_dir or workdir_lib.eval_dir(wds[0]), "analyses": analyses, "options": dict(options),
          "needs": needs, "argv": eval_argv(wds, out_dir, analyses, options)}


def make_plan(out: str, arms: list[str], seeds: list[int], tiny_dir: str | None,
              deep_ensemble_size: int = DEEP_ENSEMBLE_SIZE) -> list[dict[str, Any]]:
  """The steps in order: for each seed, each training arm's train and eval (distill after its teacher); then the
  deep ensemble's extra single runs, the true and deep ensembles' evals, and the serving measurement, last.

  The deep ensemble's members are the single runs of seeds 0..deep_ensemble_size - 1 (a study seed's own single
  run where the study has it).
  """
  wanted = set(arms) | {EVAL_ARMS[e] for e in arms if e in EVAL_ARMS}
  if DISTILL_ARM in arms:
    wanted.add(study_fashion_mnist.DISTILL_TEACHER)
  train_arms = [a for a in study_fashion_mnist.ARMS if a in wanted]
  options = TINY_EVAL_OPTIONS if tiny_dir else EVAL_OPTIONS
  steps, trains = [], {}
  for seed in seeds:
    for arm in train_arms:
      needs = [trains[(study_fashion_mnist.DISTILL_TEACHER, seed)]] if arm == DISTILL_ARM else []
      for teacher in needs:  # Its student reads its snapshots (snapjax.study.records keeps their arrays).
        teacher["distill_teacher"] = True
      train = trains[(arm, seed)] = _train_step(out, arm, seed, tiny_dir, needs)
      analyses = [*(["weight_average"] if arm == EVAL_ARMS[WEIGHT_AVERAGE_ARM] and WEIGHT_AVERAGE_ARM in arms
                    else []), *ANALYSES]
      steps += [train, _eval_step(f"eval/{arm}/s{seed}", arm, seed, [train], None, analyses, options)]
  single = EVAL_ARMS[DEEP_ENSEMBLE_ARM]
  if DEEP_ENSEMBLE_ARM in arms:
    for seed in range(deep_ensemble_size):
      if (single, seed) not in trains:  # Trained for the deep ensemble only: no evaluation of its own.
        trains[(single, seed)] = _train_step(out, single, seed, tiny_dir, [])
        steps.append(trains[(single, seed)])
  if TRUE_ENSEMBLE_ARM in arms:
    needs = [trains[(single, s)] for s in seeds]
    steps.append(_eval_step(f"eval/{TRUE_ENSEMBLE_ARM}", TRUE_ENSEMBLE_ARM, None, needs,
                            os.path.join(out, TRUE_ENSEMBLE_ARM, "eval"), list(ANALYSES), options))
  if DEEP_ENSEMBLE_ARM in arms:
    needs = [trains[(single, s)] for s in range(deep_ensemble_size)]
    steps.append(_eval_step(f"eval/{DEEP_ENSEMBLE_ARM}", DEEP_ENSEMBLE_ARM, None, needs,
                            os.path.join(out, DEEP_ENSEMBLE_ARM, "eval"), list(ANALYSES), options))
  source = trains.get((study_fashion_mnist.DISTILL_TEACHER, seeds[0])) or trains[(train_arms[0], seeds[0])]
  source["serve_source"] = True  # The run the serving measurement reads (snapjax.study.records keeps its arrays).
  out_file = os.path.join(out, "serving", "serving.json")
  steps.append({"kind": "serve", "key": SERVE_KEY, "arm": None, "seed": None, "workdir": source["workdir"],
                "out_dir": os.path.dirname(out_file), "out_file": out_file, "needs": list(steps),
                "argv": ["python", "-m", "snapjax.study.serving", "--workdir", shown(source["workdir"]), "--out",
                         shown(out_file)]})
  return steps


def check_workdir(step: dict[str, Any]) -> None:
  """A workdir holding a run of another config is an error before anything runs (train.py would refuse it)."""
  saved = workdir_lib.read_config(step["workdir"])
  if saved is not None:
    diff = config_lib.resume_differences(saved, config_lib.to_dict(step["config"]))
    if diff:
      raise SystemExit(f"error: {step['workdir']} holds a run of another config (fields {', '.join(diff)}); "
                       f"use another --out")


def status(step: dict[str, Any], done: set[str] | None = None) -> str:
  """'done', 'resume' (a train run with some progress), 'todo', or 'waiting' (a step whose needs are not done).

  A run is done when its last planned snapshot is saved; an evaluation when its report covers exactly the snapshots
  its runs hold now, with every analysis it asks for; the serving measurement when its file measured the run as it
  is now. `done`: keys already known to be done (a scheduler's), not read again.
  """
  if done is not None and step["key"] in done:
    return "done"
  if step["kind"] == "train":
    # Its last snapshot (FGE's is at its last cycle's midpoint, before the budget's end: what follows is unused).
    if step["plan"].snapshot_steps[-1] in checkpoints.saved_snapshot_steps(step["workdir"]):
      return "done"
    if workdir_lib.read_config(step["workdir"]) is not None:
      return "resume"
    return "waiting" if any(status(t, done) != "done" for t in step["needs"]) else "todo"
  if any(status(t, done) != "done" for t in step["needs"]):
    return "waiting"
  if step["kind"] == "serve":
    return "done" if serving.is_fresh(step["out_file"], step["workdir"]) else "todo"
  rep = report_lib.read_report(step["out_dir"])
  if rep is None:
    return "todo"
  # A SWAG run's snapshot is scored as several posterior samples: one (workdir, step) entry each.
  have = list(dict.fromkeys((abs_path(s["workdir"]), s["step"]) for s in rep.get("snapshots", [])))
  want = [(wd, st) for wd in step["workdirs"] for st in checkpoints.saved_snapshot_steps(wd)]
  fresh = [abs_path(w) for w in rep.get("workdirs", [])] == step["workdirs"] and have == want
  return "done" if fresh and all(a in rep for a in step["analyses"]) else "todo"

