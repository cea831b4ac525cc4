"""eval.py's uncertainty analyses (--analyses): temperature scaling, selective prediction, conformal sets, the
deep-ensemble equivalent, out-of-distribution detection and dataset shift (`snapjax.uncertainty` holds the metrics).

The first four reuse the test pass (its per-example logits, `scoring.Outputs`) and run by default; "ood" and "shift"
pass the OOD sets and the corrupted test sets through the same scoring (`scoring.score_snapshots`). "all" asks for
every analysis, the weight-space ones included, that applies to the runs.

Report keys (report.json), all numbers over the counted test examples:
  "temperature": {"val_split", "repeats", "snapshots": [...], "ensembles": [...]}; each entry (a snapshot: workdir,
    member, step; a last-m ensemble: m) has "before" {error, nll, ece, brier}, "test_cv" (Ashukha et al.: T fitted
    on a random half of the test set, the metrics on the other half, both ways, `repeats` halvings: mean and *_std
    of temperature, error, nll, ece, brier), "test_t" (T fitted on the whole test set) and, with a val_split,
    "val" (T fitted on the validation split, the metrics on the whole test set).
  "selective": {"snapshots", "ensembles": [{aurc, error_at_80, error_at_90}], "curves": {"ensemble",
    "best_snapshot": {coverage, risk}}}; confidence = the max probability.
  "conformal": {"alphas", "repeats", "ensemble", "best_snapshot": {"thr" | "aps" | "raps": {"0.1": {coverage,
    coverage_std, size, size_std}}}}; split conformal, calibration half / test half, on the mean softmax.
  "dee": {"deep_ensembles": [{size, calibrated_nll}], "snapshots", "ensembles", "members": [{..., calibrated_nll,
    dee, bound}]}: the calibrated NLL is test_cv's; a deep ensemble of size k is the first k members' final snapshots.
  "ood": {"sets": {name: {"num_examples", "ensemble", "best_snapshot": {score: {auroc, aupr, fpr95}}}},
    "skipped": [lines], "histograms": {name: {score: {edges, in, out}}}} (the ensemble's scores).
  "shift": {"examples", "corruptions", "severities", "temperature", "cells": [{corruption, severity, "ensemble",
    "best_snapshot": {error, nll, nll_scaled, ece}}], "clean": {...}, "per_severity": {"ensemble",
    "best_snapshot": [{severity, error, nll, nll_scaled, ece}]}, and for CIFAR-10 "cifar10_c": {"cells",
    "per_severity"} of TFDS's cifar10_corrupted (or {"skipped": line})}: nll_scaled uses the clean T (the val T, else
    the T fitted on the whole clean test set).
"""
import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from snapjax import corruptions, data, experiment, ood_data, scoring, uncertainty
from snapjax.errors import ConfigError

PyTree = Any
WEIGHT_ANALYSES = ("weight_average", "interpolation")  # weight_analyses.ANALYSES, restated to keep this module low.
ANALYSES = ("temperature", "selective", "conformal", "dee", "ood", "shift")
DEFAULT = ("temperature", "selective", "conformal", "dee")  # From the test pass itself: on unless asked otherwise.
ALPHAS = (0.1, 0.05)
CV_REPEATS = 5
CONFORMAL_REPEATS = 10
SEED = 0
DEFAULT_SHIFT_EXAMPLES = 1000
SCORES = ("max_prob", "entropy", "mutual_information", "energy")


@dataclasses.dataclass
class Request:
  """What --analyses asked for: the weight-space names, the uncertainty names, and whether it said "all"."""
  weight: tuple[str, ...]
  names: tuple[str, ...]
  explicit: tuple[str, ...]
  all: bool


