"""Uncertainty metrics of an ensemble's per-example outputs, as the field compares ensembles.

Temperature scaling of the ensemble (Ashukha et al., ICLR 2020: T acts on the ensemble's log mean probability,
``softmax(log(mean_m p_m) / T)``), out-of-distribution detection (AUROC, AUPR with OOD positive, FPR at 95% TPR),
split conformal prediction sets (THR / LAC, APS, RAPS), selective prediction (risk-coverage, AURC) and the
deep-ensemble equivalent. Everything is host NumPy in float64 over the counted examples (`scoring.Outputs` drops
padding), so the numbers are those of the data set itself however it was batched.

Shapes in names: M members, N examples, C classes. Log-probabilities come from logits (`log_mean_probs`), so a
probability that underflows float32 still has a finite log.
"""
import math
from typing import Sequence

import numpy as np
from scipy import special, stats

NUM_BINS = 15  # ECE bins, as scoring.NUM_BINS (uncertainty-baselines).
LOG_T_RANGE = (-7.0, 7.0)  # T is searched in [e^-7, e^7].
CONFORMAL_METHODS = ("thr", "aps", "raps")
RAPS_LAMBDA, RAPS_K = 0.01, 2  # RAPS's penalty lambda * (rank - k_reg)^+ (Angelopoulos et al. 2021).


def _check_labels(logp_NxC: np.ndarray, labels_N: np.ndarray) -> None:
  if np.ndim(logp_NxC) != 2 or np.ndim(labels_N) != 1 or len(labels_N) != len(logp_NxC):
    raise ValueError(f"expected (N, C) log-probabilities and N labels, got shapes {np.shape(logp_NxC)} and "
                     f"{np.shape(labels_N)}")
  if len(labels_N) == 0:
    raise ValueError("no examples: the metrics need at least one")


def log_softmax(logits: np.ndarray) -> np.ndarray:
  """float64 log-softmax over the last axis."""
  z = np.asarray(logits, np.float64)
  return z - special.logsumexp(z, axis=-1, keepdims=True)


def log_mean_probs(logits_MxNxC: np.ndarray) -> np.ndarray:
  """The ensemble's log mean probability, ``logsumexp_m log_softmax(z_m) - log M``: (N, C) float64."""
  logits_MxNxC = np.asarray(logits_MxNxC)
  if logits_MxNxC.ndim != 3 or logits_MxNxC.shape[0] < 1:
    raise ValueError(f"expected logits of shape (M, N, C) with M >= 1, got {logits_MxNxC.shape}")
  return special.logsumexp(log_softmax(logits_MxNxC), axis=0) - math.log(logits_MxNxC.shape[0])


def scale(logp_NxC: np.ndarray, temperature: float) -> np.ndarray:
  """Temperature-scaled log-probabilities, ``log_softmax(logp / T)``."""
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  return log_softmax(np.asarray(logp_NxC, np.float64) / temperature)


def nll(logp_NxC: np.ndarray, labels_N: np.ndarray) -> float:
  """Mean negative log-likelihood of the labels."""
  _check_labels(logp_NxC, labels_N)
  return float(-np.mean(np.asarray(logp_NxC, np.float64)[np.arange(len(labels_N)), labels_N]))


def error(logp_NxC: np.ndarray, labels_N: np.ndarray) -> float:
  """Top-1 error rate."""
  _check_labels(logp_NxC, labels_N)
  return float(np.mean(np.argmax(logp_NxC, axis=-1) != labels_N))


def ece(probs_NxC: np.ndarray, labels_N: np.ndarray, num_bins: int = NUM_BINS) -> float:
  """Top-label ECE over equal-width bins (bin ``min(floor(conf * K), K - 1)``, as `analysis.calibration_counts`)."""
  _check_labels(probs_NxC, labels_N)
  conf = np.max(probs_NxC, axis=-1)
  correct = (np.argmax(probs_NxC, axis=-1) == labels_N).astype(np.float64)
  bins = np.minimum(np.floor(conf * num_bins).astype(np.int64), num_bins - 1)
  count = np.bincount(bins, minlength=num_bins)
  gap = np.abs(np.bincount(bins, correct, num_bins) - np.bincount(bins, conf, num_bins))
  return float(np.sum(gap) / len(labels_N)) if count.sum() else float("nan")


