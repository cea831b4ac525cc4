"""Scores of snapshots on exact test batches: each member, each last-m and first-m ensemble, and their analyses.

The one scoring path: a snapshot's score logged when training takes it and eval.py's report both come from
`score_snapshots`. Its one pass over the test set also sums what the paper's analyses need from the members'
softmaxes: calibration counts (`analysis.CalibrationCounts`: ECE, Brier, reliability) of every member and every
last-m and first-m ensemble, and the members' pairwise diversity (`analysis.DiversityCounts`).
"""
import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from snapjax import analysis, ensemble

PyTree = Any
NUM_BINS = 15  # Equal-width confidence bins of the ECE, as uncertainty-baselines.


@dataclasses.dataclass(frozen=True)
class Score:
  """Test error and mean NLL over `count` examples."""
  error: float
  nll: float
  count: int

  @classmethod
  def from_totals(cls, totals: np.ndarray) -> "Score":
    errors, sum_nll, n = (float(v) for v in totals)
    return cls(error=errors / n, nll=sum_nll / n, count=int(n))

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def _on_host(sums):
  """A batch's CalibrationCounts / DiversityCounts as the host totals `merge` makes (int64 counts, float64 sums)."""
  return sums.merge(type(sums)(*(np.zeros_like(f) for f in sums)))


def _split(stacked_counts: analysis.CalibrationCounts) -> list[analysis.CalibrationCounts]:
  """CalibrationCounts whose fields have a leading axis of n -> n CalibrationCounts."""
  return [analysis.CalibrationCounts(*(np.asarray(f)[i] for f in stacked_counts))
          for i in range(np.shape(stacked_counts.num_examples)[0])]


@dataclasses.dataclass(frozen=True)
class Scores:
  """The scores of M snapshots over a test set, and the sums of their analyses.

  members[i]: snapshot i alone; last_m[m - 1]: the mean of the last m; first_m[m - 1]: the mean of the first m;
  ensemble: the mean of all M (ensemble_predict's own). The calibration counts come in the same three lists
  (`analysis.CalibrationCounts`, NUM_BINS bins); diversity holds the members' pairwise sums.
  """
  members: list[Score]
  last_m: list[Score]
  ensemble: Score
  first_m: list[Score] = dataclasses.field(default_factory=list)
  member_calibration: list[analysis.CalibrationCounts] = dataclasses.field(default_factory=list)
  last_m_calibration: list[analysis.CalibrationCounts] = dataclasses.field(default_factory=list)
  first_m_calibration: list[analysis.CalibrationCounts] = dataclasses.field(default_factory=list)
  diversity: analysis.DiversityCounts | None = None
  groups: list[Score] = dataclasses.field(default_factory=list)  # One per row of score_snapshots' `groups`.
  outputs: "Outputs | None" = None  # With score_snapshots(keep_outputs=True): every counted example's logits.


@dataclasses.dataclass(frozen=True)
class Outputs:
  """Per-example outputs of M snapshots on the counted (mask 1) examples, in the order of the batches.

  logits_MxNxC: each snapshot's float32 logits; labels_N: int labels. Padding examples are left out, so these are
  the outputs of the test set itself, however it was batched.
  """
  logits_MxNxC: np.ndarray
  labels_N: np.ndarray


def batch_counts(probs_BxC: jax.Array, labels_B: jax.Array, mask_B: jax.Array) -> np.ndarray:
  """(errors, nll_sum, n) of one batch's probabilities, as float64 host values to add up over batches."""
  return np.asarray(jax.device_get(jnp.stack(ensemble.counts(probs_BxC, labels_B, mask_B))), np.float64)


def _stacked_counts(counts: ensemble.Counts) -> jax.Array:
  return jnp.stack(counts)  # (errors, nll_sum, n) as float32.


