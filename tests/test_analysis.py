"""Tests for snapjax.analysis against plain NumPy loops over bins, examples and member pairs (float64)."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snapjax import analysis

M = 4
B = 37
C = 10
K = 15


def _dirichlet(rng, shape, alpha=0.3):
  """float32 probabilities of shape (*shape, C), each row summing to 1."""
  return rng.dirichlet(np.full(C, alpha), size=shape).astype(np.float32)


def _reference_calibration(probs_BxC, labels_B, mask_B=None, num_bins=K):
  """(ece, brier) from one loop over examples into bins, then a loop over bins; float64 throughout."""
  probs_BxC = np.asarray(probs_BxC, np.float64)
  keep = [True] * len(labels_B) if mask_B is None else [bool(m) for m in mask_B]
  bins = [[] for _ in range(num_bins)]
  brier, n = 0.0, 0
  for p, y, k in zip(probs_BxC, labels_B, keep):
    if not k:
      continue
    n += 1
    conf = p.max()
    b = min(int(np.floor(conf * num_bins)), num_bins - 1)
    bins[b].append((conf, float(np.argmax(p) == y)))
    brier += sum((p[c] - (1.0 if c == y else 0.0)) ** 2 for c in range(len(p)))
  ece = 0.0
  for members in bins:
    if members:
      conf_b = np.mean([c for c, _ in members])
      acc_b = np.mean([a for _, a in members])
      ece += len(members) / n * abs(acc_b - conf_b)
  return ece, brier / n


def _reference_diversity(probs_MxBxC, mask_B=None):
  """(disagreement, correlation) M x M from a loop over member pairs with np.corrcoef on flattened arrays."""
  probs_MxBxC = np.asarray(probs_MxBxC, np.float64)
  if mask_B is not None:
    probs_MxBxC = probs_MxBxC[:, np.asarray(mask_B) != 0]
  m = probs_MxBxC.shape[0]
  dis, corr = np.zeros((m, m)), np.zeros((m, m))
  for i in range(m):
    for j in range(m):
      pi, pj = probs_MxBxC[i], probs_MxBxC[j]
      dis[i, j] = np.mean(np.argmax(pi, -1) != np.argmax(pj, -1))
      corr[i, j] = np.corrcoef(pi.ravel(), pj.ravel())[0, 1]
  return dis, corr


def _merge_all(parts):
  return functools.reduce(lambda a, b: a.merge(b), parts)


@pytest.fixture
def case():
  rng = np.random.default_rng(0)
  probs_BxC = _dirichlet(rng, (B,))
  labels_B = rng.integers(0, C, size=B).astype(np.int32)
  # Half the labels agree with the argmax, so accuracies are spread over the bins.
  labels_B[::2] = np.argmax(probs_BxC[::2], -1)
  return probs_BxC, labels_B


def test_calibration_matches_numpy_loop(case):
  probs_BxC, labels_B = case
  ref_ece, ref_brier = _reference_calibration(probs_BxC, labels_B)
  c = analysis.calibration_counts(probs_BxC, labels_B)
  assert int(c.num_examples) == B and int(np.sum(c.bin_count_K)) == B
  np.testing.assert_allclose(c.ece(), ref_ece, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(c.brier(), ref_brier, rtol=1e-5)


def test_calibration_masked_padded_batch(case):
  probs_BxC, labels_B = case
  pad = 5
  padded_probs = np.concatenate([probs_BxC, np.tile(np.eye(C, dtype=np.float32)[:1], (pad, 1))])
  padded_labels = np.concatenate([labels_B, np.full(pad, 3, np.int32)])  # padding: confident and wrong.
  mask = np.concatenate([np.ones(B, np.int32), np.zeros(pad, np.int32)])
  mask[:4] = 0  # and some real examples left out too.
  ref_ece, ref_brier = _reference_calibration(padded_probs, padded_labels, mask)
  c = analysis.calibration_counts(padded_probs, padded_labels, mask)
  assert int(c.num_examples) == B - 4
  np.testing.assert_allclose(c.ece(), ref_ece, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(c.brier(), ref_brier, rtol=1e-5)


def test_calibration_split_merge_equals_whole(case):
  probs_BxC, labels_B = case
  whole = analysis.calibration_counts(probs_BxC, labels_B)
  # Three batches padded to a common size 16, the padding masked out.
  parts = []
  for lo, hi in ((0, 16), (16, 32), (32, B)):
    n = hi - lo
    p = np.concatenate([probs_BxC[lo:hi], np.full((16 - n, C), 1.0 / C, np.float32)])
    y = np.concatenate([labels_B[lo:hi], np.zeros(16 - n, np.int32)])
    mask = (np.arange(16) < n).astype(np.float32)
    parts.append(analysis.calibration_counts(p, y, mask))
  merged = _merge_all(parts)
  np.testing.assert_array_equal(merged.bin_count_K, whole.bin_count_K)
  np.testing.assert_array_equal(merged.bin_sum_accuracy_K, whole.bin_sum_accuracy_K)
  assert int(merged.num_examples) == B
  np.testing.assert_allclose(merged.bin_sum_confidence_K, whole.bin_sum_confidence_K, rtol=1e-6)
  np.testing.assert_allclose(merged.ece(), whole.ece(), rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(merged.brier(), whole.brier(), rtol=1e-6)
  assert merged.bin_sum_confidence_K.dtype == np.float64 and merged.bin_count_K.dtype == np.int64


def test_confidence_one_goes_in_last_bin():
  probs = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  c = analysis.calibration_counts(probs, np.array([0, 0]))
  assert np.asarray(c.bin_count_K).tolist() == [0] * (K - 1) + [2]
  assert int(c.bin_sum_accuracy_K[-1]) == 1
  conf, acc, count = c.reliability()
  assert conf[-1] == 1.0 and acc[-1] == 0.5 and count[-1] == 2
  assert np.isnan(conf[:-1]).all() and np.isnan(acc[:-1]).all()  # empty bins
  np.testing.assert_allclose(c.ece(), 0.5)
  np.testing.assert_allclose(c.brier(), 1.0)  # (0 + 0 + 2) / 2


def test_empty_bins_contribute_nothing():
  # Every example in bin 9 of 15 (confidence 0.62); the 14 empty bins add nothing.
  probs = np.tile(np.array([[0.62, 0.38]], np.float32), (5, 1))
  labels = np.array([0, 0, 0, 1, 1])
  c = analysis.calibration_counts(probs, labels)
  assert np.count_nonzero(c.bin_count_K) == 1 and int(c.bin_count_K[9]) == 5
  np.testing.assert_allclose(c.ece(), abs(0.6 - 0.62), rtol=1e-6)


def test_perfectly_calibrated_gives_zero_ece():
  # Confidence 0.75 in 4 examples of which 3 are right, confidence 0.5 in 2 of which 1 is right.
  probs = np.array([[0.75, 0.25]] * 4 + [[0.5, 0.5]] * 2, np.float32)
  labels = np.array([0, 0, 0, 1, 0, 1])
  c = analysis.calibration_counts(probs, labels, num_bins=10)
  assert c.ece() == 0.0
  conf, acc, count = c.reliability()
  np.testing.assert_array_equal(conf[[5, 7]], acc[[5, 7]])
  assert count.tolist() == [0, 0, 0, 0, 0, 2, 0, 4, 0, 0]


def test_calibration_num_bins_and_empty_counts():
  probs = np.array([[0.9, 0.1], [0.3, 0.7]], np.float32)
  labels = np.array([0, 0])
  for num_bins in (1, 2, 7):
    ref_ece, _ = _reference_calibration(probs, labels, num_bins=num_bins)
    np.testing.assert_allclose(analysis.calibration_counts(probs, labels, num_bins=num_bins).ece(), ref_ece,
                               rtol=1e-6)
  empty = analysis.calibration_counts(probs, labels, mask_B=np.zeros(2))
  assert int(empty.num_examples) == 0
  with np.errstate(invalid="ignore"):
    assert np.isnan(empty.ece()) and np.isnan(empty.brier())


@pytest.fixture
def members():
  rng = np.random.default_rng(1)
  return _dirichlet(rng, (M, B), alpha=0.5)


def test_diversity_matches_pairwise_loop(members):
  ref_dis, ref_corr = _reference_diversity(members)
  d = analysis.diversity_counts(members)
  np.testing.assert_allclose(d.disagreement(), ref_dis, atol=1e-12)
  np.testing.assert_allclose(d.correlation(), ref_corr, atol=1e-5)
  assert (np.diagonal(d.disagreement()) == 0).all() and (np.diagonal(d.correlation()) == 1).all()
  np.testing.assert_array_equal(d.correlation(), d.correlation().T)
  assert int(d.num_examples) == B and int(d.num_values) == B * C


def test_diversity_masked_examples_excluded(members):
  rng = np.random.default_rng(2)
  mask = (rng.random(B) < 0.7).astype(np.int32)
  # Garbage in the masked slots must not leak into the sums.
  garbage = np.where(mask[None, :, None] != 0, members, np.float32(7.0))
  ref_dis, ref_corr = _reference_diversity(members, mask)
  d = analysis.diversity_counts(garbage, mask)
  assert int(d.num_examples) == mask.sum()
  np.testing.assert_allclose(d.disagreement(), ref_dis, atol=1e-12)
  np.testing.assert_allclose(d.correlation(), ref_corr, atol=1e-5)


def test_diversity_split_merge_equals_whole(members):
  whole = analysis.diversity_counts(members)
  parts = []
  for lo, hi in ((0, 16), (16, 32), (32, B)):
    n = hi - lo
    p = np.concatenate([members[:, lo:hi], np.full((M, 16 - n, C), 1.0 / C, np.float32)], axis=1)
    parts.append(analysis.diversity_counts(p, (np.arange(16) < n).astype(bool)))
  merged = _merge_all(parts)
  np.testing.assert_array_equal(merged.num_disagree_MxM, whole.num_disagree_MxM)
  assert int(merged.num_examples) == B and int(merged.num_values) == B * C
  np.testing.assert_allclose(merged.sum_prod_MxM, whole.sum_prod_MxM, rtol=1e-6)
  np.testing.assert_allclose(merged.correlation(), whole.correlation(), atol=1e-6)
  np.testing.assert_array_equal(merged.disagreement(), whole.disagreement())
  assert merged.sum_prod_MxM.dtype == np.float64
  ref_dis, ref_corr = _reference_diversity(members)
  np.testing.assert_allclose(merged.correlation(), ref_corr, atol=1e-5)


def test_identical_members(members):
  same = np.stack([members[0]] * 3)
  d = analysis.diversity_counts(same)
  np.testing.assert_array_equal(d.disagreement(), np.zeros((3, 3)))
  np.testing.assert_allclose(d.correlation(), np.ones((3, 3)), atol=1e-6)


def test_jit_matches_eager(case, members):
  probs_BxC, labels_B = case
  mask = (np.arange(B) % 5 != 0).astype(np.float32)
  eager_c = analysis.calibration_counts(probs_BxC, labels_B, mask)
  jit_c = jax.jit(analysis.calibration_counts, static_argnames="num_bins")(probs_BxC, labels_B, mask)
  for a, b in zip(eager_c, jit_c):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  assert jit_c.ece() == pytest.approx(eager_c.ece(), rel=1e-6)
  eager_d = analysis.diversity_counts(members, mask)
  jit_d = jax.jit(analysis.diversity_counts)(members, mask)
  for a, b in zip(eager_d, jit_d):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  np.testing.assert_allclose(jit_d.correlation(), eager_d.correlation(), atol=1e-6)
  # Merging inside a jit (traced fields) adds in the trace.
  merged = jax.jit(lambda p, m: analysis.diversity_counts(p, m).merge(analysis.diversity_counts(p, m)))(members, mask)
  np.testing.assert_array_equal(np.asarray(merged.num_disagree_MxM), 2 * np.asarray(eager_d.num_disagree_MxM))


def test_float32_outputs_per_batch(case, members):
  c = analysis.calibration_counts(jnp.asarray(case[0], jnp.bfloat16), case[1])
  assert c.bin_sum_confidence_K.dtype == jnp.float32 and c.bin_count_K.dtype == jnp.int32
  d = analysis.diversity_counts(members)
  assert d.sum_prod_MxM.dtype == jnp.float32 and d.num_disagree_MxM.dtype == jnp.int32


@pytest.mark.parametrize("call, message", [
    (lambda: analysis.calibration_counts(np.zeros((2, 3, 4)), np.zeros(2)), "probs_BxC must have shape"),
    (lambda: analysis.calibration_counts(np.zeros((2, 3)), np.zeros(3)), "labels_B must have shape (2,)"),
    (lambda: analysis.calibration_counts(np.zeros((2, 3)), np.zeros(2), np.zeros(3)), "mask_B must be None"),
    (lambda: analysis.calibration_counts(np.zeros((2, 3)), np.zeros(2), num_bins=0), "num_bins must be"),
    (lambda: analysis.diversity_counts(np.zeros((2, 3))), "probs_MxBxC must have shape (members, batch, classes)"),
    (lambda: analysis.diversity_counts(np.zeros((2, 3, 4)), np.zeros(2)), "mask_B must be None or have shape (3,)"),
    (lambda: analysis.diversity_counts(np.zeros((2, 3, 4))).merge(analysis.diversity_counts(np.zeros((3, 3, 4)))),
     "other has 3 members"),
    (lambda: analysis.calibration_counts(np.zeros((2, 3)), np.zeros(2)).merge(
        analysis.calibration_counts(np.zeros((2, 3)), np.zeros(2), num_bins=4)), "other has 4 bins"),
])
def test_validation_errors(call, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    call()
