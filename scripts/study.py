"""Issue 9's study: every Table 1 arm on real Fashion-MNIST, 3 seeds each, one budget; writes the results page.

    python scripts/study.py --out runs/study --seeds 0,1,2            # The study (about 2 hours on a 2-core CPU).
    python scripts/study.py --dry_run                                 # The plan: every command, what is done.
    python scripts/study.py --tiny DATA_DIR --out /tmp/s --seeds 0,1  # The whole pipeline on tiny data, in minutes.

Training arms (configs/study_fashion_mnist.py:ARM): Snapshot Ensemble alpha0 = 0.2 and 0.1, Single model, NoCycle,
SingleCycle, Snapshot Ensemble + AdaSmoothOut. Eval-side arms: the weight-averaged snapshots of the alpha0 = 0.2
runs (eval.py --analyses=weight_average on them) and the true ensemble of the Single runs (eval.py over their
workdirs, 3x the training cost). Each run is `python train.py ...` then `python eval.py ...` in a subprocess (the
command the page shows is the one that ran; --in_process runs them in this process instead, as the tests do).

Resumable: a run whose workdir holds its last snapshot, or an eval whose report matches the workdirs' snapshots,
is skipped; an interrupted run resumes (train.py resumes its workdir). Progress lines name each run and an ETA.
The page: `write_results` (from a results dict, `collect_results`) writes docs/results/fashion_mnist.md and .json.
"""
import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # This checkout's snapjax (and configs), whatever else is installed.

CONFIG_FILE = "configs/study_fashion_mnist.py"
RESULTS_NAME = "fashion_mnist"
STATE_FILE = "study_state.json"
WEIGHT_AVERAGE_ARM, TRUE_ENSEMBLE_ARM = "snapshot_weight_average", "true_ensemble"
# Eval-side arms: name -> the training arm whose runs they evaluate.
EVAL_ARMS = {WEIGHT_AVERAGE_ARM: "snapshot", TRUE_ENSEMBLE_ARM: "single"}
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
# The comparisons the page states, arm a against arm b (test error a - b per seed; the claim is a < b).
COMPARISONS = (
    {"a": "snapshot", "b": "single", "source": "paper Table 1",
     "claim": "the Snapshot Ensemble (alpha0 = 0.2) has a lower test error than the single model"},
    {"a": "snapshot_lr0.1", "b": "single", "source": "paper Table 1",
     "claim": "the Snapshot Ensemble (alpha0 = 0.1) has a lower test error than the single model"},
    {"a": "snapshot", "b": "nocycle", "source": "paper Table 1",
     "claim": "the Snapshot Ensemble has a lower test error than the NoCycle Snapshot Ensemble"},
    {"a": "snapshot", "b": "single_cycle", "source": "paper Table 1",
     "claim": "the Snapshot Ensemble has a lower test error than SingleCycle Ensembles"},
    {"a": TRUE_ENSEMBLE_ARM, "b": "snapshot", "source": "paper Fig. 4", "approach": True,
     "claim": "the true ensemble (3x the cost) is a lower bound that the Snapshot Ensemble approaches"},
    {"a": "snapshot_smoothout", "b": "snapshot", "source": "SmoothOut paper (Wen et al. 2018)",
     "claim": "SmoothOut improves generalisation, here of the Snapshot Ensemble"},
    {"a": "snapshot", "b": WEIGHT_AVERAGE_ARM, "source": "inferred from paper Fig. 5 (snapshots in different minima)",
     "claim": "averaging the snapshots' predictions beats averaging their weights"},
)
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


# --------------------------------------------------------------------------------------------------------------
# Statistics and the page: pure functions of a results dict, tested on fake results.


def mean_std(values: list[float]) -> dict[str, Any]:
  """{"mean", "std", "n"}: the sample standard deviation (ddof = 1); std None for fewer than 2 values."""
  x = np.asarray([v for v in values if v is not None], np.float64)
  if not len(x):
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else None, "n": int(len(x))}


def _per_seed(results: dict[str, Any], arm: str) -> dict[str, dict[str, float]]:
  """{seed: metrics} of an arm; a pooled arm (the true ensemble, one number over all seeds) is the same for each."""
  entry = results["arms"].get(arm) or {}
  return dict(entry.get("runs") or {})


def paired(results: dict[str, Any], a: str, b: str, metric: str = "error") -> dict[str, float]:
  """{seed: a - b} over the seeds both arms have; a pooled arm is subtracted from every seed of the other."""
  ra, rb = _per_seed(results, a), _per_seed(results, b)
  pooled_a, pooled_b = results["arms"].get(a, {}).get("pooled"), results["arms"].get(b, {}).get("pooled")
  if pooled_a and pooled_b:
    return {}
  if pooled_a:
    ra = {s: next(iter(ra.values())) for s in rb} if ra else {}
  if pooled_b:
    rb = {s: next(iter(rb.values())) for s in ra} if rb else {}
  seeds = sorted(set(ra) & set(rb), key=_seed_order)
  return {s: ra[s][metric] - rb[s][metric] for s in seeds
          if ra[s].get(metric) is not None and rb[s].get(metric) is not None}


def _seed_order(seed: str) -> tuple:
  return (0, int(seed)) if str(seed).lstrip("-").isdigit() else (1, str(seed))


def _pct(x: float | None, signed: bool = False) -> str:
  return "n/a" if x is None else (f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}")


def _pm(stats: dict[str, Any], scale: float = 100.0, digits: int = 2, signed: bool = False) -> str:
  """'mean +- std' (or the mean alone for one value, 'n/a' for none)."""
  if stats["mean"] is None:
    return "n/a"
  mean = f"{scale * stats['mean']:{'+' if signed else ''}.{digits}f}"
  return mean if stats["std"] is None else f"{mean} ± {scale * stats['std']:.{digits}f}"


TIE = 1e-9  # Test errors are counts over the test set: differences this small are float noise, a tie.


