"""Calibration (ECE, Brier, reliability) and member diversity (disagreement, softmax correlation) as batch sums.

Like `ensemble.Counts`, every statistic here is a set of per-batch sums: `calibration_counts` and
`diversity_counts` are jit-able and leave masked (padding) examples out, `.merge` adds the sums of two batches
on the host (counts as int64, float sums as float64), and the final numbers (`CalibrationCounts.ece`,
`DiversityCounts.correlation`, ...) are computed once, in float64 NumPy, from the merged totals. So splitting a
test set into padded, masked batches gives the numbers of the test set itself.

Calibration follows the top-label convention of uncertainty-baselines: an example's confidence is its largest
probability, it is accurate when that argmax equals the label, and confidences fall in ``num_bins`` equal-width
bins of [0, 1] (bin ``min(floor(c * num_bins), num_bins - 1)``, so c = 1.0 is in the last bin).

Diversity is the paper's Fig. 6 (Huang et al. 2017): the correlation of the members' softmax outputs, plus
the usual pairwise disagreement of their predictions.
"""
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.ensemble import check_metric_args


def _host_sum(a, b, dtype):
  """a + b on the host in ``dtype`` (int64/float64); traced values are added as they are, inside the trace."""
  if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
    return a + b
  return np.asarray(a, dtype) + np.asarray(b, dtype)