@jax.jit
def _member_and_last_m_counts(probs_MxBxC: jax.Array, labels_B: jax.Array, mask_B: jax.Array):
  """(errors, nll_sum, n) of each member and of each last-m ensemble, m = 1..M: two (M, 3) arrays."""
  m = probs_MxBxC.shape[0]
  per_member = jax.vmap(lambda p: _stacked_counts(ensemble.counts(p, labels_B, mask_B)))(probs_MxBxC)
  last_m = jnp.cumsum(probs_MxBxC[::-1], axis=0) / jnp.arange(1, m + 1, dtype=jnp.float32)[:, None, None]
  per_m = jax.vmap(lambda p: _stacked_counts(ensemble.counts(p, labels_B, mask_B)))(last_m)
  return per_member, per_m


@functools.partial(jax.jit, static_argnames="num_bins")
def _analysis_counts(probs_MxBxC: jax.Array, labels_B: jax.Array, mask_B: jax.Array, *, num_bins: int):
  """What the analyses sum over a batch: first-m counts, calibration of members / last-m / first-m, diversity."""
  m = probs_MxBxC.shape[0]
  sizes = jnp.arange(1, m + 1, dtype=jnp.float32)[:, None, None]
  last_m = jnp.cumsum(probs_MxBxC[::-1], axis=0) / sizes
  first_m = jnp.cumsum(probs_MxBxC, axis=0) / sizes
  per_first_m = jax.vmap(lambda p: _stacked_counts(ensemble.counts(p, labels_B, mask_B)))(first_m)
  calibration = jax.vmap(lambda p: analysis.calibration_counts(p, labels_B, mask_B, num_bins=num_bins))
  return (per_first_m, calibration(probs_MxBxC), calibration(last_m), calibration(first_m),
          analysis.diversity_counts(probs_MxBxC, mask_B))


@jax.jit
def _group_counts(probs_MxBxC: jax.Array, weights_GxM: jax.Array, labels_B: jax.Array, mask_B: jax.Array):
  """(errors, nll_sum, n) of each weighted mean of the members (one row of weights_GxM per group): (G, 3)."""
  probs_GxBxC = jnp.einsum("gm,mbc->gbc", weights_GxM, probs_MxBxC, precision=jax.lax.Precision.HIGHEST)
  return jax.vmap(lambda p: _stacked_counts(ensemble.counts(p, labels_B, mask_B)))(probs_GxBxC)


def group_weights(groups: list[list[int]], num: int) -> np.ndarray:
  """(G, num) float32 weights of the mean over each group of member indices (score_snapshots' `groups`)."""
  w = np.zeros((len(groups), num), np.float32)
  for g, members in enumerate(groups):
    w[g, members] = 1.0 / len(members)
  return w