def verdict(diffs: dict[str, float]) -> str:
  """'agrees' (a < b in every seed), 'disagrees' (a > b in every seed), 'inconclusive', or 'not run'."""
  if not diffs:
    return "not run"
  values = list(diffs.values())
  if all(d < -TIE for d in values):
    return "agrees"
  if all(d > TIE for d in values):
    return "disagrees"
  return "inconclusive"


def compare(results: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
  """One comparison of the page: per-seed differences of error, NLL and ECE, their mean +- std, the verdict and
  its sentence, generated from the numbers."""
  a, b = spec["a"], spec["b"]
  out = {**spec, "label_a": LABELS.get(a, a), "label_b": LABELS.get(b, b)}
  for metric in ("error", "nll", "ece"):
    diffs = paired(results, a, b, metric)
    out[metric] = {"per_seed": diffs, **mean_std(list(diffs.values()))}
  diffs = out["error"]["per_seed"]
  out["verdict"] = verdict(diffs)
  n, lower = len(diffs), sum(d < -TIE for d in diffs.values())
  ties = sum(abs(d) <= TIE for d in diffs.values())
  if not n:
    out["text"] = f"not run: no seed has both {out['label_a']} and {out['label_b']}."
    return out
  who = "the paper" if spec["source"].startswith("paper") else "the claim"
  word = {"agrees": f"agrees with {who}", "disagrees": f"disagrees with {who}",
          "inconclusive": "inconclusive: the seeds disagree"}[out["verdict"]]
  per_seed = ", ".join(f"seed {s}: {_pct(d, True)}" for s, d in diffs.items())
  text = (f"**{word}**. {out['label_a']} had the lower test error in {lower} of {n} seed{'s' if n > 1 else ''}"
          f"{f' ({ties} tied)' if ties else ''}: a - b = {_pm(out['error'], signed=True)} points ({per_seed}).")
  if n < 2:
    text += " One seed only: no spread, no conclusion."
  if spec.get("approach"):
    text += " " + _approach_text(results, b, a)
  out["text"] = text
  return out


def _approach_text(results: dict[str, Any], se: str, true_ens: str) -> str:
  """How much of the gap between the Single model and the true ensemble the Snapshot Ensemble closes, per seed."""
  single, se_runs = _per_seed(results, "single"), _per_seed(results, se)
  te = next(iter(_per_seed(results, true_ens).values()))["error"]
  fractions, left_out = {}, []
  for s in sorted(set(single) & set(se_runs), key=_seed_order):
    gap = single[s]["error"] - te
    if gap > 0:
      fractions[s] = (single[s]["error"] - se_runs[s]["error"]) / gap
    else:
      left_out.append(s)
  note = (f"; left out, their Single model no worse than the true ensemble: seed{'s' if len(left_out) > 1 else ''} "
          f"{', '.join(left_out)}" if left_out else "")
  if not fractions:
    return ("The gap it closes is undefined: no seed's Single model is worse than the true ensemble "
            f"({_pct(te)}%).")
  stats = mean_std(list(fractions.values()))
  per_seed = ", ".join(f"seed {s}: {100 * f:.0f}%" for s, f in fractions.items())
  return (f"Of the gap between the Single model and the true ensemble ({_pct(te)}%), the Snapshot Ensemble closes "
          f"{_pm(stats, digits=0)}% ({per_seed}{note}; 100% = as good as the true ensemble, 0% = no better than "
          f"Single).")


def summarize(results: dict[str, Any]) -> dict[str, Any]:
  """The results with each arm's mean +- std over seeds ("stats") and the comparisons, as written to the JSON."""
  out = json.loads(json.dumps(results))
  for entry in out["arms"].values():
    runs = list((entry.get("runs") or {}).values())
    entry["stats"] = {m: mean_std([r.get(m) for r in runs]) for m in ("error", "nll", "ece", "last_error")}
  out["cycle_check"] = cycle_check(out)
  out["comparisons"] = [compare(out, spec) for spec in COMPARISONS
                        if spec["a"] in out["arms"] or spec["b"] in out["arms"]]
  return out


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return "n/a"
  h, rem = divmod(int(round(seconds)), 3600)
  return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def render_markdown(summary: dict[str, Any]) -> str:
  """docs/results/fashion_mnist.md from `summarize`'s output."""
  arms, seeds = summary["arms"], [str(s) for s in summary["seeds"]]
  lines = [f"# {summary['title']}", "",
           f"Generated by `{summary['command']}` on {summary.get('generated', 'n/a')}; every number is read from "
           f"the runs' eval reports (machine-readable: `{RESULTS_NAME}.json`).", ""]
  if summary.get("tiny"):
    lines += ["**Tiny pipeline test** (`--tiny`): generated data and a few updates; the numbers mean nothing.", ""]
  lines += ["## Agreement with the paper", "",
            "Each line is generated from the per-seed paired differences of test error (arm a - arm b): "
            "*agrees* when the claim holds in every seed, *disagrees* when the opposite holds in every seed, "
            "*inconclusive* otherwise (a tie counts against both).", ""]
  for c in summary["comparisons"]:
    lines.append(f"- {c['label_a']} vs {c['label_b']} ({c['source']}: {c['claim']}): {c['text']}")
  lines += ["", "## Results", "",
            f"Test error, NLL and ECE (15 bins) on the {summary.get('num_test_examples', 'n/a')} test images, "
            f"mean ± sample std (ddof = 1) over seeds; each ensemble arm is the ensemble of all its snapshots. "
            f"Cost: training compute relative to one run of the budget. Train + eval: wall minutes per seed on this "
            f"machine (the weight averages are computed inside the alpha0 = 0.2 runs' evaluation; the true ensemble's "
            f"time is its Single runs' and its own evaluation).", "",
            "| arm | cost | seeds | test error (%) | NLL | ECE (%) | last snapshot error (%) | train + eval (min) |",
            "|---|---|---|---|---|---|---|---|"]
  for name, e in arms.items():
    st = e["stats"]
    n = "pooled " + ",".join(str(s) for s in e.get("pooled_seeds", [])) if e.get("pooled") else str(st["error"]["n"])
    lines.append(f"| {e['label']} | {e['cost']} | {n} | {_pm(st['error'])} | {_pm(st['nll'], 1, 4)} | "
                 f"{_pm(st['ece'])} | {_pm(st['last_error'])} | {_minutes(summary, name)} |")
  lines += ["", "Per seed, test error (%):", "", "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---" * (len(seeds) + 1) + "|"]
  for name, e in arms.items():
    runs = e.get("runs") or {}
    cells = ([_pct(next(iter(runs.values()))["error"]) + " (pooled)"] * len(seeds) if e.get("pooled") and runs else
             [_pct(runs[s]["error"]) if s in runs else "not run" for s in seeds])
    lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
  lines += ["", "## Paired differences", "",
            "Arm a - arm b per seed, in points of test error (%); NLL and ECE differences as mean ± std.", "",
            "| a - b | " + " | ".join(f"seed {s}" for s in seeds) + " | error mean ± std | NLL | ECE (%) | "
            "verdict |", "|---" * (len(seeds) + 5) + "|"]
  for c in summary["comparisons"]:
    d = c["error"]["per_seed"]
    cells = [_pct(d[s], True) if s in d else "n/a" for s in seeds]
    lines.append(f"| {c['label_a']} - {c['label_b']} | " + " | ".join(cells) + f" | {_pm(c['error'], signed=True)} | "
                 f"{_pm(c['nll'], 1, 4, True)} | {_pm(c['ece'], signed=True)} | {c['verdict']} |")
  lines += _figure_section(summary)
  lines += _cycle_section(summary)
  lines += _budget_section(summary)
  wall = summary.get("wall_time") or {}
  lines += ["## Wall time and command", "",
            f"The whole study took **{_duration(wall.get('seconds'))}** of wall time on this machine "
            f"({wall.get('invocations', 'n/a')} invocation(s) of the script, up to {wall.get('jobs', 1)} run(s) at "
            f"once; {wall.get('train_runs', 'n/a')} "
            f"training runs and {wall.get('evals', 'n/a')} evaluations; {summary.get('machine', 'n/a')}). "
            f"{wall.get('note', '')}", "", "```bash", summary["command"], "```", "",
            "It runs, for each seed and arm, these commands (seed 0 shown; every command is in the JSON):", "",
            "```bash", *summary.get("example_commands", []), "```", ""]
  return "\n".join(lines)


def _minutes(summary: dict[str, Any], arm: str) -> str:
  """Mean wall minutes per seed of an arm's training and evaluation (the eval-side arms: their source's)."""
  steps = (summary.get("wall_time") or {}).get("steps") or {}
  source = "single" if arm == TRUE_ENSEMBLE_ARM else EVAL_ARMS.get(arm, arm)
  per_seed = {}
  for key, seconds in steps.items():
    rest = key.partition("/")[2]
    if rest.split("/")[0] == source:
      per_seed[rest.split("/")[-1]] = per_seed.get(rest.split("/")[-1], 0.0) + seconds
  if arm == TRUE_ENSEMBLE_ARM:  # Three Single runs' training and evaluation, and the ensemble's evaluation.
    extra = steps.get(f"eval/{TRUE_ENSEMBLE_ARM}")
    return "n/a" if not per_seed or extra is None else f"{(sum(per_seed.values()) + extra) / 60:.1f}"
  stats = mean_std([v / 60 for v in per_seed.values()])
  return _pm(stats, 1, 1)


def _figure_section(summary: dict[str, Any]) -> list[str]:
  fig = summary.get("figure_run")
  if not fig:
    return ["", "## Ensemble size and diversity of one Snapshot Ensemble run", "", "Not run.", ""]
  lines = ["", f"## Ensemble size and diversity of one Snapshot Ensemble run ({fig['workdir']})", "",
           f"![test error of each snapshot and each last-m ensemble]({fig['error_vs_m']})", "",
           "| m | last-m ensemble error (%) | NLL | first-m ensemble error (%) |", "|---|---|---|---|"]
  first = {e["m"]: e for e in fig.get("first_m", [])}
  for e in fig["last_m"]:
    lines.append(f"| {e['m']} | {_pct(e['error'])} | {e['nll']:.4f} | "
                 f"{_pct(first[e['m']]['error']) if e['m'] in first else 'n/a'} |")
  lines += ["", f"![pairwise disagreement and softmax correlation of the snapshots]({fig['diversity']})", "",
            f"Mean pairwise softmax correlation of the snapshots: {fig['mean_correlation']:.3f}; mean disagreement: "
            f"{100 * fig['mean_disagreement']:.1f}% of the test images.", ""]
  return lines


CYCLIC_ARMS = ("snapshot", "snapshot_lr0.1", "snapshot_smoothout", "single_cycle")


def cycle_check(summary: dict[str, Any]) -> list[dict[str, Any]]:
  """Per cyclic arm: the mean test error of snapshot i over seeds, in how many seeds the last snapshot is the best
  single one, and in how many the ensemble beats its best single snapshot (the paper's regime needs converged
  cycles: snapshots that are each good and different, not one that keeps improving)."""
  out = []
  for arm in CYCLIC_ARMS:
    runs = [r for r in (summary["arms"].get(arm, {}).get("runs") or {}).values() if r.get("snapshot_errors")]
    if not runs:
      continue
    num = min(len(r["snapshot_errors"]) for r in runs)
    errs = np.array([r["snapshot_errors"][:num] for r in runs])
    out.append({"arm": arm, "n": len(runs), "mean_snapshot_errors": errs.mean(0).tolist(),
                "last_is_best": int(sum(e[-1] <= e.min() for e in errs)),
                "ensemble_beats_best": int(sum(r["error"] < min(r["snapshot_errors"]) for r in runs))})
  return out


def _cycle_section(summary: dict[str, Any]) -> list[str]:
  checks = cycle_check(summary)
  if not checks:
    return []
  lines = ["## Did each cycle converge?", "",
           "Mean test error (%) of snapshot i over seeds. If the last snapshot is the best one in every seed and the "
           "ensemble does not beat it, the snapshots kept improving from cycle to cycle: the budget is short of the "
           "paper's regime (README: the quickstart's notes).", "",
           "| arm | " + " | ".join(f"snapshot {i + 1}" for i in range(max(len(c["mean_snapshot_errors"])
                                                                          for c in checks))) +
           " | last snapshot is the best | ensemble beats the best snapshot |",
           "|---" * (max(len(c["mean_snapshot_errors"]) for c in checks) + 3) + "|"]
  width = max(len(c["mean_snapshot_errors"]) for c in checks)
  for c in checks:
    cells = [_pct(e) for e in c["mean_snapshot_errors"]] + [""] * (width - len(c["mean_snapshot_errors"]))
    lines.append(f"| {LABELS[c['arm']]} | " + " | ".join(cells) +
                 f" | {c['last_is_best']} of {c['n']} seeds | {c['ensemble_beats_best']} of {c['n']} seeds |")
  lines.append("")
  se = next((c for c in checks if c["arm"] == "snapshot"), None)
  if se:
    if se["last_is_best"] == se["n"] and se["ensemble_beats_best"] == 0:
      lines += ["For the Snapshot Ensemble (alpha0 = 0.2): the last snapshot is the best in every seed and the "
                "ensemble never beats it, so the cycles did not converge on this budget.", ""]
    else:
      lines += [f"For the Snapshot Ensemble (alpha0 = 0.2): the ensemble beats its best single snapshot in "
                f"{se['ensemble_beats_best']} of {se['n']} seeds; the last snapshot is the best single one in "
                f"{se['last_is_best']} of {se['n']}.", ""]
  return lines


def _budget_section(summary: dict[str, Any]) -> list[str]:
  b = summary["budget"]
  lines = ["## Budget", "",
           f"Every arm: model `{b['model']}`, dataset `{b['dataset']}` split `{b['train_split'] or 'train'}` "
           f"({b['num_train']} training images), augmentation `{b['augment'] or 'dataset default'}`, "
           f"{b['num_epochs']:g} epochs = {b['total_steps']} updates of batch {b['batch_size']}, SGD with Nesterov "
           f"momentum {b['momentum']} and weight decay {b['weight_decay']:g}. Config: `{CONFIG_FILE}:ARM`.", "",
           "| arm | schedule | method | alpha0 | cycles / snapshots | snapshot steps | SmoothOut |",
           "|---|---|---|---|---|---|---|"]
  for name, a in b["arms"].items():
    so = (f"a = {a['smoothout_a']:g}, {a['smoothout_noise']}, K = {a['smoothout_chunks']}, "
          f"{a['smoothout_schedule']}" if a["smoothout_a"] else "off")
    lines.append(f"| {LABELS.get(name, name)} | {a['schedule']} | {a['method']} | {a['init_lr']:g} | "
                 f"{a['num_cycles']} | {', '.join(str(s) for s in a['snapshot_steps'])} | {so} |")
  lines += ["", "Eval-side arms: the weight-averaged snapshots average the weights of all the snapshots of each "
            "alpha0 = 0.2 run into one network (BatchNorm statistics measured again on training batches; "
            "`eval.py --analyses=weight_average`), the same cost as one run; the true ensemble averages the "
            "predictions of the independently trained Single runs (`eval.py --workdir` once per seed), 3x the cost "
            "of one run: the paper's lower bound (Fig. 4). It is one number over all seeds, so it has no spread.", ""]
  if summary.get("budget_note"):
    lines += ["How the budget was chosen: " + " ".join(summary["budget_note"].split()), ""]
  if summary.get("pilot_note"):
    lines += ["Pilot: " + " ".join(summary["pilot_note"].split()), ""]
  if summary.get("smoothout_note"):
    lines += ["SmoothOut settings: " + " ".join(summary["smoothout_note"].split()), ""]
  return lines


def write_results(results: dict[str, Any], results_dir: str, name: str = RESULTS_NAME) -> dict[str, Any]:
  """Writes name.md, name.json and the figures (copied from the figure run's eval dir) into results_dir."""
  os.makedirs(results_dir, exist_ok=True)
  results = json.loads(json.dumps(results))
  fig = results.get("figure_run")
  if fig:
    for key in ("error_vs_m", "diversity"):
      src, dst = fig.pop(f"{key}_src", None), f"{name}_{key}.png"
      if src and os.path.exists(src):
        shutil.copyfile(src, os.path.join(results_dir, dst))
        fig[key] = dst
      else:
        fig[key] = fig.get(key) or "(missing)"
  summary = summarize(results)
  with open(os.path.join(results_dir, f"{name}.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(results_dir, f"{name}.md"), "w") as f:
    f.write(render_markdown(summary))
  return summary


# --------------------------------------------------------------------------------------------------------------
# The plan: which runs, their configs and commands, and whether they are done.


def _load_config_module():
  from configs import study_fashion_mnist
  return study_fashion_mnist


def budget_overrides(arm: str, tiny_dir: str | None) -> dict[str, Any]:
  """The --config.<field> overrides of an arm's runs: none for the real study; --tiny's small budget and data."""
  if not tiny_dir:
    return {}
  base = _load_config_module().get_config(arm)
  overrides = {"fashion_mnist_dir": tiny_dir, **TINY_BUDGET}
  if base.schedule == "step":  # The methods fix the single model's and NoCycle's snapshot counts.
    overrides.pop("num_cycles")
  return overrides


def build_config(arm: str, seed: int, overrides: dict[str, Any]):
  c = _load_config_module().get_config(arm)
  c.seed = seed
  for k, v in overrides.items():
    c[k] = v
  return c


def _fmt_override(v: Any) -> str:
  return str(v)


def _abs(path: str) -> str:
  """A path as the plan holds it: absolute (relative paths are relative to the repository root, where the
  subprocesses run)."""
  return os.path.normpath(os.path.join(ROOT, path))


def _shown(path: str) -> str:
  """A path as the commands show it: relative to the repository root when it lies inside."""
  rel = os.path.relpath(path, ROOT)
  return path if rel.startswith("..") else rel


def train_argv(arm: str, seed: int, workdir: str, overrides: dict[str, Any]) -> list[str]:
  return ["python", "train.py", "--config", f"{CONFIG_FILE}:{arm}", "--workdir", _shown(workdir),
          f"--config.seed={seed}",
          *[f"--config.{k}={_fmt_override(v)}" for k, v in overrides.items()]]


def eval_argv(workdirs: list[str], out_dir: str | None, analyses: list[str]) -> list[str]:
  argv = ["python", "eval.py", *[a for wd in workdirs for a in ("--workdir", _shown(wd))]]
  if out_dir:
    argv += ["--out_dir", _shown(out_dir)]
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


def make_plan(out: str, arms: list[str], seeds: list[int], tiny_dir: str | None) -> list[dict[str, Any]]:
  """The steps in order: for each seed, each training arm's train and eval; then the true ensemble's eval."""
  from snapjax import train_step
  train_arms = [a for a in _load_config_module().ARMS if a in arms or any(EVAL_ARMS.get(e) == a for e in arms)]
  steps = []
  for seed in seeds:
    for arm in train_arms:
      overrides = budget_overrides(arm, tiny_dir)
      config = build_config(arm, seed, overrides)
      plan = train_step.make_plan(config, num_train(config))
      wd = os.path.join(out, arm, f"s{seed}")
      steps.append({"kind": "train", "key": f"train/{arm}/s{seed}", "arm": arm, "seed": seed, "workdir": wd,
                    "overrides": overrides, "config": config, "plan": plan,
                    "argv": train_argv(arm, seed, wd, overrides)})
      analyses = ["weight_average"] if arm == EVAL_ARMS[WEIGHT_AVERAGE_ARM] and WEIGHT_AVERAGE_ARM in arms else []
      steps.append({"kind": "eval", "key": f"eval/{arm}/s{seed}", "arm": arm, "seed": seed, "workdirs": [wd],
                    "out_dir": os.path.join(wd, "eval"), "analyses": analyses, "needs": [steps[-1]],
                    "argv": eval_argv([wd], None, analyses)})
  if TRUE_ENSEMBLE_ARM in arms:
    needs = [s for s in steps if s["kind"] == "train" and s["arm"] == EVAL_ARMS[TRUE_ENSEMBLE_ARM]]
    wds = [s["workdir"] for s in needs]
    od = os.path.join(out, TRUE_ENSEMBLE_ARM, "eval")
    steps.append({"kind": "eval", "key": f"eval/{TRUE_ENSEMBLE_ARM}", "arm": TRUE_ENSEMBLE_ARM, "seed": None,
                  "workdirs": wds, "out_dir": od, "analyses": [], "needs": needs, "argv": eval_argv(wds, od, [])})
  return steps


def _snapshot_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "snapshots")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())  # Committed saves only (no *-tmp leftovers).


def check_workdir(step: dict[str, Any]) -> None:
  """A workdir holding a run of another config is an error before anything runs (train.py would refuse it)."""
  from snapjax import config as config_lib, workdir as workdir_lib
  saved = workdir_lib.read_config(step["workdir"]) if os.path.isdir(step["workdir"]) else None
  if saved is not None:
    diff = config_lib.resume_differences(config_lib.with_defaults(saved), config_lib.to_dict(step["config"]))
    if diff:
      raise SystemExit(f"error: {step['workdir']} holds a run of another config (fields {', '.join(diff)}); "
                       f"use another --out")


def status(step: dict[str, Any]) -> str:
  """'done', 'resume' (a train run with some progress), 'todo', or 'waiting' (an eval whose runs are not done)."""
  if step["kind"] == "train":
    snaps = _snapshot_steps(step["workdir"])
    if step["plan"].total_steps in snaps:
      return "done"
    return "resume" if os.path.exists(os.path.join(step["workdir"], "config.json")) else "todo"
  if not all(status(t) == "done" for t in step["needs"]):
    return "waiting"
  report = os.path.join(step["out_dir"], "report.json")
  if not os.path.exists(report):
    return "todo"
  with open(report) as f:
    rep = json.load(f)
  have = [(_abs(s["workdir"]), s["step"]) for s in rep.get("snapshots", [])]
  want = [(wd, st) for wd in step["workdirs"] for st in _snapshot_steps(wd)]
  fresh = [_abs(w) for w in rep.get("workdirs", [])] == step["workdirs"] and have == want
  return "done" if fresh and all(a in rep for a in step["analyses"]) else "todo"


# --------------------------------------------------------------------------------------------------------------
# Running the plan.


def log(message: str) -> None:
  print(f"[study {datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


class _State:
  """OUT/study_state.json: each finished step's wall time and each invocation's, kept across invocations."""

  def __init__(self, out: str):
    self.path = os.path.join(out, STATE_FILE)
    self.data = {"steps": {}, "invocations": []}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.data = json.load(f)
    self.invocation = {"started": _now(), "seconds": 0.0, "ran": [], "load_average": _load()}
    self.data["invocations"].append(self.invocation)
    self._t0 = time.monotonic()

  def finished(self, key: str, seconds: float, argv: list[str]) -> None:
    self.data["steps"][key] = {"seconds": seconds, "finished": _now(), "command": shlex.join(argv)}
    self.invocation["ran"].append(key)
    self.save()

  def save(self) -> None:
    self.invocation["seconds"] = time.monotonic() - self._t0
    self.invocation["ended"] = _now()
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=2)
    os.replace(tmp, self.path)

  def wall_seconds(self) -> float:
    return sum(i["seconds"] for i in self.data["invocations"])


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def _load() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


class _Runner:
  """Runs one step: a subprocess of train.py / eval.py (default) or the same call in this process."""

  def __init__(self, in_process: bool, out: str):
    self.in_process, self.out = in_process, out
    self.children: list[subprocess.Popen] = []  # Running subprocesses (several with --jobs).
    self.stop_requested = False

  def run(self, step: dict[str, Any]) -> str:
    """'ok', 'preempted' or 'failed: ...'."""
    return self._in_process(step) if self.in_process else self._subprocess(step)

  def _subprocess(self, step: dict[str, Any]) -> str:
    child = self.start(step)
    child.wait()
    return self.outcome(step, child)

  def start(self, step: dict[str, Any]) -> subprocess.Popen:
    """Starts the step's train.py / eval.py subprocess, its output appended to the workdir's (or out_dir's) log."""
    log_dir = step["workdir"] if step["kind"] == "train" else step["out_dir"]
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{step['kind']}.log")
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(os.path.join(self.out, ".jax_cache")))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = [sys.executable, *step["argv"][1:]]
    with open(log_path, "a") as f:
      f.write(f"\n# {_now()} {shlex.join(step['argv'])}\n")
      f.flush()
      child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    child.log_path = log_path
    self.children.append(child)
    return child

  def outcome(self, step: dict[str, Any], child: subprocess.Popen) -> str:
    """'ok', 'preempted' or 'failed: ...' of a finished subprocess."""
    self.children.remove(child)
    if child.returncode != 0:
      with open(child.log_path) as f:
        tail = [l for l in f.read().splitlines() if l.strip()][-1:]
      return f"failed: exit code {child.returncode} ({tail[0] if tail else ''}); log {child.log_path}"
    if step["kind"] == "train" and status(step) != "done":
      return "preempted"
    return "ok"

  def _in_process(self, step: dict[str, Any]) -> str:
    from snapjax import evaluation, training
    from snapjax.errors import UserError
    try:
      if step["kind"] == "train":
        result = training.train_and_evaluate(step["config"], step["workdir"])
        return "preempted" if result.preempted else "ok"
      evaluation.evaluate_runs(step["workdirs"], out_dir=step["out_dir"], analyses=step["analyses"] or None)
      return "ok"
    except (UserError, training.TrainingDiverged) as e:
      return f"failed: {' '.join(str(e).split())}"

  def terminate(self, signum, frame) -> None:
    """SIGTERM/SIGINT: pass it to the running train.py processes (which save their state) and stop after them."""
    del frame
    self.stop_requested = True
    for child in self.children:
      if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    log(f"signal {signum}: stopping after the current run(s); re-run the same command to resume")


