"""The study's results: the finished evaluations' reports read into the dict the page is written from.

`collect_results` reads each eval step's report (snapjax.report.read_report) once the step is done, with the
budget, the figure run, the state file's wall times and the commands; `snapjax.study.page.write_results` writes it.
"""
import argparse
import math
import os
import platform
import shlex
from typing import Any

import numpy as np

from configs import study_fashion_mnist
from snapjax import report as report_lib
from snapjax.study import plan, runner
from snapjax.study.plan import EVAL_ARMS, LABELS, TRUE_ENSEMBLE_ARM, WEIGHT_AVERAGE_ARM

# Where the budget came from; shown on the real study's page (not on --tiny runs).
BUDGET_NOTE = """\
The budget is derived from the quickstart's measured cost, not tuned on results. The quickstart
(configs/quickstart.py: ResNet-8, 10,000 images, no augmentation, 30 epochs, M = 5, batch 128) took 3 min 25 s per
run on this project's 2-core CPU at about 1,850 training images/s, and its 6-epoch cycles converge (README); on
full-data budgets of a few epochs per cycle the snapshots kept improving from cycle to cycle, the regime where the
paper's ensemble does not pay off. 2 hours for 18 runs and their evaluations leave about 6-7 min per run: about
twice the quickstart's 300,000 training images. Of the two ways to spend them (60 epochs on the same 10,000 images,
or 30 epochs on 20,000), the study takes 20,000 images and keeps the quickstart's 6 epochs per cycle: each cycle has
twice the quickstart's updates (936), more data makes the baselines less of an overfitting contest, and a pilot of
one such cycle (below) measured where a cycle ends. Every arm trains on exactly this budget (4,680 updates); the
SmoothOut arm's steps cost a little more (one noise draw per step).
"""
# The pilot run that checked the budget (by hand, before the study; see BUDGET_NOTE).
PILOT_NOTE = """\
one cycle of this budget, the first cycle of the alpha0 = 0.2 Snapshot Ensemble (936 updates; the same config as
`python train.py --config configs/study_fashion_mnist.py:snapshot --config.num_epochs=6 --config.num_cycles=1`), on
this machine while three other engineers shared its 2 cores (load average 6-9): 10 min 46 s of wall time with
start-up and compilation, 130-350 training images/s against the quickstart's 1,850 on a quiet machine. Its snapshot:
test error 9.85%, NLL 0.272 (the quickstart's whole 30-epoch ensemble: 10.55%); on its 20,000 training images, error
6.4%, NLL 0.183. ResNet-8 (75K parameters) does not fit 20,000 images to zero training error in 6 epochs: a cycle
ends, with the learning rate annealed to 0, in a minimum with a real generalisation gap. Whether later cycles still
improve is what the section "Did each cycle converge?" reports from the study's own snapshots. Projection for a
quiet machine: 599,040 training images per run at 1,850 img/s is 5.4 min, plus about 1 min of start-up, compilation,
snapshot scoring and evaluation, so about 6.5 min per run and 2 hours for the 18 runs, the weight averages and the
true ensemble; at the pilot's shared-machine rate it would take 5-14x longer. In the study itself, one run alone
trained at about 1,100 img/s on the quiet machine (1,850 was the quickstart's rate on a faster machine of the same
kind; such machines differ up to eightfold) and kept only about 1.3 of its 2 cores busy, so the study ran two runs at
a time (`--jobs 2`: about 870 img/s each, 1,730 together). Runs that share the machine take longer each, so the
per-arm minutes below are those of a machine shared by two runs (and, for some, by other work: see the load
averages in the JSON).
"""


def _read_report(step: dict[str, Any] | None) -> dict[str, Any] | None:
  """The report of an eval step that is done (None for a missing step, one not done, or no report)."""
  return report_lib.read_report(step["out_dir"]) if step and plan.status(step) == "done" else None


def _metrics(report: dict[str, Any]) -> dict[str, Any]:
  m = report["ensemble"]["m"]
  return {"error": report["ensemble"]["error"], "nll": report["ensemble"]["nll"],
          "ece": report["calibration"]["ensembles"][m - 1]["ece"], "last_error": report["snapshots"][-1]["error"],
          "num_snapshots": len(report["snapshots"]), "snapshot_errors": [s["error"] for s in report["snapshots"]]}


def _arm_entry(arm: str, evals: dict[str, dict[str, Any]], seeds: list[int]) -> tuple[dict[str, Any], int | None]:
  """An arm's label, cost and per-seed metrics (the true ensemble: one pooled entry); and the test set size."""
  entry, num_test = {"label": LABELS[arm], "cost": "3x" if arm == TRUE_ENSEMBLE_ARM else "1x", "runs": {}}, None
  if arm == TRUE_ENSEMBLE_ARM:
    step = evals.get(f"eval/{TRUE_ENSEMBLE_ARM}")
    rep = _read_report(step)
    entry.update(pooled=True, pooled_seeds=list(seeds), workdirs=step["workdirs"] if step else [])
    if rep:
      entry["runs"]["pooled"] = {**_metrics(rep), "last_error": None}
      num_test = rep["num_test_examples"]
    return entry, num_test
  for seed in seeds:
    step = evals.get(f"eval/{EVAL_ARMS.get(arm, arm)}/s{seed}")
    rep = _read_report(step)
    if rep is None:
      continue
    num_test = num_test or rep["num_test_examples"]
    if arm == WEIGHT_AVERAGE_ARM:
      if not rep.get("weight_average"):
        continue
      wa = rep["weight_average"][-1]  # All M snapshots' weights averaged.
      entry["runs"][str(seed)] = {"error": wa["error"], "nll": wa["nll"], "ece": wa["ece"], "last_error": None,
                                  "m": wa["m"], "workdir": plan.shown(step["workdirs"][0])}
    else:
      entry["runs"][str(seed)] = {**_metrics(rep), "workdir": plan.shown(step["workdirs"][0])}
  return entry, num_test


