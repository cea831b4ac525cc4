"""The study's statistics: per-arm mean +- std over seeds, paired per-seed differences, verdicts and their sentences.

Pure functions of a results dict (`snapjax.study.results.collect_results`; tested on fake ones): `summarize` adds
each arm's "stats", the "comparisons" (COMPARISONS, each with its verdict and the sentence the page prints) and the
"cycle_check". Also the number formats the page and the progress lines share (`pct`, `pm`, `duration`).
"""
import json
from typing import Any

import numpy as np

from snapjax.study.plan import LABELS, TRUE_ENSEMBLE_ARM, WEIGHT_AVERAGE_ARM

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
  per_seed = ", ".join(f"seed {s}: {pct(d, True)}" for s, d in diffs.items())
  text = (f"**{word}**. {out['label_a']} had the lower test error in {lower} of {n} seed{'s' if n > 1 else ''}"
          f"{f' ({ties} tied)' if ties else ''}: a - b = {pm(out['error'], signed=True)} points ({per_seed}).")
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
  for entry in out["arms"].values():
    runs = list((entry.get("runs") or {}).values())
    entry["stats"] = {m: mean_std([r.get(m) for r in runs]) for m in ("error", "nll", "ece", "last_error")}
  out["cycle_check"] = cycle_check(out)
  out["comparisons"] = [compare(out, spec) for spec in COMPARISONS
                        if spec["a"] in out["arms"] or spec["b"] in out["arms"]]
  return out