def run_study(args: argparse.Namespace, steps: list[dict[str, Any]]) -> int:
  """Runs every step not done yet, in order; returns the exit code (0: all done, 1: failures, 3: stopped)."""
  os.makedirs(args.out, exist_ok=True)
  state, runner = _State(args.out), _Runner(args.in_process, args.out)
  state.invocation["jobs"] = args.jobs
  if not args.in_process:  # In-process training handles SIGTERM itself (it saves and returns preempted).
    signal.signal(signal.SIGTERM, runner.terminate)
  todo = [s for s in steps if status(s) != "done"]
  log(f"{len(steps)} steps, {len(steps) - len(todo)} done already, {len(todo)} to run "
      f"({sum(s['kind'] == 'train' for s in todo)} training runs)")
  failed, durations = [], {"train": [], "eval": []}
  for s in steps:
    durations[s["kind"]] += [v["seconds"] for k, v in state.data["steps"].items() if k == s["key"]]
  if args.jobs > 1:
    return _run_parallel(args.jobs, steps, state, runner, durations)
  code = 0
  for i, step in enumerate(steps):
    st = status(step)
    if st == "done":
      log(f"skip {step['key']}: done")
      continue
    if st == "waiting":
      log(f"skip {step['key']}: its runs are not finished")
      failed.append(step["key"])
      continue
    remaining = [s for s in steps[i:] if s["kind"] == "train"], [s for s in steps[i:] if s["kind"] == "eval"]
    log(f"run {step['key']} ({'resuming' if st == 'resume' else 'starting'}): {shlex.join(step['argv'])}; "
        f"ETA of the rest {_eta(durations, remaining)}")
    t0 = time.monotonic()
    outcome = runner.run(step)
    result = _record(step, time.monotonic() - t0, outcome, runner, state, durations, failed)
    if result == "stopped":
      return 3
    if result == "failed":
      code = 1
  state.save()
  if failed:
    log(f"{len(failed)} step(s) not done: {', '.join(failed)}")
  return code or (1 if failed else 0)