def parse(analyses: Sequence[str] | None, shift_examples: int = DEFAULT_SHIFT_EXAMPLES) -> Request:
  """--analyses as a Request (DEFAULT always in), or a one-line ConfigError naming every allowed value."""
  names = [str(a).strip() for a in (analyses or ()) if str(a).strip()]
  allowed = (*WEIGHT_ANALYSES, *ANALYSES, "all")
  for name in names:
    if name not in allowed:
      raise ConfigError(f"--analyses: unknown analysis {name!r}; allowed: {', '.join(allowed)} (comma-separated; "
                        f"calibration, diversity, {', '.join(DEFAULT)} are always in the report)")
  if isinstance(shift_examples, bool) or not isinstance(shift_examples, int) or shift_examples < 1:
    raise ConfigError(f"--shift_examples={shift_examples!r}; allowed: an integer >= 1 (test examples per corruption "
                      f"and severity)")
  every = "all" in names
  explicit = tuple(a for a in ANALYSES if a in names)
  weight = WEIGHT_ANALYSES if every else tuple(a for a in WEIGHT_ANALYSES if a in names)
  wanted = set(DEFAULT) | set(explicit) | (set(ANALYSES) if every else set())
  return Request(weight=weight, names=tuple(a for a in ANALYSES if a in wanted), explicit=explicit, all=every)


@dataclasses.dataclass
class Plan:
  """The analyses to run and the data they need, checked and loaded before anything is restored."""
  names: tuple[str, ...]
  val_split: str | None = None
  val_arrays: tuple[np.ndarray, np.ndarray] | None = None
  ood: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  ood_skipped: list[str] = dataclasses.field(default_factory=list)
  shift_examples: int = DEFAULT_SHIFT_EXAMPLES
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def keep_outputs(self) -> bool:
    return bool(self.names)


