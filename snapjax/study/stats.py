"""The study's statistics: per-arm mean +- std over seeds, paired per-seed differences, verdicts and their sentences.

Pure functions of a results dict (`snapjax.study.results.collect_results`; tested on fake ones): `summarize` adds
each run's deep-ensemble equivalent (`add_dee`: its calibrated NLL on the deep ensemble's curve), each arm's
"stats" (mean +- std over seeds of every METRICS entry, and per shift severity and ensemble size of the curves),
the "comparisons" (COMPARISONS, each with its verdict and the sentence the page prints) and the "cycle_check".
Also the number formats the page and the progress lines share (`pct`, `pm`, `duration`).
"""
import json
from typing import Any

import numpy as np

from snapjax import data, uncertainty
from snapjax.study.plan import DEEP_ENSEMBLE_ARM, DISTILL_ARM, LABELS, TRUE_ENSEMBLE_ARM, WEIGHT_AVERAGE_ARM

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
    # The methods that followed (issue 23; the numbers: ../shared/field.md).
    {"a": "fge", "b": "single", "source": "FGE paper (Garipov et al. 2018), README table", "who": "the FGE paper",
     "claim": "FGE on one budget has a lower test error than one independently trained model (CIFAR-100 "
              "PreResNet-164: 80.3% vs 78.4% accuracy)"},
    {"a": "swa", "b": "single", "source": "SWA paper (Izmailov et al. 2018), Table 1", "who": "the SWA paper",
     "claim": "SWA has a lower test error than SGD on the same budget (CIFAR-100 PreResNet-164: 78.49% -> 79.77%)"},
    {"a": DEEP_ENSEMBLE_ARM, "b": "snapshot", "source": "Ashukha et al. 2020, Table 2", "who": "Ashukha et al.",
     "claim": "a deep ensemble has a lower test error than the Snapshot Ensemble (CIFAR-100 ResNet-110, 100 "
              "members: 16.97% vs 18.48%)"},
    {"a": "snapshot", "b": "fge", "source": "Ashukha et al. 2020, Table 2", "who": "Ashukha et al.",
     "claim": "the Snapshot Ensemble has a lower test error than FGE (CIFAR-100 ResNet-110: 18.48% vs 19.64%)"},
    {"a": "swag", "b": "single", "source": "Ashukha et al. 2020, Table 2", "who": "Ashukha et al.",
     "claim": "SWAG has a lower test error than a single model (CIFAR-100 ResNet-110: 20.69% vs 22.66%)"},
    {"a": DEEP_ENSEMBLE_ARM, "b": "snapshot", "source": "Ashukha et al. 2020, Fig. 1 and Table 3",
     "who": "Ashukha et al.", "metric": "calibrated_nll",
     "claim": "a deep ensemble has a lower calibrated NLL than a Snapshot Ensemble of as many members (ImageNet, 5 "
              "members: 0.823 vs 0.865)"},
    {"a": "snapshot", "b": "single", "source": "Ashukha et al. 2020, Fig. 1", "who": "Ashukha et al.",
     "metric": "calibrated_nll",
     "claim": "the Snapshot Ensemble is worth more than one network: a lower calibrated NLL than the single model "
              "(ImageNet: deep-ensemble equivalent 2.2 at 5 snapshots)"},
    {"a": "snapshot", "b": "fge", "source": "Ashukha et al. 2020, Fig. 1", "who": "Ashukha et al.",
     "metric": "calibrated_nll",
     "claim": "the Snapshot Ensemble has a lower calibrated NLL than FGE, so a larger deep-ensemble equivalent "
              "(ImageNet: 4.2 vs 1.5 at 50 members)"},
    {"a": DISTILL_ARM, "b": "single", "source": "Hinton et al. 2015 (distillation), Section 3", "who": "Hinton et al.",
     "claim": "a student distilled from an ensemble has a lower test error than the same network trained on the "
              "labels alone"},
)
# Every scalar of a run the page reports; mean +- std over seeds of each. dee: added by `add_dee`.
METRICS = ("error", "nll", "ece", "last_error", "calibrated_nll", "ece_ts", "brier", "temperature", "aurc",
           "conformal_coverage", "conformal_size", "auroc_digits", "auroc_uniform_noise", "auroc_gaussian_noise",
           "shift_clean_error", "dee")
CURVES = ("cnll_curve", "shift_error", "shift_cnll")  # Lists of a run: per ensemble size, per shift severity.
PAIRED = ("error", "nll", "ece", "calibrated_nll")  # The paired differences of every comparison.
# How a comparison's metric is named and printed: (name, value format, unit after the difference).
METRIC_TEXT = {"error": ("test error", lambda st: pm(st, signed=True), " points"),
               "calibrated_nll": ("calibrated NLL", lambda st: pm(st, 1, 4, True), "")}
CYCLIC_ARMS = ("snapshot", "snapshot_lr0.1", "snapshot_smoothout", "single_cycle")
TIE = 1e-9  # Test errors are counts over the test set: differences this small are float noise, a tie.


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