def _record(step: dict[str, Any], seconds: float, outcome: str, runner: _Runner, state: _State,
            durations: dict[str, list[float]], failed: list[str]) -> str:
  """Logs and records a finished step: 'done', 'stopped' (preempted or asked to stop) or 'failed'."""
  if outcome == "ok":
    state.finished(step["key"], seconds, step["argv"])
    durations[step["kind"]].append(seconds)
    log(f"done {step['key']} in {_duration(seconds)}")
    return "done"
  state.save()
  if outcome == "preempted" or runner.stop_requested:
    log(f"stopped during {step['key']}: its state is saved; re-run the same command to resume")
    return "stopped"
  failed.append(step["key"])
  log(f"FAILED {step['key']}: {outcome}")
  return "failed"


def _run_parallel(jobs: int, steps: list[dict[str, Any]], state: _State, runner: _Runner,
                  durations: dict[str, list[float]]) -> int:
  """run_study with up to `jobs` subprocesses at once: steps start in plan order as soon as their runs are done.

  On a CPU whose cores one run does not keep busy (a small model: XLA's intra-op threads idle part of each step),
  two runs side by side finish sooner than one after the other; each run's own wall time is then longer.
  """
  started, running, failed = set(), {}, []  # running: Popen -> (step, t0)
  while True:
    if not runner.stop_requested:
      for step in steps:
        if len(running) >= jobs:
          break
        if step["key"] in started or status(step) in ("done", "waiting"):
          continue
        remaining = ([s for s in steps if s["kind"] == "train" and s["key"] not in started],
                     [s for s in steps if s["kind"] == "eval" and s["key"] not in started])
        started.add(step["key"])
        log(f"run {step['key']} ({'resuming' if status(step) == 'resume' else 'starting'}; {len(running) + 1} "
            f"running): {shlex.join(step['argv'])}; ETA of the rest {_eta(durations, remaining, jobs)}")
        running[runner.start(step)] = (step, time.monotonic())
    if not running:
      break
    time.sleep(1.0)
    for child in [c for c in running if c.poll() is not None]:
      step, t0 = running.pop(child)
      outcome = runner.outcome(step, child)
      _record(step, time.monotonic() - t0, outcome, runner, state, durations, failed)
  state.save()
  if runner.stop_requested:
    return 3
  failed += [s["key"] for s in steps if status(s) != "done" and s["key"] not in failed]
  if failed:
    log(f"{len(failed)} step(s) not done: {', '.join(failed)}")
  return 1 if failed else 0