def _check_val_split(exp: experiment.Experiment, split: str) -> None:
  """val_split must be an in-memory training split disjoint from the run's training split (when both are
  slices of the same split of known size)."""
  if not exp.spec.in_memory:
    raise ConfigError(f"val_split={split!r}: only in-memory datasets take a validation split; {exp.spec.name} is "
                      f"streamed")
  train = exp.config.train_split or exp.spec.train_split
  sizes = {"fashion_mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000}
  if exp.spec.name not in sizes:
    return
  total = {"train": sizes[exp.spec.name], "test": exp.spec.num_eval}
  (a, sa), (b, sb) = data.slice_split(split, total), data.slice_split(train, total)
  if a == b and set(range(total[a])[sa]) & set(range(total[b])[sb]):
    raise ConfigError(f"val_split={split!r} overlaps the training split {train!r}: the validation images must never "
                      f"be trained on (e.g. train[-5000:] with train_split=train[:10000])")
  if a == "test":
    raise ConfigError(f"val_split={split!r} is taken from the test split; name a part of the training split")


def prepare(request: Request, exp: experiment.Experiment, *, num_independent: int, shift_examples: int) -> Plan:
  """The Plan: drops what does not apply (dee with one member, all of it on several processes), loads the
  validation split and the OOD sets; ConfigError where an analysis asked for by name cannot run."""
  names = list(request.names)
  notes = []
  if jax.process_count() > 1:
    if request.explicit:
      raise ConfigError(f"--analyses={','.join(request.explicit)} runs in one process (it keeps the test outputs on "
                        f"one host), not in {jax.process_count()}")
    return Plan(names=(), notes=["uncertainty analyses skipped: several processes"])
  if num_independent < 2:
    if "dee" in request.explicit:
      raise ConfigError("--analyses=dee needs at least 2 independently trained networks: give several --workdir "
                        "(e.g. runs with different seeds) or a run with num_members >= 2")
    names.remove("dee")
    notes.append("deep-ensemble equivalent skipped: one independently trained network (give several --workdir)")
  for name in ("ood", "shift"):
    if name in names and not exp.spec.in_memory:
      if name in request.explicit:
        raise ConfigError(f"--analyses={name} needs an in-memory dataset; {exp.spec.name} is streamed")
      names.remove(name)
      notes.append(f"{name} skipped: {exp.spec.name} is streamed")
  plan = Plan(names=tuple(names), shift_examples=shift_examples, notes=notes)
  split = exp.config.get("val_split", "") or ""
  if split and plan.names:
    _check_val_split(exp, split)
    plan.val_split, plan.val_arrays = split, exp.load_split(split)
  if "ood" in plan.names:
    loaders, plan.ood_skipped = ood_data.ood_sets(exp.spec, exp.config.data_dir or None)
    plan.ood = {name: load() for name, load in loaders.items()}
  return plan


def _pass(exp, stacked, arrays, batch_size) -> scoring.Outputs:
  """Per-example logits of every snapshot on (images, labels): the test pass's own scoring, on other data."""
  return scoring.score_snapshots(exp.apply_fn, stacked, exp.test_batches(batch_size, arrays),
                                 keep_outputs=True).outputs


class _Models:
  """Log-probabilities of the snapshots and of any group of them (the group's indices sorted, computed once, so
  one set of networks gives one result however it is reached)."""

  def __init__(self, logits_MxNxC: np.ndarray):
    self.logits = logits_MxNxC
    self._cache, self._cv = {}, {}

  def logp(self, idx: Sequence[int]) -> np.ndarray:
    key = tuple(sorted(int(i) for i in idx))
    if key not in self._cache:
      self._cache[key] = uncertainty.log_mean_probs(self.logits[list(key)])
    return self._cache[key]

  def cross_validated(self, idx: Sequence[int], labels: np.ndarray) -> dict[str, float]:
    """`uncertainty.cross_validated_temperature` of a group (computed once per group)."""
    key = tuple(sorted(int(i) for i in idx))
    if key not in self._cv:
      self._cv[key] = uncertainty.cross_validated_temperature(self.logp(key), labels, repeats=CV_REPEATS, seed=SEED)
    return self._cv[key]


def _entries(steps, member_ids, num) -> tuple[list[tuple[dict, list[int]]], list[tuple[dict, list[int]]]]:
  """(snapshot entries, last-m ensemble entries): (report label, member indices) of each."""
  snaps = [({"snapshot": i + 1, "workdir": wd, "member": k, "step": st}, [i])
           for i, ((wd, st), k) in enumerate(zip(steps, member_ids))]
  return snaps, [({"m": m}, list(range(num - m, num))) for m in range(1, num + 1)]


def _best(snapshot_errors: Sequence[float]) -> int:
  return min(range(len(snapshot_errors)), key=lambda i: snapshot_errors[i])


def temperature_entries(models: _Models, labels, entries, val: _Models | None, val_labels) -> list[dict]:
  out = []
  for label, idx in entries:
    logp = models.logp(idx)
    e = {**label, "before": {**uncertainty.metrics(logp, labels),
                             "reliability": uncertainty.reliability(np.exp(logp), labels)},
         "test_cv": models.cross_validated(idx, labels)}
    t = uncertainty.fit_temperature(logp, labels)
    scaled = uncertainty.scale(logp, t)
    e["test_t"] = {"temperature": t, **uncertainty.metrics(scaled, labels),
                   "reliability": uncertainty.reliability(np.exp(scaled), labels)}
    if val is not None:
      t = uncertainty.fit_temperature(val.logp(idx), val_labels)
      e["val"] = {"temperature": t, **uncertainty.metrics(uncertainty.scale(logp, t), labels)}
    out.append(e)
  return out


def _selective(logp, labels, curve=False) -> dict:
  s = uncertainty.selective(np.max(logp, axis=-1), np.argmax(logp, axis=-1) == labels)
  return s if curve else {k: v for k, v in s.items() if k != "curve"}


def _conformal(logp, labels) -> dict:
  probs = np.exp(logp)
  return {method: {str(alpha): uncertainty.split_conformal(probs, labels, alpha, method, repeats=CONFORMAL_REPEATS,
                                                           seed=SEED) for alpha in ALPHAS}
          for method in uncertainty.CONFORMAL_METHODS}


def _cnll(models: _Models, labels, idx) -> float:
  return models.cross_validated(idx, labels)["nll"]


def dee_entries(models, labels, snaps, ensembles, member_groups_, finals) -> dict:
  curve = [_cnll(models, labels, finals[:k]) for k in range(1, len(finals) + 1)]

  def entry(label, idx):
    value = _cnll(models, labels, idx)
    k, bound = uncertainty.deep_ensemble_equivalent(curve, value)
    return {**label, "calibrated_nll": value, "dee": k, "bound": bound}

  members = []
  for n, idx in enumerate(member_groups_):
    members += [entry({"member_index": n, "m": m}, idx[len(idx) - m:]) for m in range(1, len(idx) + 1)]
  return {"deep_ensembles": [{"size": k + 1, "calibrated_nll": v} for k, v in enumerate(curve)],
          "snapshots": [entry(l, i) for l, i in snaps], "ensembles": [entry(l, i) for l, i in ensembles],
          "members": members}


def _histogram(a, b, bins=30) -> dict:
  lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
  edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
  return {"edges": edges.tolist(), "in": np.histogram(a, edges)[0].tolist(), "out": np.histogram(b, edges)[0].tolist()}


def ood_entries(plan: Plan, exp, stacked, test: _Models, head_idx, best_idx, batch_size) -> dict:
  sets, hists = {}, {}
  ins = {"ensemble": uncertainty.ood_scores(test.logits[head_idx]),
         "best_snapshot": uncertainty.ood_scores(test.logits[best_idx])}
  for name, images in plan.ood.items():
    start = time.perf_counter()
    logits = _pass(exp, stacked, (images, np.zeros(len(images), np.int32)), batch_size).logits_MxNxC
    entry = {"num_examples": len(images)}
    for model, idx in (("ensemble", head_idx), ("best_snapshot", best_idx)):
      outs = uncertainty.ood_scores(logits[idx])
      entry[model] = {s: uncertainty.ood_metrics(ins[model][s], outs[s]) for s in SCORES if s in outs}
      if model == "ensemble":
        hists[name] = {s: _histogram(ins[model][s], outs[s]) for s in SCORES if s in outs}
    sets[name] = entry
    logging.info("OOD %s: %d images in %.1f s; ensemble AUROC (max prob) %.4f", name, len(images),
                 time.perf_counter() - start, entry["ensemble"]["max_prob"]["auroc"])
  return {"sets": sets, "skipped": plan.ood_skipped, "histograms": hists}


def _shift_metrics(logp, labels, t) -> dict:
  probs = np.exp(logp)
  return {"error": uncertainty.error(logp, labels), "nll": uncertainty.nll(logp, labels),
          "nll_scaled": uncertainty.nll(uncertainty.scale(logp, t), labels), "ece": uncertainty.ece(probs, labels)}


def shift_entries(plan: Plan, exp, stacked, test_arrays, temps: dict[str, float], head_idx, best_idx,
                  batch_size) -> dict:
  images, labels = (a[: plan.shift_examples] for a in test_arrays)
  models = (("ensemble", head_idx), ("best_snapshot", best_idx))

  def metrics(logits, y):
    return {name: _shift_metrics(uncertainty.log_mean_probs(logits[idx]), y, temps[name]) for name, idx in models}

  def cell(x, y=labels):
    return metrics(_pass(exp, stacked, (x, y), batch_size).logits_MxNxC, y)

  def means(cells):
    return {name: [{"severity": s, **{k: float(np.mean([c[name][k] for c in cells if c["severity"] == s]))
                                      for k in ("error", "nll", "nll_scaled", "ece")}}
                   for s in sorted({c["severity"] for c in cells})] for name, _ in models}

  start, cells = time.perf_counter(), []
  clean = cell(images)
  n, severities = len(labels), corruptions.SEVERITIES
  for name in corruptions.CORRUPTIONS:  # A corruption's severities in one pass (a fifth of the calls), split per cell.
    shifted = np.concatenate([corruptions.corrupt(images, name, severity, seed=SEED) for severity in severities])
    logits = _pass(exp, stacked, (shifted, np.tile(labels, len(severities))), batch_size).logits_MxNxC
    for k, severity in enumerate(severities):
      cells.append({"corruption": name, "severity": severity, **metrics(logits[:, k * n:(k + 1) * n], labels)})
    logging.info("Shift %s: 5 severities x %d images (%.0f s so far)", name, len(labels), time.perf_counter() - start)
  out = {"examples": len(labels), "corruptions": list(corruptions.CORRUPTIONS),
         "severities": list(corruptions.SEVERITIES), "temperature": temps, "clean": clean, "cells": cells,
         "per_severity": means(cells)}
  if exp.spec.name == "cifar10":  # TFDS's CIFAR-10-C beside snapjax's own corruptions, when prepared.
    configs = ood_data.cifar10_c_configs(exp.config.data_dir or None)
    if configs:
      c_cells = [{"corruption": name, "severity": severity,
                  **cell(*ood_data.load_cifar10_c(exp.config.data_dir or None, name, severity, plan.shift_examples))}
                 for name, severity in configs]
      out["cifar10_c"] = {"cells": c_cells, "per_severity": means(c_cells)}
    else:
      out["cifar10_c"] = {"skipped": f"{ood_data.CIFAR10_C} is not prepared in the TFDS data_dir "
                                     f"(tfds build {ood_data.CIFAR10_C} to add it)"}
  return out


def run(plan: Plan, exp: experiment.Experiment, stacked: PyTree, outputs: scoring.Outputs, *,
        steps: list[tuple[str, int]], member_ids: list[int], groups: list[list[int]], finals: list[int],
        last_m: int, test_arrays: tuple[np.ndarray, np.ndarray] | None,
        eval_batch_size: int | None) -> dict[str, Any]:
  """The report entries of the planned analyses, from the test pass's outputs (and passes over OOD / shifted data)."""
  if not plan.names:
    return {"uncertainty_notes": plan.notes} if plan.notes else {}
  start = time.perf_counter()
  labels = outputs.labels_N
  test = _Models(outputs.logits_MxNxC)
  num = test.logits.shape[0]
  snaps, ensembles = _entries(steps, member_ids, num)
  head_idx = list(range(num - last_m, num))
  best = _best([uncertainty.error(test.logp([i]), labels) for i in range(num)])
  report: dict[str, Any] = {}
  val = val_labels = None
  if plan.val_arrays is not None:
    val_out = _pass(exp, stacked, plan.val_arrays, eval_batch_size)
    val, val_labels = _Models(val_out.logits_MxNxC), val_out.labels_N
  if "temperature" in plan.names:
    report["temperature"] = {"val_split": plan.val_split, "repeats": CV_REPEATS,
                             "snapshots": temperature_entries(test, labels, snaps, val, val_labels),
                             "ensembles": temperature_entries(test, labels, ensembles, val, val_labels)}
  if "selective" in plan.names:
    report["selective"] = {
        "snapshots": [{**l, **_selective(test.logp(i), labels)} for l, i in snaps],
        "ensembles": [{**l, **_selective(test.logp(i), labels)} for l, i in ensembles],
        "curves": {"ensemble": _selective(test.logp(head_idx), labels, True)["curve"],
                   "best_snapshot": _selective(test.logp([best]), labels, True)["curve"]}}
  if "conformal" in plan.names:
    report["conformal"] = {"alphas": list(ALPHAS), "repeats": CONFORMAL_REPEATS, "best_snapshot_index": best + 1,
                           "ensemble": _conformal(test.logp(head_idx), labels),
                           "best_snapshot": _conformal(test.logp([best]), labels)}
  if "dee" in plan.names:
    report["dee"] = dee_entries(test, labels, snaps, ensembles, groups, finals)
  batch_size = eval_batch_size
  if "ood" in plan.names:
    report["ood"] = ood_entries(plan, exp, stacked, test, head_idx, [best], batch_size)
  if "shift" in plan.names:
    temps = {}
    for name, idx in (("ensemble", head_idx), ("best_snapshot", [best])):
      source = val.logp(idx) if val is not None else test.logp(idx)
      temps[name] = uncertainty.fit_temperature(source, val_labels if val is not None else labels)
    report["shift"] = shift_entries(plan, exp, stacked, test_arrays, temps, head_idx, [best], batch_size)
  if plan.notes:
    report["uncertainty_notes"] = plan.notes
  logging.info("Uncertainty analyses (%s): %.1f s", ", ".join(plan.names), time.perf_counter() - start)
  return report