def score_snapshots(apply_fn: Callable[[PyTree, jax.Array], jax.Array], stacked: PyTree,
                    batches: Iterable[tuple[jax.Array, jax.Array, jax.Array]], num_bins: int = NUM_BINS,
                    groups: list[list[int]] | None = None, keep_outputs: bool = False) -> Scores:
  """Scores M stacked snapshots (`ensemble.stack_snapshots`) over every (x, y, mask) batch, one model pass each.

  Sums are exact over padded, masked batches (float64 on the host); the all-M ensemble is ensemble_predict's
  own mean, the others, the calibration counts (``num_bins`` bins) and the diversity sums come from the same
  per-member softmaxes: the snapshots run once per batch. ``groups`` (lists of snapshot indices) adds the score
  of each group's ensemble (Scores.groups), from the same pass. ``keep_outputs`` also keeps every counted
  example's per-snapshot logits on the host (Scores.outputs), for the analyses that need each example.
  """
  totals = None
  weights = None if not groups else jnp.asarray(group_weights(groups, ensemble.num_members(stacked)))
  kept_logits, kept_labels = [], []
  for x, y, mask in batches:
    if keep_outputs:
      mean_BxC, probs_MxBxC, logits_MxBxC = ensemble.ensemble_predict(apply_fn, stacked, x, return_members="logits")
      counted_B = np.asarray(jax.device_get(mask)) > 0
      kept_logits.append(np.asarray(jax.device_get(logits_MxBxC))[:, counted_B])
      kept_labels.append(np.asarray(jax.device_get(y))[counted_B])
    else:
      mean_BxC, probs_MxBxC = ensemble.ensemble_predict(apply_fn, stacked, x, return_members=True)
    per_member, per_m = _member_and_last_m_counts(probs_MxBxC, y, mask)
    first, *calibration, diversity = _analysis_counts(probs_MxBxC, y, mask, num_bins=num_bins)
    head = batch_counts(mean_BxC, y, mask)
    batch = jax.device_get((per_member, per_m, first, *calibration, diversity))
    counts = [np.asarray(a, np.float64) for a in (*batch[:3], head)]
    if weights is not None:
      counts.append(np.asarray(jax.device_get(_group_counts(probs_MxBxC, weights, y, mask)), np.float64))
    sums = [_on_host(c) for c in batch[3:]]
    totals = (counts, sums) if totals is None else (
        [t + c for t, c in zip(totals[0], counts)], [t.merge(c) for t, c in zip(totals[1], sums)])
  if totals is None:
    raise ValueError("batches yielded no batch: nothing to score")
  (member_tot, last_m_tot, first_m_tot, all_tot, *group_tot), (*calibration_tot, diversity_tot) = totals
  members_cal, last_m_cal, first_m_cal = (_split(t) for t in calibration_tot)
  return Scores(members=[Score.from_totals(t) for t in member_tot],
                last_m=[Score.from_totals(t) for t in last_m_tot], ensemble=Score.from_totals(all_tot),
                first_m=[Score.from_totals(t) for t in first_m_tot], member_calibration=members_cal,
                last_m_calibration=last_m_cal, first_m_calibration=first_m_cal, diversity=diversity_tot,
                groups=[Score.from_totals(t) for t in group_tot[0]] if group_tot else [],
                outputs=Outputs(np.concatenate(kept_logits, axis=1), np.concatenate(kept_labels))
                if keep_outputs else None)


@functools.partial(jax.jit, static_argnames="num_bins")
def _member_counts(probs_MxBxC: jax.Array, labels_B: jax.Array, mask_B: jax.Array, *, num_bins: int):
  """(errors, nll_sum, n) and the calibration counts of each member."""
  per_member = jax.vmap(lambda p: _stacked_counts(ensemble.counts(p, labels_B, mask_B)))(probs_MxBxC)
  return per_member, jax.vmap(lambda p: analysis.calibration_counts(p, labels_B, mask_B, num_bins=num_bins))(
      probs_MxBxC)


def score_members(apply_fn: Callable[[PyTree, jax.Array], jax.Array], stacked: PyTree,
                  batches: Iterable[tuple[jax.Array, jax.Array, jax.Array]],
                  num_bins: int = NUM_BINS) -> tuple[list[Score], list[analysis.CalibrationCounts]]:
  """Each of P stacked models scored alone over every (x, y, mask) batch: its Score and CalibrationCounts.

  For models that are not an ensemble's members (weight averages, points on an interpolation path): no
  ensembles, no diversity; one pass, the models run one at a time (`ensemble_predict`'s "map").
  """
  member_tot = calibration_tot = None
  for x, y, mask in batches:
    _, probs_PxBxC = ensemble.ensemble_predict(apply_fn, stacked, x, return_members=True)
    per_member, calibration = jax.device_get(_member_counts(probs_PxBxC, y, mask, num_bins=num_bins))
    per_member, calibration = np.asarray(per_member, np.float64), _on_host(calibration)
    if member_tot is None:
      member_tot, calibration_tot = per_member, calibration
    else:
      member_tot, calibration_tot = member_tot + per_member, calibration_tot.merge(calibration)
  if member_tot is None:
    raise ValueError("batches yielded no batch: nothing to score")
  return [Score.from_totals(t) for t in member_tot], _split(calibration_tot)