def reliability(probs_NxC: np.ndarray, labels_N: np.ndarray, num_bins: int = NUM_BINS) -> dict[str, list]:
  """Per bin (as `ece`): mean confidence, accuracy (None where empty) and count."""
  _check_labels(probs_NxC, labels_N)
  conf = np.max(probs_NxC, axis=-1)
  correct = (np.argmax(probs_NxC, axis=-1) == labels_N).astype(np.float64)
  bins = np.minimum(np.floor(conf * num_bins).astype(np.int64), num_bins - 1)
  count = np.bincount(bins, minlength=num_bins)
  mean = lambda w: [float(a / c) if c else None for a, c in zip(np.bincount(bins, w, num_bins), count)]
  return {"confidence": mean(conf), "accuracy": mean(correct), "count": count.tolist()}


def brier(probs_NxC: np.ndarray, labels_N: np.ndarray) -> float:
  """Mean over examples of ``sum_k (p_k - onehot(label)_k)^2``."""
  _check_labels(probs_NxC, labels_N)
  p = np.asarray(probs_NxC, np.float64).copy()
  p[np.arange(len(labels_N)), labels_N] -= 1.0
  return float(np.mean(np.sum(p * p, axis=-1)))


def metrics(logp_NxC: np.ndarray, labels_N: np.ndarray, num_bins: int = NUM_BINS) -> dict[str, float]:
  """{"error", "nll", "ece", "brier"} of log-probabilities."""
  probs = np.exp(logp_NxC)
  return {"error": error(logp_NxC, labels_N), "nll": nll(logp_NxC, labels_N),
          "ece": ece(probs, labels_N, num_bins), "brier": brier(probs, labels_N)}


def _nll_slope(beta: float, logp_NxC: np.ndarray, target_N: np.ndarray) -> float:
  """d/d(beta) of the mean NLL of log_softmax(beta * logp): mean over examples of E_softmax[logp] - logp_label."""
  q = np.exp(log_softmax(beta * logp_NxC))
  return float(np.mean(np.sum(q * logp_NxC, axis=-1) - target_N))


def fit_temperature(logp_NxC: np.ndarray, labels_N: np.ndarray) -> float:
  """The T > 0 minimising the mean NLL of ``log_softmax(logp / T)``.

  The NLL is convex in beta = 1 / T (a log-sum-exp of functions linear in beta), so its slope is monotone and
  bisection on log beta over LOG_T_RANGE finds the unique minimum to float64 precision; a minimum beyond the
  range (e.g. a separable set, whose NLL falls without bound as T -> 0) gives the range's end.

  Examples:
    >>> import numpy as np
    >>> from snapjax import uncertainty
    >>> logits = np.array([[[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]])  # One member, 4 examples.
    >>> logp = uncertainty.log_mean_probs(logits)
    >>> t = uncertainty.fit_temperature(logp, np.array([0, 1, 1, 0]))  # 3 of 4 right: softmax(4 / T) = 3/4.
    >>> round(t, 3), round(uncertainty.nll(uncertainty.scale(logp, t), np.array([0, 1, 1, 0])), 4)
    (3.641, 0.5623)
  """
  _check_labels(logp_NxC, labels_N)
  logp = np.asarray(logp_NxC, np.float64)
  logp = np.maximum(logp, -1e200)  # A log(0) stays finite: beta * it underflows to probability 0.
  target = logp[np.arange(len(labels_N)), labels_N]
  lo, hi = -LOG_T_RANGE[1], -LOG_T_RANGE[0]  # log beta.
  if _nll_slope(math.exp(lo), logp, target) >= 0:
    return math.exp(-lo)
  if _nll_slope(math.exp(hi), logp, target) <= 0:
    return math.exp(-hi)
  for _ in range(64):
    mid = 0.5 * (lo + hi)
    if _nll_slope(math.exp(mid), logp, target) < 0:
      lo = mid
    else:
      hi = mid
  return math.exp(-0.5 * (lo + hi))


