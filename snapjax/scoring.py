"""Scores of snapshots on exact test batches: each member and each last-m ensemble, as summed `ensemble.Counts`.

The one scoring path: a snapshot's score logged when training takes it and eval.py's report both come from
`score_snapshots`.
"""
import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from snapjax import ensemble

PyTree = Any


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


@dataclasses.dataclass(frozen=True)
class Scores:
  """members[i]: snapshot i alone; last_m[m - 1]: the mean of the last m; ensemble: the mean of all M."""
  members: list[Score]
  last_m: list[Score]
  ensemble: Score


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


def score_snapshots(apply_fn: Callable[[PyTree, jax.Array], jax.Array], stacked: PyTree,
                    batches: Iterable[tuple[jax.Array, jax.Array, jax.Array]]) -> Scores:
  """Scores M stacked snapshots (`ensemble.stack_snapshots`) over every (x, y, mask) batch, one model pass each.

  Sums are exact over padded, masked batches (float64 on the host); the all-M ensemble is ensemble_predict's
  own mean, the others come from the same per-member softmaxes.
  """
  member_tot = last_m_tot = all_tot = None
  for x, y, mask in batches:
    mean_BxC, probs_MxBxC = ensemble.ensemble_predict(apply_fn, stacked, x, return_members=True)
    per_member, per_m = _member_and_last_m_counts(probs_MxBxC, y, mask)
    head = batch_counts(mean_BxC, y, mask)
    per_member, per_m = (np.asarray(a, np.float64) for a in jax.device_get((per_member, per_m)))
    if member_tot is None:
      member_tot, last_m_tot, all_tot = per_member, per_m, head
    else:
      member_tot, last_m_tot, all_tot = member_tot + per_member, last_m_tot + per_m, all_tot + head
  if member_tot is None:
    raise ValueError("batches yielded no batch: nothing to score")
  return Scores(members=[Score.from_totals(t) for t in member_tot],
                last_m=[Score.from_totals(t) for t in last_m_tot], ensemble=Score.from_totals(all_tot))