def pct(x: float | None, signed: bool = False) -> str:
  """A fraction in points of percent, 2 decimals ('n/a' for None)."""
  return "n/a" if x is None else (f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}")


def pm(stats: dict[str, Any], scale: float = 100.0, digits: int = 2, signed: bool = False) -> str:
  """'mean +- std' (or the mean alone for one value, 'n/a' for none)."""
  if stats["mean"] is None:
    return "n/a"
  mean = f"{scale * stats['mean']:{'+' if signed else ''}.{digits}f}"
  return mean if stats["std"] is None else f"{mean} ± {scale * stats['std']:.{digits}f}"


def duration(seconds: float | None) -> str:
  """'1 h 05 min' or '6 min 30 s' ('n/a' for None)."""
  if seconds is None:
    return "n/a"
  h, rem = divmod(int(round(seconds)), 3600)
  return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


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
  metric = spec.get("metric", "error")
  out = {**spec, "metric": metric, "label_a": LABELS.get(a, a), "label_b": LABELS.get(b, b)}
  for m in PAIRED:
    diffs = paired(results, a, b, m)
    out[m] = {"per_seed": diffs, **mean_std(list(diffs.values()))}
  diffs = out[metric]["per_seed"]
  out["verdict"] = verdict(diffs)
  n, lower = len(diffs), sum(d < -TIE for d in diffs.values())
  ties = sum(abs(d) <= TIE for d in diffs.values())
  if not n:
    out["text"] = f"not run: no seed has both {out['label_a']} and {out['label_b']}."
    return out
  who = spec.get("who") or ("the paper" if spec["source"].startswith("paper") else "the claim")
  word = {"agrees": f"agrees with {who}", "disagrees": f"disagrees with {who}",
          "inconclusive": "inconclusive: the seeds disagree"}[out["verdict"]]
  name, fmt, unit = METRIC_TEXT[metric]
  one = (lambda d: pct(d, True)) if metric == "error" else (lambda d: f"{d:+.4f}")
  per_seed = ", ".join(f"seed {s}: {one(d)}" for s, d in diffs.items())
  text = (f"**{word}**. {out['label_a']} had the lower {name} in {lower} of {n} seed{'s' if n > 1 else ''}"
          f"{f' ({ties} tied)' if ties else ''}: a - b = {fmt(out[metric])}{unit} ({per_seed}).")
  if metric == "calibrated_nll":
    text += " " + _dee_text(results, a, b)
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
            f"({pct(te)}%).")
  stats = mean_std(list(fractions.values()))
  per_seed = ", ".join(f"seed {s}: {100 * f:.0f}%" for s, f in fractions.items())
  return (f"Of the gap between the Single model and the true ensemble ({pct(te)}%), the Snapshot Ensemble closes "
          f"{pm(stats, digits=0)}% ({per_seed}{note}; 100% = as good as the true ensemble, 0% = no better than "
          f"Single).")


def _dee_text(results: dict[str, Any], a: str, b: str) -> str:
  """The two arms' deep-ensemble equivalents, mean +- std over seeds."""
  parts = []
  for arm in (a, b):
    runs = list((results["arms"].get(arm, {}).get("runs") or {}).values())
    stats = mean_std([r.get("dee") for r in runs])
    bounds = ", ".join(sorted({r.get("dee_bound") for r in runs if r.get("dee_bound")}))
    parts.append(f"{LABELS.get(arm, arm)} {pm(stats, 1, 2)}" + (f" (outside the curve, {bounds}, in some seeds)"
                                                                if bounds else ""))
  return f"Deep-ensemble equivalents: {'; '.join(parts)}."


def deep_ensemble_curve(results: dict[str, Any]) -> list[float] | None:
  """The deep ensemble's calibrated NLL at sizes 1..N (its first k runs), or None when it has not run."""
  runs = (results["arms"].get(DEEP_ENSEMBLE_ARM) or {}).get("runs") or {}
  curve = next(iter(runs.values()), {}).get("dee_curve")
  return list(curve) if curve else None


def add_dee(results: dict[str, Any]) -> None:
  """Each run's deep-ensemble equivalent (in place): the size of the deep ensemble with its calibrated NLL,
  linear between sizes (`snapjax.uncertainty.deep_ensemble_equivalent`; "dee_bound" "<1" or ">N" outside)."""
  curve = deep_ensemble_curve(results)
  for entry in results["arms"].values():
    for run in (entry.get("runs") or {}).values():
      if curve and run.get("calibrated_nll") is not None:
        run["dee"], run["dee_bound"] = uncertainty.deep_ensemble_equivalent(curve, run["calibrated_nll"])
      else:
        run["dee"], run["dee_bound"] = None, None