def _eta(durations: dict[str, list[float]], remaining: tuple[list, list], jobs: int = 1) -> str:
  if not durations["train"]:
    return "known after the first run"
  train = np.mean(durations["train"]) * len(remaining[0])
  evals = (np.mean(durations["eval"]) if durations["eval"] else 0.0) * len(remaining[1])
  return _duration((train + evals) / jobs)


# --------------------------------------------------------------------------------------------------------------
# Results: read the eval reports into the dict the page is written from.


def _read_report(out_dir: str) -> dict[str, Any] | None:
  path = os.path.join(out_dir, "report.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _metrics(report: dict[str, Any]) -> dict[str, Any]:
  m = report["ensemble"]["m"]
  return {"error": report["ensemble"]["error"], "nll": report["ensemble"]["nll"],
          "ece": report["calibration"]["ensembles"][m - 1]["ece"], "last_error": report["snapshots"][-1]["error"],
          "num_snapshots": len(report["snapshots"]), "snapshot_errors": [s["error"] for s in report["snapshots"]]}


def collect_results(args: argparse.Namespace, steps: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
  """The results dict of `write_results`: every finished eval's numbers, the budget, the wall time, the commands."""
  results = {"title": "Snapshot Ensembles on Fashion-MNIST: the paper's comparison at CPU scale", "arms": {},
             "seeds": list(args.seeds), "tiny": bool(args.tiny), "generated": _now(),
             "command": args.command, "machine": _machine()}
  evals = {s["key"]: s for s in steps if s["kind"] == "eval"}
  train_arms = [s["arm"] for s in steps if s["kind"] == "train" and s["seed"] == args.seeds[0]]
  num_test = None
  for arm in [a for a in LABELS if a in train_arms or a in arms]:
    entry = {"label": LABELS[arm], "cost": "3x" if arm == TRUE_ENSEMBLE_ARM else "1x", "runs": {}}
    if arm == TRUE_ENSEMBLE_ARM:
      step = evals.get(f"eval/{TRUE_ENSEMBLE_ARM}")
      rep = _read_report(step["out_dir"]) if step and status(step) == "done" else None
      entry.update(pooled=True, pooled_seeds=list(args.seeds), workdirs=step["workdirs"] if step else [])
      if rep:
        entry["runs"]["pooled"] = {**_metrics(rep), "last_error": None}
        num_test = num_test or rep["num_test_examples"]
    else:
      source = EVAL_ARMS.get(arm, arm)
      for seed in args.seeds:
        step = evals.get(f"eval/{source}/s{seed}")
        rep = _read_report(step["out_dir"]) if step and status(step) == "done" else None
        if rep is None:
          continue
        num_test = num_test or rep["num_test_examples"]
        if arm == WEIGHT_AVERAGE_ARM:
          if not rep.get("weight_average"):
            continue
          wa = rep["weight_average"][-1]  # All M snapshots' weights averaged.
          entry["runs"][str(seed)] = {"error": wa["error"], "nll": wa["nll"], "ece": wa["ece"], "last_error": None,
                                      "m": wa["m"], "workdir": _shown(step["workdirs"][0])}
        else:
          entry["runs"][str(seed)] = {**_metrics(rep), "workdir": _shown(step["workdirs"][0])}
    results["arms"][arm] = entry
  results["num_test_examples"] = num_test
  results["budget"] = _budget(steps, args.seeds[0])
  results["figure_run"] = _figure_run(evals, args.seeds)
  state_path = os.path.join(args.out, STATE_FILE)
  state = json.load(open(state_path)) if os.path.exists(state_path) else {"steps": {}, "invocations": []}
  results["wall_time"] = {
      "seconds": sum(i["seconds"] for i in state["invocations"]), "invocations": len(state["invocations"]),
      "train_runs": sum(k.startswith("train/") for k in state["steps"]),
      "evals": sum(k.startswith("eval/") for k in state["steps"]),
      "load_average_at_start": [i.get("load_average") for i in state["invocations"]],
      "jobs": max([i.get("jobs", 1) for i in state["invocations"]] or [1]),
      "steps": {k: v["seconds"] for k, v in state["steps"].items()},
      "note": "The machine may have been shared: the load averages at each invocation's start are in the JSON."}
  results["commands"] = [shlex.join(s["argv"]) for s in steps]
  results["example_commands"] = [shlex.join(s["argv"]) for s in steps if s["seed"] == args.seeds[0]] + [
      shlex.join(s["argv"]) for s in steps if s["seed"] is None]
  results["config_file"] = CONFIG_FILE
  if not args.tiny:
    results["budget_note"], results["pilot_note"] = BUDGET_NOTE, PILOT_NOTE
  so = _load_config_module().SMOOTHOUT
  results["smoothout_note"] = (
      f"AdaSmoothOut (Wen et al. 2018; the authors' --adapt-type filter): noise bound a = {so['smoothout_a']:g} "
      f"({so['smoothout_schedule']} over training), noise `{so['smoothout_noise']}` (per filter, uniform noise of "
      f"norm a x the filter's weight norm), K = {so['smoothout_chunks']} (one fresh perturbation per batch: the "
      f"stochastic SmoothOut), on top of the alpha0 = 0.2 Snapshot Ensemble. The paper's adaptive variant with a "
      f"small bound; not tuned here.")
  return results


def _budget(steps: list[dict[str, Any]], seed: int) -> dict[str, Any]:
  train = [s for s in steps if s["kind"] == "train" and s["seed"] == seed]
  if not train:
    return {"arms": {}, "model": "n/a", "dataset": "n/a", "train_split": "", "num_train": 0, "augment": "",
            "num_epochs": 0, "total_steps": 0, "batch_size": 0, "momentum": 0, "weight_decay": 0}
  c = train[0]["config"]
  b = {k: c[k] for k in ("model", "dataset", "train_split", "augment", "num_epochs", "batch_size", "momentum",
                         "weight_decay")}
  b.update(num_train=num_train(c), total_steps=train[0]["plan"].total_steps, arms={})
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
    rep = _read_report(step["out_dir"]) if step and status(step) == "done" else None
    if rep is None:
      continue
    corr, dis = np.array(rep["diversity"]["correlation"], dtype=float), np.array(rep["diversity"]["disagreement"],
                                                                                 dtype=float)
    off = ~np.eye(len(corr), dtype=bool)
    return {"workdir": _shown(step["workdirs"][0]), "seed": seed, "last_m": rep["ensembles"],
            "first_m": rep.get("ensembles_first_m", []),
            "mean_correlation": float(np.nanmean(corr[off])) if off.any() else math.nan,
            "mean_disagreement": float(np.nanmean(dis[off])) if off.any() else math.nan,
            "error_vs_m_src": os.path.join(step["out_dir"], "error_vs_m.png"),
            "diversity_src": os.path.join(step["out_dir"], "diversity.png")}
  return None


def _machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  return f"{os.cpu_count()} CPU cores, {cpu}"


# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
  arms_all = (*_load_config_module().ARMS, *EVAL_ARMS)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", default="runs/study", help="workdirs root (default runs/study)")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
  p.add_argument("--arms", default=",".join(arms_all),
                 help=f"comma-separated subset of: {', '.join(arms_all)} (an eval-side arm trains its source arm)")
  p.add_argument("--results_dir", default=None,
                 help="where fashion_mnist.md/.json and the figures go (default docs/results; OUT/results with "
                      "--tiny)")
  p.add_argument("--dry_run", action="store_true", help="print the plan (every command and its status), run nothing")
  p.add_argument("--tiny", metavar="DATA_DIR", default=None,
                 help="the whole pipeline on tests/helpers.py's tiny generated data in DATA_DIR, a few updates per "
                      "run (the tests' budget)")
  p.add_argument("--in_process", action="store_true",
                 help="train and evaluate in this process instead of train.py / eval.py subprocesses")
  p.add_argument("--page_only", action="store_true", help="only write the page from the finished runs")
  p.add_argument("--jobs", type=int, default=1,
                 help="runs at once (default 1): 2 finished the study sooner on a 2-core CPU, where one small-model "
                      "run keeps about 1.3 cores busy; each run's reported minutes are then those of a shared machine")
  args = p.parse_args(argv)
  if args.jobs < 1 or (args.jobs > 1 and args.in_process):
    p.error(f"--jobs={args.jobs}: allowed values are integers >= 1, and 1 with --in_process")
  try:
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    p.error(f"--seeds={args.seeds!r}: expected comma-separated integers such as 0,1,2")
  if not args.seeds or len(set(args.seeds)) != len(args.seeds):
    p.error("--seeds needs at least one seed, each once")
  args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
  unknown = [a for a in args.arms if a not in arms_all]
  if unknown or not args.arms:
    p.error(f"--arms: unknown {unknown}; allowed: {', '.join(arms_all)}")
  if args.results_dir is None:
    args.results_dir = os.path.join(args.out, "results") if args.tiny else os.path.join(ROOT, "docs", "results")
  # The page shows the command that runs the study: --page_only only rewrites the page from it.
  args.command = shlex.join(["python", "scripts/study.py", *[a for a in argv if a != "--page_only"]])
  return args


def _print_plan(steps: list[dict[str, Any]], args: argparse.Namespace) -> None:
  train = [s for s in steps if s["kind"] == "train"]
  images = {s["key"]: s["plan"].total_steps * s["config"].batch_size for s in train}
  print(f"Plan: {len(train)} training runs and {len(steps) - len(train)} evaluations under {args.out}; "
        f"page and JSON in {args.results_dir}")
  for s in steps:
    extra = ""
    if s["kind"] == "train":
      extra = (f"  [{s['plan'].total_steps} updates x batch {s['config'].batch_size} = {images[s['key']]:,} "
               f"images; snapshots at {', '.join(str(x) for x in s['plan'].snapshot_steps)}]")
    print(f"  {status(s):8s} {shlex.join(s['argv'])}{extra}")
  total = sum(images.values())
  print(f"Training images in all: {total:,}; at the quickstart's 1,850 img/s that is {_duration(total / 1850)} of "
        f"training, plus start-up, compilation, per-snapshot scoring and the evaluations.")


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.tiny:
    args.tiny = os.path.abspath(args.tiny)
  args.out = _abs(os.path.abspath(args.out))  # Given relative to the current directory; held absolute.
  args.results_dir = os.path.abspath(args.results_dir)
  steps = make_plan(args.out, args.arms, args.seeds, args.tiny)
  for s in steps:
    if s["kind"] == "train":
      check_workdir(s)
  if args.dry_run:
    _print_plan(steps, args)
    return 0
  if args.in_process:
    from snapjax import cli
    cli.setup_logging()
  code = 0 if args.page_only else run_study(args, steps)
  if code == 3:
    return code
  summary = write_results(collect_results(args, steps, args.arms), args.results_dir)
  log(f"wrote {os.path.join(args.results_dir, RESULTS_NAME + '.md')} and .json")
  for c in summary["comparisons"]:
    log(f"{c['label_a']} vs {c['label_b']}: {c['verdict']}")
  return code


if __name__ == "__main__":
  sys.exit(main())