def collect_results(args: argparse.Namespace, steps: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
  """The results dict of `write_results`: every finished eval's numbers, the budget, the wall time, the commands.

  args: the CLI's (out, seeds, tiny, command)."""
  results = {"title": "Snapshot Ensembles on Fashion-MNIST: the paper's comparison at CPU scale", "arms": {},
             "seeds": list(args.seeds), "tiny": bool(args.tiny), "generated": runner.now(),
             "command": args.command, "machine": _machine()}
  evals = {s["key"]: s for s in steps if s["kind"] == "eval"}
  train_arms = [s["arm"] for s in steps if s["kind"] == "train" and s["seed"] == args.seeds[0]]
  num_test = None
  for arm in [a for a in LABELS if a in train_arms or a in arms]:
    results["arms"][arm], n = _arm_entry(arm, evals, args.seeds)
    num_test = num_test or n
  results["num_test_examples"] = num_test
  results["budget"] = _budget(steps, args.seeds[0])
  results["figure_run"] = _figure_run(evals, args.seeds)
  results["wall_time"] = _wall_time(runner.read_state(args.out))
  results["commands"] = [shlex.join(s["argv"]) for s in steps]
  results["example_commands"] = [shlex.join(s["argv"]) for s in steps if s["seed"] == args.seeds[0]] + [
      shlex.join(s["argv"]) for s in steps if s["seed"] is None]
  results["config_file"] = plan.CONFIG_FILE
  if not args.tiny:
    results["budget_note"], results["pilot_note"] = BUDGET_NOTE, PILOT_NOTE
  results["smoothout_note"] = _smoothout_note(study_fashion_mnist.SMOOTHOUT)
  return results


def _wall_time(state: dict[str, Any]) -> dict[str, Any]:
  """The whole study's wall time and each step's, from the state file."""
  return {
      "seconds": sum(i["seconds"] for i in state["invocations"]), "invocations": len(state["invocations"]),
      "train_runs": sum(k.startswith("train/") for k in state["steps"]),
      "evals": sum(k.startswith("eval/") for k in state["steps"]),
      "load_average_at_start": [i.get("load_average") for i in state["invocations"]],
      "jobs": max([i.get("jobs", 1) for i in state["invocations"]] or [1]),
      "steps": {k: v["seconds"] for k, v in state["steps"].items()},
      "note": "The machine may have been shared: the load averages at each invocation's start are in the JSON."}


def _smoothout_note(so: dict[str, Any]) -> str:
  return (
      f"AdaSmoothOut (Wen et al. 2018; the authors' --adapt-type filter): noise bound a = {so['smoothout_a']:g} "
      f"({so['smoothout_schedule']} over training), noise `{so['smoothout_noise']}` (per filter, uniform noise of "
      f"norm a x the filter's weight norm), K = {so['smoothout_chunks']} (one fresh perturbation per batch: the "
      f"stochastic SmoothOut), on top of the alpha0 = 0.2 Snapshot Ensemble. The paper's adaptive variant with a "
      f"small bound; not tuned here.")


def _budget(steps: list[dict[str, Any]], seed: int) -> dict[str, Any]:
  train = [s for s in steps if s["kind"] == "train" and s["seed"] == seed]
  if not train:
    return {"arms": {}, "model": "n/a", "dataset": "n/a", "train_split": "", "num_train": 0, "augment": "",
            "num_epochs": 0, "total_steps": 0, "batch_size": 0, "momentum": 0, "weight_decay": 0}
  c = train[0]["config"]
  b = {k: c[k] for k in ("model", "dataset", "train_split", "augment", "num_epochs", "batch_size", "momentum",
                         "weight_decay")}
  b.update(num_train=plan.num_train(c), total_steps=train[0]["plan"].total_steps, arms={})
  for s in train:
    b["arms"][s["arm"]] = {**{k: s["config"][k] for k in ("schedule", "method", "init_lr", "num_cycles",
                                                          "smoothout_a", "smoothout_noise", "smoothout_chunks",
                                                          "smoothout_schedule")},
                           "snapshot_steps": list(s["plan"].snapshot_steps)}
  return b


def _figure_run(evals: dict[str, dict[str, Any]], seeds: list[int]) -> dict[str, Any] | None:
  """The last-m curve and diversity of the first seed's alpha0 = 0.2 Snapshot Ensemble run with an eval report."""
  for seed in seeds:
    step = evals.get(f"eval/snapshot/s{seed}")
    rep = _read_report(step)
    if rep is None:
      continue
    corr, dis = np.array(rep["diversity"]["correlation"], dtype=float), np.array(rep["diversity"]["disagreement"],
                                                                                 dtype=float)
    off = ~np.eye(len(corr), dtype=bool)
    return {"workdir": plan.shown(step["workdirs"][0]), "seed": seed, "last_m": rep["ensembles"],
            "first_m": rep.get("ensembles_first_m", []),
            "mean_correlation": float(np.nanmean(corr[off])) if off.any() else math.nan,
            "mean_disagreement": float(np.nanmean(dis[off])) if off.any() else math.nan,
            "error_vs_m_src": report_lib.figure_path(step["out_dir"], "error_vs_m"),
            "diversity_src": report_lib.figure_path(step["out_dir"], "diversity")}
  return None


def _machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  return f"{os.cpu_count()} CPU cores, {cpu}"
