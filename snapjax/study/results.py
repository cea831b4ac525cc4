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
from snapjax.study import plan, runner, serving
from snapjax.study.plan import EVAL_ARMS, LABELS, POOLED_ARMS, WEIGHT_AVERAGE_ARM

# The fields of the methods that followed, shown in the budget table (the library's defaults, not tuned here).
METHOD_FIELDS = ("fge_pretrain_fraction", "fge_cycle_epochs", "fge_lr1", "fge_lr2", "swa_start", "swa_lr",
                 "swa_every_steps", "swag_rank", "teacher_workdirs", "teacher_last_m", "distill_alpha", "distill_tau")
CONFORMAL_ALPHA = 0.1  # The page's conformal sets: coverage 1 - alpha = 90% asked for.

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
SmoothOut arm's steps cost a little more (one noise draw per step). The arms of issue 23 keep this budget and the
library's default settings (snapjax.methods.apply_method: FGE's 2-epoch cycles 0.05 -> 0.01 after 80% pretraining at
0.1; SWA and SWAG averaging once per epoch from 0.75 B at swa_lr 0.05, SWAG rank 20 and 30 samples; the student at
distill_alpha 0.9, distill_tau 4 on the single model's schedule), not tuned on results; on the quickstart's budget
(README, "FGE, SWA, EMA and SWAG") each of them trained to a test error within a point of the Snapshot Ensemble's.
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
  """An eval report's numbers for the page: the headline ensemble's (all the run's networks) and their curves.

  calibrated_nll, ece_ts, temperature: "temperature" ... "test_cv" (Ashukha et al.'s protocol: T fitted on a random
  half of the test set, the metrics on the other, both ways, 5 halvings); cnll_curve: the same of each last-m
  ensemble, m = 1..M; brier and ece: before temperature scaling; aurc: "selective"; conformal_*: split conformal
  "thr" sets at alpha 0.1; auroc_SET: "ood", max-probability score; shift_*: "shift" "per_severity" (calibrated
  NLL: nll_scaled, the clean test set's temperature), shift_clean_error: the same images uncorrupted; dee_curve: a
  multi-run evaluation's deep ensembles of its first k runs ("dee"). An analysis missing from the report leaves its
  keys out.
  """
  m = report["ensemble"]["m"]
  out = {"error": report["ensemble"]["error"], "nll": report["ensemble"]["nll"],
         "ece": report["calibration"]["ensembles"][m - 1]["ece"], "last_error": report["snapshots"][-1]["error"],
         "num_snapshots": len(report["snapshots"]), "networks": m,
         "snapshot_errors": [s["error"] for s in report["snapshots"]]}
  temp = report.get("temperature")
  if temp:
    head = temp["ensembles"][m - 1]
    out.update(calibrated_nll=head["test_cv"]["nll"], ece_ts=head["test_cv"]["ece"], brier=head["before"]["brier"],
               temperature=head["test_cv"]["temperature"], cnll_curve=[e["test_cv"]["nll"] for e in temp["ensembles"]])
  if report.get("selective"):
    out["aurc"] = report["selective"]["ensembles"][m - 1]["aurc"]
  if report.get("conformal"):
    thr = report["conformal"]["ensemble"]["thr"][str(CONFORMAL_ALPHA)]
    out.update(conformal_coverage=thr["coverage"], conformal_size=thr["size"])
  for name, entry in ((report.get("ood") or {}).get("sets") or {}).items():
    out[f"auroc_{name}"] = entry["ensemble"]["max_prob"]["auroc"]
  if report.get("shift"):
    per = report["shift"]["per_severity"]["ensemble"]
    out.update(shift_severities=[p["severity"] for p in per], shift_error=[p["error"] for p in per],
               shift_cnll=[p["nll_scaled"] for p in per], shift_clean_error=report["shift"]["clean"]["ensemble"]["error"],
               shift_examples=report["shift"]["examples"])
  if report.get("dee"):
    out["dee_curve"] = [d["calibrated_nll"] for d in report["dee"]["deep_ensembles"]]
  if report.get("swag"):
    out["swag_collected"] = [r["collected"] for r in report["swag"]["runs"]]
  return out