def curve_stats(runs: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
  """mean +- std over runs at each point of a list-valued metric (as far as every run that has it reaches)."""
  lists = [r[key] for r in runs if r.get(key)]
  if not lists:
    return []
  return [mean_std([l[i] for l in lists]) for i in range(min(len(l) for l in lists))]


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


def summarize(results: dict[str, Any]) -> dict[str, Any]:
  """The results with each arm's mean +- std over seeds ("stats") and the comparisons, as written to the JSON."""
  out = json.loads(json.dumps(results))
  add_dee(out)
  for entry in out["arms"].values():
    runs = list((entry.get("runs") or {}).values())
    found = sorted({k for r in runs for k in r if k.startswith("auroc_") and k not in METRICS})
    entry["stats"] = {m: mean_std([r.get(m) for r in runs]) for m in (*METRICS, *found)}
    entry["curve_stats"] = {k: curve_stats(runs, k) for k in CURVES}
  out["cycle_check"] = cycle_check(out)
  out["comparisons"] = [compare(out, spec) for spec in COMPARISONS
                        if spec["a"] in out["arms"] or spec["b"] in out["arms"]]
  return out


# The wall-time estimate of a plan (scripts/study.py --dry_run) from a finished study's JSON (the reference).
FORWARD_FRACTION = 1 / 3  # A network's eval-mode forward pass as a fraction of its training step (forward + backward).
DIGITS_IMAGES = 1797  # scikit-learn's digits, the OOD set beside the noise sets (snapjax/ood_data.py).


def _ref_images(run: dict[str, Any], num_test: int, ood_images: int, cells: int) -> int:
  """Images each network of a reference evaluation scored: the test set, and the OOD and shift sets if it ran them."""
  ood = ood_images if any(k.startswith("auroc_") for k in run) else 0
  return num_test + ood + (run["shift_examples"] * (cells + 1) if run.get("shift_examples") else 0)


def estimate_wall(steps: list[dict[str, Any]], reference: dict[str, Any], *, num_test: int, ood_images: int,
                  shift_cells: int) -> dict[str, Any]:
  """The plan's wall time, scaled from a finished study's measured step times (its JSON's "wall_time").

  Training: the reference runs' median seconds per update (the median leaves out runs that were resumed or shared
  with other work) x each run's updates; a distill student also runs its teacher's snapshots forward,
  FORWARD_FRACTION of a training step each: on every batch when the teacher runs in the step, once per training
  image (one epoch's worth) when its soft labels are computed before training (no augmentation, the study's). Evaluation: a least-squares fit of the reference evaluations' seconds
  to a + b x (networks x images each network scored), applied to each evaluation's networks (SWAG: its samples, and
  the training batches on which each sample's BatchNorm statistics are measured) x images (the test set, the OOD
  sets, the shift cells and their clean pass). The steps' sum is divided by the reference's parallelism (its summed
  step times over its wall time: the same --jobs on the same machine). Not counted: the analyses' own NumPy time
  (temperature fits, conformal splits) beyond the reference's, and the serving measurement (seconds).
  """
  wall = reference["wall_time"]
  ref_steps = wall["steps"]
  updates = reference["budget"]["total_steps"]
  per_update = float(np.median([v / updates for k, v in ref_steps.items() if k.startswith("train/")]))
  xs, ys = [], []
  for key, seconds in ref_steps.items():
    parts = key.split("/")
    if parts[0] != "eval":
      continue
    arm = parts[1]
    entry = reference["arms"].get(arm) or {}
    run = (entry.get("runs") or {}).get("pooled" if len(parts) == 2 else parts[2][1:])
    if not run:
      continue
    n = run.get("networks") or run.get("num_snapshots") or len(entry.get("pooled_seeds") or []) or 1
    xs.append(n * _ref_images(run, reference["num_test_examples"], ood_images, shift_cells))
    ys.append(seconds)
  b, a = np.polyfit(xs, ys, 1) if len(set(xs)) > 1 else (float(np.mean(ys)) / max(np.mean(xs), 1), 0.0)
  train = evals = 0.0
  for s in steps:
    if s["kind"] == "train":
      factor = 1.0
      if s["arm"] == "distill":  # The teacher's snapshots forward: on every batch, or once per image before.
        snapshots = len(s["needs"][0]["plan"].snapshot_steps)
        c = s["config"]
        once = c.distill_soft_labels == "auto" and (c.augment or data.DATASETS[c.dataset].augment) == "none"
        factor += FORWARD_FRACTION * snapshots * (s["plan"].steps_per_epoch / s["plan"].total_steps if once else 1)
      train += s["plan"].total_steps * per_update * factor
    elif s["kind"] == "eval":
      networks, bn_images = 0, 0
      for t in s["needs"]:
        k = len(t["plan"].snapshot_steps)
        if t["config"].method == "swag":
          k = s["options"]["swag_samples"]
          bn_images += k * t["config"].swa_bn_batches * t["config"].batch_size
        networks += k
      images = num_test + ood_images + s["options"]["shift_examples"] * (shift_cells + 1)
      evals += a + b * (networks * images + bn_images)
  parallel = sum(ref_steps.values()) / wall["seconds"]
  return {"train_seconds": train, "eval_seconds": evals, "parallelism": parallel, "jobs": wall.get("jobs", 1),
          "seconds": (train + evals) / parallel, "per_update": per_update, "eval_fit": [float(a), float(b)],
          "reference_seconds": wall["seconds"], "reference_train_runs": wall["train_runs"],
          "reference_evals": wall["evals"]}