class CalibrationCounts(NamedTuple):
  """Per-bin sums of one or more batches that merge into the ECE, the Brier score and a reliability diagram.

  Made by `calibration_counts`; ``K = num_bins`` equal-width confidence bins of [0, 1]. Fresh from
  `calibration_counts` the fields are jax arrays (counts int32, sums float32); after `merge` they are NumPy
  int64 / float64 totals. The methods compute on the host in float64.

  Attributes:
    bin_count_K: Number of counted examples whose confidence falls in each bin.
    bin_sum_confidence_K: Sum of the confidences (max probability) of those examples.
    bin_sum_accuracy_K: Number of those examples whose argmax equals the label.
    sum_brier: Sum over counted examples of ``sum_k (p_k - onehot(label)_k)^2``.
    num_examples: Number of counted examples.

  Examples:
    >>> import jax.numpy as jnp
    >>> import snapjax
    >>> probs = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    >>> labels = jnp.array([0, 0, 1, 0])
    >>> first = snapjax.calibration_counts(probs[:2], labels[:2], num_bins=5)
    >>> total = first.merge(snapjax.calibration_counts(probs[2:], labels[2:], num_bins=5))
    >>> total.bin_count_K.tolist(), int(total.num_examples)
    ([0, 0, 1, 1, 2], 4)
    >>> round(float(total.ece()), 4), round(float(total.brier()), 4)
    (0.45, 0.63)
    >>> conf, acc, count = total.reliability()
    >>> acc.tolist()
    [nan, nan, 1.0, 0.0, 0.5]
  """
  bin_count_K: jax.Array
  bin_sum_confidence_K: jax.Array
  bin_sum_accuracy_K: jax.Array
  sum_brier: jax.Array
  num_examples: jax.Array

  def merge(self, other: "CalibrationCounts") -> "CalibrationCounts":
    """Sum with another batch's counts: int64 counts, float64 sums (on the host)."""
    if np.shape(self.bin_count_K) != np.shape(other.bin_count_K):
      raise ValueError(f"other has {np.shape(other.bin_count_K)[0]} bins, but these counts have "
                       f"{np.shape(self.bin_count_K)[0]}; make both with the same num_bins")
    dtypes = (np.int64, np.float64, np.int64, np.float64, np.int64)
    return CalibrationCounts(*(_host_sum(a, b, d) for a, b, d in zip(self, other, dtypes)))

  def ece(self) -> np.float64:
    """Expected calibration error: sum over non-empty bins of (count_b / N) * |acc_b - conf_b| (nan if N = 0)."""
    acc_K = np.asarray(self.bin_sum_accuracy_K, np.float64)
    conf_K = np.asarray(self.bin_sum_confidence_K, np.float64)
    # (count_b / N) * |sum_acc_b / count_b - sum_conf_b / count_b|; an empty bin has both sums 0.
    return np.float64(np.sum(np.abs(acc_K - conf_K)) / np.float64(self.num_examples))

  def brier(self) -> np.float64:
    """Mean Brier score ``sum_k (p_k - onehot_k)^2`` over the counted examples (nan if N = 0)."""
    return np.float64(self.sum_brier) / np.float64(self.num_examples)

  def reliability(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: (mean confidence, accuracy, count); the means are nan in empty bins. Bin b is [b/K, (b+1)/K)."""
    count_K = np.asarray(self.bin_count_K, np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
      conf_K = np.asarray(self.bin_sum_confidence_K, np.float64) / count_K
      acc_K = np.asarray(self.bin_sum_accuracy_K, np.float64) / count_K
    return conf_K, acc_K, count_K


def calibration_counts(probs_BxC: jax.Array, labels_B: jax.Array, mask_B: jax.Array | None = None,
                       num_bins: int = 15) -> CalibrationCounts:
  """The `CalibrationCounts` of one batch: per-bin count, confidence and accuracy sums, and summed Brier.

  An example counts where ``mask_B != 0`` (every example if ``mask_B`` is None). Its confidence is
  ``c = max_k p_k``, in bin ``min(floor(c * num_bins), num_bins - 1)``; it is accurate when
  ``argmax_k p_k == label``; its Brier score is ``sum_k (p_k - onehot(label)_k)^2``. Computed in float32.
  Under ``jax.jit``, ``num_bins`` must be static (``static_argnames="num_bins"``).

  Args:
    probs_BxC: Class probabilities of shape ``(batch, classes)``, e.g. from `ensemble_predict`.
    labels_B: Integer labels in ``[0, classes)``, of shape ``(batch,)``.
    mask_B: ``None``, or shape ``(batch,)`` with 0 at examples to leave out (e.g. batch padding).
    num_bins: Number of equal-width confidence bins in [0, 1], a positive int.

  Returns:
    A `CalibrationCounts`; merge them over batches with `CalibrationCounts.merge`.

  Raises:
    ValueError: If the shapes are not ``(batch, classes)``, ``(batch,)`` and ``(batch,)`` or ``None``, or
      ``num_bins`` is not a positive int.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import snapjax
    >>> probs = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    >>> c = snapjax.calibration_counts(probs, jnp.array([0, 0, 1, 0]), mask_B=jnp.array([1, 1, 1, 0]))
    >>> c.bin_count_K.shape, int(c.num_examples)
    ((15,), 3)
    >>> round(float(c.ece()), 4)
    0.5
    >>> fn = jax.jit(snapjax.calibration_counts, static_argnames="num_bins")
    >>> round(float(fn(probs, jnp.array([0, 0, 1, 0]), num_bins=10).brier()), 4)
    0.63
  """
  check_metric_args(probs_BxC, labels_B, mask_B)
  if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 1:
    raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
  num_bins = int(num_bins)
  probs_BxC = jnp.asarray(probs_BxC).astype(jnp.float32)
  labels_B = jnp.asarray(labels_B).astype(jnp.int32)
  keep_B = jnp.ones(labels_B.shape, bool) if mask_B is None else jnp.asarray(mask_B) != 0
  conf_B = jnp.max(probs_BxC, axis=-1)
  right_B = jnp.argmax(probs_BxC, axis=-1) == labels_B
  bin_B = jnp.clip(jnp.floor(conf_B * num_bins).astype(jnp.int32), 0, num_bins - 1)
  in_bin_BxK = (bin_B[:, None] == jnp.arange(num_bins, dtype=jnp.int32)[None, :]) & keep_B[:, None]
  onehot_BxC = jax.nn.one_hot(labels_B, probs_BxC.shape[-1], dtype=jnp.float32)
  brier_B = jnp.sum(jnp.square(probs_BxC - onehot_BxC), axis=-1)
  return CalibrationCounts(
      bin_count_K=jnp.sum(in_bin_BxK, axis=0, dtype=jnp.int32),
      bin_sum_confidence_K=jnp.sum(jnp.where(in_bin_BxK, conf_B[:, None], 0.0), axis=0),
      bin_sum_accuracy_K=jnp.sum(in_bin_BxK & right_B[:, None], axis=0, dtype=jnp.int32),
      sum_brier=jnp.sum(jnp.where(keep_B, brier_B, 0.0)),
      num_examples=jnp.sum(keep_B, dtype=jnp.int32))


class DiversityCounts(NamedTuple):
  """Pairwise sums over M members' softmaxes that merge into their disagreement and softmax correlation.

  Made by `diversity_counts`. Fresh from it the fields are jax arrays (counts int32, sums float32 over the
  batch); after `merge` they are NumPy int64 / float64 totals. The methods compute on the host in float64.

  For members i and j, x and y are their softmax values flattened over every counted (example, class)
  pair, ``n = num_values`` of them. ``sum_M[i]`` is sum x, ``sum_prod_MxM[i, j]`` is sum x*y and its
  diagonal is sum x^2, which is all the Pearson correlation of x and y needs.

  Attributes:
    num_disagree_MxM: Number of counted examples where the argmaxes of members i and j differ.
    sum_M: Sum of each member's softmax values over the counted examples and all classes.
    sum_prod_MxM: Sum of the products of members i's and j's softmax values, (example, class) by
      (example, class).
    num_examples: Number of counted examples N.
    num_values: Number of counted (example, class) values, N * C.

  Examples:
    >>> import jax.numpy as jnp
    >>> import snapjax
    >>> probs = jnp.array([[[0.9, 0.1], [0.3, 0.7]], [[0.6, 0.4], [0.6, 0.4]]])
    >>> d = snapjax.diversity_counts(probs[:, :1]).merge(snapjax.diversity_counts(probs[:, 1:]))
    >>> d.disagreement().tolist()
    [[0.0, 0.5], [0.5, 0.0]]
    >>> d.correlation().round(4).tolist()
    [[1.0, 0.3162], [0.3162, 1.0]]
  """
  num_disagree_MxM: jax.Array
  sum_M: jax.Array
  sum_prod_MxM: jax.Array
  num_examples: jax.Array
  num_values: jax.Array

  def merge(self, other: "DiversityCounts") -> "DiversityCounts":
    """Sum with another batch's counts: int64 counts, float64 sums (on the host)."""
    if np.shape(self.sum_M) != np.shape(other.sum_M):
      raise ValueError(f"other has {np.shape(other.sum_M)[0]} members, but these counts have "
                       f"{np.shape(self.sum_M)[0]}; both must come from the same M members")
    dtypes = (np.int64, np.float64, np.float64, np.int64, np.int64)
    return DiversityCounts(*(_host_sum(a, b, d) for a, b, d in zip(self, other, dtypes)))

  def disagreement(self) -> np.ndarray:
    """(M, M) fraction of counted examples where members i and j predict different classes; zero diagonal."""
    return np.asarray(self.num_disagree_MxM, np.float64) / np.float64(self.num_examples)

  def correlation(self) -> np.ndarray:
    """(M, M) Pearson correlation of members i's and j's flattened softmax values; ones on the diagonal.

    ``(n Sxy - Sx Sy) / sqrt((n Sxx - Sx^2) (n Syy - Sy^2))`` from the merged float64 sums, clipped to
    [-1, 1]; nan off the diagonal for a member whose softmax is constant (zero variance) or when N = 0.
    """
    n = np.float64(self.num_values)
    s_M = np.asarray(self.sum_M, np.float64)
    sxy_MxM = np.asarray(self.sum_prod_MxM, np.float64)
    cov_MxM = n * sxy_MxM - s_M[:, None] * s_M[None, :]
    var_M = np.diagonal(cov_MxM)
    with np.errstate(invalid="ignore", divide="ignore"):
      corr_MxM = np.clip(cov_MxM / np.sqrt(var_M[:, None] * var_M[None, :]), -1.0, 1.0)
    np.fill_diagonal(corr_MxM, 1.0)
    return corr_MxM


def diversity_counts(probs_MxBxC: jax.Array, mask_B: jax.Array | None = None) -> DiversityCounts:
  """The `DiversityCounts` of one batch of M members' softmaxes: pairwise disagreement and correlation sums.

  An example counts where ``mask_B != 0`` (every example if ``mask_B`` is None). Members i and j disagree
  on it when their argmaxes differ. Their correlation (`DiversityCounts.correlation`, the paper's Fig. 6)
  is the Pearson correlation of x = member i's and y = member j's softmax values flattened over all counted
  (example, class) pairs of the whole test set; the batch contributes sum x, sum x*y (and sum x^2 on the
  diagonal), in float32.

  Args:
    probs_MxBxC: Each member's class probabilities, shape ``(members, batch, classes)``, e.g. the members of
      ``ensemble_predict(..., return_members=True)``.
    mask_B: ``None``, or shape ``(batch,)`` with 0 at examples to leave out (e.g. batch padding).

  Returns:
    A `DiversityCounts`; merge them over batches with `DiversityCounts.merge`.

  Raises:
    ValueError: If the shapes are not ``(members, batch, classes)`` and ``(batch,)`` or ``None``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import snapjax
    >>> probs = jnp.array([[[0.9, 0.1], [0.3, 0.7]], [[0.6, 0.4], [0.6, 0.4]]])
    >>> d = jax.jit(snapjax.diversity_counts)(probs, jnp.array([1, 1]))
    >>> d.num_disagree_MxM.tolist(), int(d.num_values)
    ([[0, 1], [1, 0]], 4)
    >>> snapjax.diversity_counts(probs, mask_B=jnp.array([1, 0])).disagreement().tolist()
    [[0.0, 0.0], [0.0, 0.0]]
  """
  if jnp.ndim(probs_MxBxC) != 3:
    raise ValueError(f"probs_MxBxC must have shape (members, batch, classes), got shape {jnp.shape(probs_MxBxC)}")
  _, batch, num_classes = jnp.shape(probs_MxBxC)
  if mask_B is not None and jnp.shape(mask_B) != (batch,):
    raise ValueError(f"mask_B must be None or have shape ({batch},) to match probs_MxBxC, got {jnp.shape(mask_B)}")
  probs_MxBxC = jnp.asarray(probs_MxBxC).astype(jnp.float32)
  keep_B = jnp.ones((batch,), bool) if mask_B is None else jnp.asarray(mask_B) != 0
  pred_MxB = jnp.argmax(probs_MxBxC, axis=-1)
  differ_MxMxB = (pred_MxB[:, None, :] != pred_MxB[None, :, :]) & keep_B[None, None, :]
  kept_MxBxC = jnp.where(keep_B[None, :, None], probs_MxBxC, 0.0)
  sum_prod_MxM = jnp.einsum("mbc,nbc->mn", kept_MxBxC, kept_MxBxC, precision=jax.lax.Precision.HIGHEST)
  num_examples = jnp.sum(keep_B, dtype=jnp.int32)
  return DiversityCounts(
      num_disagree_MxM=jnp.sum(differ_MxMxB, axis=-1, dtype=jnp.int32),
      sum_M=jnp.sum(kept_MxBxC, axis=(1, 2)),
      sum_prod_MxM=sum_prod_MxM,
      num_examples=num_examples,
      num_values=num_examples * num_classes)