def split_halves(n: int, repeats: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Ashukha et al.'s splits: `repeats` random halvings of n examples, each used both ways (2 * repeats folds)."""
  rng = np.random.default_rng(seed)
  folds = []
  for _ in range(repeats):
    perm = rng.permutation(n)
    a, b = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
    folds += [(a, b), (b, a)]
  return folds


def cross_validated_temperature(logp_NxC: np.ndarray, labels_N: np.ndarray, *, repeats: int = 5, seed: int = 0,
                                num_bins: int = NUM_BINS) -> dict[str, float]:
  """T fitted on one half of the data and the metrics taken on the other, both ways, `repeats` random halvings.

  Returns the mean and std over the 2 * repeats folds of T and of the scaled error, nll, ece and brier
  ("nll", "nll_std", ...), and "folds".
  """
  _check_labels(logp_NxC, labels_N)
  if len(labels_N) < 2:
    raise ValueError("cross-validated temperature scaling needs at least 2 examples")
  rows = []
  for fit, score in split_halves(len(labels_N), repeats, seed):
    t = fit_temperature(logp_NxC[fit], labels_N[fit])
    rows.append({"temperature": t, **metrics(scale(logp_NxC[score], t), labels_N[score], num_bins)})
  out = {"folds": len(rows)}
  for k in rows[0]:
    values = np.array([r[k] for r in rows])
    out[k], out[f"{k}_std"] = float(values.mean()), float(values.std())
  return out


# ----------------------------------------------------------------------------- out-of-distribution detection

def entropy(probs_xC: np.ndarray) -> np.ndarray:
  """Shannon entropy (nats) over the last axis; 0 log 0 = 0."""
  p = np.asarray(probs_xC, np.float64)
  return -np.sum(special.xlogy(p, p), axis=-1)


def ood_scores(logits_MxNxC: np.ndarray) -> dict[str, np.ndarray]:
  """Per-example OOD scores, higher = more likely out-of-distribution.

  "max_prob": minus the ensemble's max probability; "entropy": entropy of the mean probability; "energy": minus
  logsumexp of the members' mean logits; "mutual_information" (M > 1 only): entropy of the mean minus the members'
  mean entropy.
  """
  logits_MxNxC = np.asarray(logits_MxNxC, np.float64)
  logp = log_mean_probs(logits_MxNxC)
  mean_p = np.exp(logp)
  out = {"max_prob": -np.max(mean_p, axis=-1), "entropy": entropy(mean_p),
         "energy": -special.logsumexp(np.mean(logits_MxNxC, axis=0), axis=-1)}
  if logits_MxNxC.shape[0] > 1:
    member_h = np.mean(entropy(np.exp(log_softmax(logits_MxNxC))), axis=0)
    out["mutual_information"] = np.maximum(out["entropy"] - member_h, 0.0)
  return out


def _check_scores(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(scores_in, np.float64).ravel(), np.asarray(scores_out, np.float64).ravel()
  if not len(a) or not len(b):
    raise ValueError(f"OOD metrics need in-distribution and OOD scores, got {len(a)} and {len(b)}")
  return a, b


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
  """Area under the ROC curve, OOD positive: P(out > in) + P(out = in) / 2 (Mann-Whitney U, midranks for ties).

  Examples:
    >>> from snapjax import uncertainty
    >>> uncertainty.auroc([0.1, 0.2, 0.5], [0.5, 0.9])  # 5 of 6 pairs ordered, one tie.
    0.9166666666666666
    >>> uncertainty.ood_metrics([0.1, 0.2, 0.5], [0.5, 0.9])["fpr95"]  # Finding both OOD also flags 0.5.
    0.3333333333333333
  """
  a, b = _check_scores(scores_in, scores_out)
  ranks = stats.rankdata(np.concatenate([a, b]))
  return float((ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def _threshold_counts(scores_in, scores_out):
  """(true positives, false positives) at each distinct score taken as threshold (score >= t is called OOD)."""
  a, b = _check_scores(scores_in, scores_out)
  s = np.concatenate([a, b])
  y = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
  order = np.argsort(-s, kind="stable")
  s, y = s[order], y[order]
  last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # The last example of each group of equal scores.
  return np.cumsum(y)[last], np.cumsum(1 - y)[last], len(b), len(a)


def aupr(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
  """Average precision with OOD positive: sum over thresholds of (recall step) x precision (as sklearn)."""
  tp, fp, pos, _ = _threshold_counts(scores_in, scores_out)
  precision, recall = tp / (tp + fp), tp / pos
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(scores_in: np.ndarray, scores_out: np.ndarray, tpr: float = 0.95) -> float:
  """The lowest false-positive rate (in-distribution called OOD) of a threshold that finds >= tpr of the OOD set."""
  tp, fp, pos, neg = _threshold_counts(scores_in, scores_out)
  return float(np.min(fp[tp / pos >= tpr - 1e-12]) / neg)


def ood_metrics(scores_in: np.ndarray, scores_out: np.ndarray) -> dict[str, float]:
  """{"auroc", "aupr", "fpr95"} of one score, OOD positive."""
  return {"auroc": auroc(scores_in, scores_out), "aupr": aupr(scores_in, scores_out),
          "fpr95": fpr_at_tpr(scores_in, scores_out, 0.95)}


# ----------------------------------------------------------------------------- conformal prediction

def conformal_scores(probs_NxC: np.ndarray, method: str, u_N: np.ndarray | None = None, *,
                     lam: float = RAPS_LAMBDA, k_reg: int = RAPS_K) -> np.ndarray:
  """Non-conformity of every (example, class): (N, C); a class is in the set when its score <= the quantile.

  "thr" (LAC): 1 - p_c. "aps": the mass of the classes ranked above c plus u * p_c (u = 1: not randomised).
  "raps": aps + lam * max(0, rank_c - k_reg), rank 1 for the most probable class. Ties in p keep class order.
  """
  if method not in CONFORMAL_METHODS:
    raise ValueError(f"method={method!r}; allowed: {', '.join(CONFORMAL_METHODS)}")
  p = np.asarray(probs_NxC, np.float64)
  if method == "thr":
    return 1.0 - p
  u = np.ones(len(p)) if u_N is None else np.asarray(u_N, np.float64)
  order = np.argsort(-p, axis=-1, kind="stable")
  rank = np.argsort(order, axis=-1, kind="stable")  # 0-based rank of each class.
  cum = np.take_along_axis(np.cumsum(np.take_along_axis(p, order, -1), axis=-1), rank, -1)
  score = cum - p + u[:, None] * p
  if method == "raps":
    score = score + lam * np.maximum(rank + 1 - k_reg, 0)
  return score


def conformal_quantile(cal_scores_N: np.ndarray, alpha: float) -> float:
  """The ceil((n + 1)(1 - alpha))-th smallest calibration score (inf when that exceeds n)."""
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
  s = np.sort(np.asarray(cal_scores_N, np.float64))
  k = math.ceil((len(s) + 1) * (1 - alpha))
  return float(s[k - 1]) if k <= len(s) else math.inf


def split_conformal(probs_NxC: np.ndarray, labels_N: np.ndarray, alpha: float, method: str, *, repeats: int = 10,
                    seed: int = 0, randomized: bool = True) -> dict[str, float]:
  """Split conformal sets: calibrate on a random half, measure coverage and mean set size on the other half.

  APS and RAPS draw u ~ U(0, 1) per example when randomized. Returns the mean and std over `repeats` random
  halvings of "coverage" and "size".

  Examples:
    >>> import numpy as np
    >>> from snapjax import uncertainty
    >>> rng = np.random.default_rng(0)
    >>> probs = rng.dirichlet(np.ones(5), size=2000)
    >>> labels = np.array([rng.choice(5, p=p) for p in probs])  # Labels drawn from the model: exchangeable.
    >>> out = uncertainty.split_conformal(probs, labels, 0.1, "aps", repeats=20)
    >>> bool(abs(out["coverage"] - 0.9) < 0.01), bool(1 < out["size"] < 5)
    (True, True)
  """
  _check_labels(probs_NxC, labels_N)
  rng = np.random.default_rng(seed)
  cover, size = [], []
  for _ in range(repeats):
    perm = rng.permutation(len(labels_N))
    cal, test = perm[: len(perm) // 2], perm[len(perm) // 2:]
    u = rng.uniform(size=len(labels_N)) if randomized else None
    scores = conformal_scores(probs_NxC, method, u)
    qhat = conformal_quantile(scores[cal, labels_N[cal]], alpha)
    sets = scores[test] <= qhat
    cover.append(np.mean(sets[np.arange(len(test)), labels_N[test]]))
    size.append(np.mean(np.sum(sets, axis=-1)))
  return {"coverage": float(np.mean(cover)), "coverage_std": float(np.std(cover)),
          "size": float(np.mean(size)), "size_std": float(np.std(size)), "repeats": repeats}


# ----------------------------------------------------------------------------- selective prediction

def risk_coverage(confidence_N: np.ndarray, correct_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(coverage k/N, error among the k most confident) for k = 1..N; ties in confidence keep example order."""
  order = np.argsort(-np.asarray(confidence_N, np.float64), kind="stable")
  errors = np.cumsum(1.0 - np.asarray(correct_N, np.float64)[order])
  k = np.arange(1, len(order) + 1)
  return k / len(order), errors / k


def selective(confidence_N: np.ndarray, correct_N: np.ndarray, coverages: Sequence[float] = (0.8, 0.9),
              curve_points: int = 101) -> dict:
  """AURC (mean risk over k = 1..N), the error at each coverage (the ceil(c N) most confident) and a curve."""
  cov, risk = risk_coverage(confidence_N, correct_N)
  n = len(cov)
  at = {f"error_at_{round(100 * c)}": float(risk[max(math.ceil(c * n), 1) - 1]) for c in coverages}
  grid = np.unique(np.clip(np.ceil(np.linspace(0, 1, curve_points) * n).astype(int), 1, n)) - 1
  return {"aurc": float(np.mean(risk)), **at,
          "curve": {"coverage": cov[grid].tolist(), "risk": risk[grid].tolist()}}


# ----------------------------------------------------------------------------- deep-ensemble equivalent

def deep_ensemble_equivalent(deep_nll_K: Sequence[float], value: float) -> tuple[float, str]:
  """(k, bound): the size, linear between integers, at which deep ensembles of size 1..K reach NLL `value`.

  The first crossing of the curve; bound is "" inside [1, K], "<1" (k = 1 returned) when value is worse than one
  network, ">K" (k = K) when it is better than all K. A value equal to the curve at size k gives exactly k.

  Examples:
    >>> from snapjax import uncertainty
    >>> uncertainty.deep_ensemble_equivalent([0.50, 0.40, 0.36], 0.38)
    (2.5, '')
  """
  curve = [float(v) for v in deep_nll_K]
  if not curve:
    raise ValueError("deep_nll_K is empty: the deep-ensemble equivalent needs at least one deep ensemble")
  for i, v in enumerate(curve):
    if value == v:
      return float(i + 1), ""
  if value > curve[0]:
    return 1.0, "<1"
  for i in range(len(curve) - 1):
    a, b = curve[i], curve[i + 1]
    if min(a, b) <= value <= max(a, b) and a != b:
      return i + 1 + (a - value) / (a - b), ""
  return float(len(curve)), f">{len(curve)}"