def _seconds(steps: dict[str, float], keys: list[str]) -> float | None:
  """The summed wall seconds of finished steps (None when one of them has no time in the state file)."""
  return sum(steps[k] for k in keys) if all(k in steps for k in keys) else None


def _wall(arm: str, entry: dict[str, Any], steps: dict[str, float], seeds: list[int]) -> dict[str, Any]:
  """An arm's wall seconds from the state file: training (per seed; a pooled arm's, all its runs') and evaluation.

  The distill arm's training is its teacher's and its own; the weight average's are the alpha0 = 0.2 runs' (it is
  computed inside their evaluation)."""
  source = EVAL_ARMS.get(arm, arm)
  if entry.get("pooled"):
    runs = [f"train/{source}/s{s}" for s in entry["pooled_seeds"]]
    return {"train": _seconds(steps, runs), "eval": _seconds(steps, [f"eval/{arm}"])}
  train, evals = {}, {}
  for seed in seeds:
    keys = [f"train/{source}/s{seed}"] + ([f"train/{study_fashion_mnist.DISTILL_TEACHER}/s{seed}"]
                                          if arm == plan.DISTILL_ARM else [])
    if _seconds(steps, keys) is not None:
      train[str(seed)] = _seconds(steps, keys)
    if f"eval/{source}/s{seed}" in steps:
      evals[str(seed)] = steps[f"eval/{source}/s{seed}"]
  return {"train_per_seed": train, "eval_per_seed": evals}


def _cost(arm: str, entry: dict[str, Any]) -> tuple[float, str]:
  """Training compute relative to one run of the budget B, and how it is made up."""
  if entry.get("pooled"):
    n = len(entry["pooled_seeds"])
    return float(n), f"{n} independent Single runs"
  if arm == plan.DISTILL_ARM:
    return 2.0, "teacher (the Snapshot Ensemble run, 1x) + student (1x; its steps also run the teacher forward)"
  if arm == WEIGHT_AVERAGE_ARM:
    return 1.0, "the Snapshot Ensemble run"
  return 1.0, "one run of the budget"


def _arm_entry(arm: str, evals: dict[str, dict[str, Any]], seeds: list[int]) -> tuple[dict[str, Any], int | None]:
  """An arm's label, cost and per-seed metrics (a pooled arm: one entry over its runs); and the test set size."""
  entry, num_test = {"label": LABELS[arm], "runs": {}}, None
  if arm in POOLED_ARMS:
    step = evals.get(f"eval/{arm}")
    rep = _read_report(step)
    entry.update(pooled=True, pooled_seeds=[t["seed"] for t in step["needs"]] if step else list(seeds),
                 workdirs=[plan.shown(w) for w in step["workdirs"]] if step else [])
    if rep:
      entry["runs"]["pooled"] = {**_metrics(rep), "last_error": None}
      num_test = rep["num_test_examples"]
  else:
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
                                    "m": wa["m"], "networks": 1, "workdir": plan.shown(step["workdirs"][0])}
      else:
        entry["runs"][str(seed)] = {**_metrics(rep), "workdir": plan.shown(step["workdirs"][0])}
  entry["cost_x"], entry["cost_note"] = _cost(arm, entry)
  entry["cost"] = f"{entry['cost_x']:g}x"
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
  for arm, entry in results["arms"].items():
    entry["wall"] = _wall(arm, entry, results["wall_time"]["steps"], args.seeds)
  serve = next((s for s in steps if s["kind"] == "serve"), None)
  results["serving"] = serving.read(serve["out_file"]) if serve and plan.status(serve) == "done" else None
  if results["serving"]:
    results["serving"]["workdir"] = plan.shown(results["serving"]["workdir"])
  results["conformal_alpha"] = CONFORMAL_ALPHA
  results["deep_ensemble_size"] = next((len(s["needs"]) for s in steps if s["key"] == f"eval/{plan.DEEP_ENSEMBLE_ARM}"),
                                       None)
  results["commands"] = [shlex.join(s["argv"]) for s in steps]
  results["example_commands"] = [shlex.join(s["argv"]) for s in steps if s["seed"] == args.seeds[0]] + [
      shlex.join(s["argv"]) for s in steps if s["seed"] not in (*args.seeds, None)] + [
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
                                                          "smoothout_schedule", *METHOD_FIELDS)},
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
