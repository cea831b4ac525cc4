"""snapjax.uncertainty, snapjax.corruptions and snapjax.ood_data against independent references: scikit-learn's
metrics, scipy.optimize, NumPy threshold sweeps and loops, coverage on exchangeable synthetic data."""
import math

import numpy as np
import pytest
from scipy import optimize, special
from sklearn import metrics as skm

from snapjax import corruptions, ood_data, uncertainty


def _random_scores(rng, n_in=300, n_out=200, tied=False):
  a, b = rng.normal(0, 1, n_in), rng.normal(0.7, 1, n_out)
  if tied:
    a, b = np.round(a), np.round(b)  # Few distinct values: many ties within and across the two sets.
  return a, b


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_aupr_match_sklearn(seed, tied):
  a, b = _random_scores(np.random.default_rng(seed), tied=tied)
  y, s = np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b]
  assert uncertainty.auroc(a, b) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
  assert uncertainty.aupr(a, b) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 3])
def test_fpr95_matches_threshold_sweep(seed, tied):
  a, b = _random_scores(np.random.default_rng(seed), tied=tied)
  best = 1.0
  for t in np.unique(np.r_[a, b]):  # Every threshold: score >= t is called OOD.
    if np.mean(b >= t) >= 0.95:
      best = min(best, np.mean(a >= t))
  assert uncertainty.fpr_at_tpr(a, b, 0.95) == pytest.approx(best, abs=1e-15)


def test_ood_metrics_perfect_and_reversed():
  a, b = np.arange(10.0), np.arange(10.0) + 100
  assert uncertainty.ood_metrics(a, b) == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}
  assert uncertainty.auroc(b, a) == 0.0


def _logits(rng, m, n, c, spread=2.0):
  return rng.normal(0, spread, (m, n, c))


def test_temperature_matches_scipy():
  rng = np.random.default_rng(0)
  logits = _logits(rng, 3, 400, 10, spread=3.0)
  labels = rng.integers(0, 10, 400)
  logits[:, np.arange(400), labels] += 2.0  # Some signal, overconfident: T > 1.
  logp = uncertainty.log_mean_probs(logits)
  t = uncertainty.fit_temperature(logp, labels)

  def nll_of_log_t(u):
    z = logp / np.exp(u)
    return -np.mean(z[np.arange(400), labels] - special.logsumexp(z, axis=-1))

  ref = optimize.minimize_scalar(nll_of_log_t, bounds=(-5, 5), method="bounded", options={"xatol": 1e-10})
  assert math.log(t) == pytest.approx(ref.x, abs=1e-6)
  assert uncertainty.nll(uncertainty.scale(logp, t), labels) <= nll_of_log_t(ref.x) + 1e-12


def test_log_mean_probs_is_log_of_mean_softmax():
  rng = np.random.default_rng(1)
  logits = _logits(rng, 4, 50, 7)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(uncertainty.log_mean_probs(logits), np.log(p.mean(0)), rtol=1e-12, atol=1e-12)


def test_cross_validated_temperature_folds():
  rng = np.random.default_rng(2)
  logits, labels = _logits(rng, 1, 101, 5), rng.integers(0, 5, 101)
  logits[0, np.arange(101), labels] += 1.5  # Signal: each fold's T lies inside both searches' bounds.
  logp = uncertainty.log_mean_probs(logits)
  out = uncertainty.cross_validated_temperature(logp, labels, repeats=5, seed=0)
  assert out["folds"] == 10
  ref = []  # The same halvings, recomputed with the scipy fit.
  for fit, score in uncertainty.split_halves(101, 5, 0):
    assert len(set(fit) & set(score)) == 0 and len(fit) + len(score) == 101
    f = lambda u, idx=fit: -np.mean(uncertainty.log_softmax(logp[idx] / np.exp(u))[np.arange(len(idx)), labels[idx]])
    t = math.exp(optimize.minimize_scalar(f, bounds=(-6, 6), method="bounded", options={"xatol": 1e-10}).x)
    ref.append(-np.mean(uncertainty.log_softmax(logp[score] / t)[np.arange(len(score)), labels[score]]))
  assert out["nll"] == pytest.approx(np.mean(ref), abs=1e-7)
  assert out["nll_std"] == pytest.approx(np.std(ref), abs=1e-7)


def test_ece_brier_against_loops():
  rng = np.random.default_rng(3)
  logp = uncertainty.log_mean_probs(_logits(rng, 2, 200, 4))
  labels = rng.integers(0, 4, 200)
  p = np.exp(logp)
  bins = [[] for _ in range(15)]
  for row, y in zip(p, labels):
    bins[min(int(row.max() * 15), 14)].append((row.max(), row.argmax() == y))
  ece = sum(len(b) / 200 * abs(np.mean([a for _, a in b]) - np.mean([c for c, _ in b])) for b in bins if b)
  assert uncertainty.ece(p, labels) == pytest.approx(ece, abs=1e-12)
  assert uncertainty.brier(p, labels) == pytest.approx(np.mean(np.sum((p - np.eye(4)[labels]) ** 2, 1)), abs=1e-12)


def test_mutual_information_zero_for_identical_members_positive_otherwise():
  rng = np.random.default_rng(4)
  one = _logits(rng, 1, 30, 6)
  same = np.repeat(one, 4, axis=0)
  np.testing.assert_allclose(uncertainty.ood_scores(same)["mutual_information"], 0.0, atol=1e-12)
  assert "mutual_information" not in uncertainty.ood_scores(one)
  assert np.all(uncertainty.ood_scores(_logits(rng, 4, 30, 6))["mutual_information"] > 0)


def test_energy_of_mean_logits():
  rng = np.random.default_rng(5)
  logits = _logits(rng, 3, 20, 5)
  ref = -np.log(np.sum(np.exp(logits.mean(0)), axis=-1))
  np.testing.assert_allclose(uncertainty.ood_scores(logits)["energy"], ref, rtol=1e-12)


# ----------------------------------------------------------------------------- conformal

def _exchangeable(rng, n, c=8):
  """Labels drawn from the model's own (noisy) probabilities: calibration and test examples are exchangeable."""
  logits = rng.normal(0, 2, (n, c))
  p = np.exp(uncertainty.log_softmax(logits))
  labels = np.array([rng.choice(c, p=row) for row in p])
  return p, labels


@pytest.mark.parametrize("method", uncertainty.CONFORMAL_METHODS)
@pytest.mark.parametrize("alpha", [0.1, 0.05])
def test_conformal_coverage_at_least_one_minus_alpha(method, alpha):
  rng = np.random.default_rng(6)
  p, labels = _exchangeable(rng, 400)
  out = uncertainty.split_conformal(p, labels, alpha, method, repeats=400, seed=1)
  # Marginal coverage >= 1 - alpha; the mean over 400 halvings has a standard error of about 0.002.
  assert out["coverage"] >= 1 - alpha - 0.005
  assert out["coverage"] <= 1 - alpha + 1 / 201 + 0.01  # ...and not much above (the bound is 1 - alpha + 1/(n+1)).


def _sets_by_loop(p, qhat, method, u, lam=uncertainty.RAPS_LAMBDA, k_reg=uncertainty.RAPS_K):
  sets = []
  for row, ui in zip(p, u):
    order = sorted(range(len(row)), key=lambda c: (-row[c], c))
    chosen, before = [], 0.0
    for rank, c in enumerate(order, start=1):
      if method == "thr":
        score = 1 - row[c]
      else:
        score = before + ui * row[c] + (lam * max(0, rank - k_reg) if method == "raps" else 0.0)
      if score <= qhat:
        chosen.append(c)
      before += row[c]
    sets.append(sorted(chosen))
  return sets


@pytest.mark.parametrize("method", uncertainty.CONFORMAL_METHODS)
def test_conformal_sets_match_loop(method):
  rng = np.random.default_rng(7)
  p, labels = _exchangeable(rng, 300, c=6)
  u = rng.uniform(size=300)
  scores = uncertainty.conformal_scores(p, method, u)
  qhat = uncertainty.conformal_quantile(scores[:150, :][np.arange(150), labels[:150]], 0.1)
  loop = _sets_by_loop(p[150:], qhat, method, u[150:])
  got = [sorted(np.nonzero(row)[0].tolist()) for row in scores[150:] <= qhat]
  assert got == loop
  cal = sorted(s[y] for s, y in zip(scores[:150], labels[:150]))
  assert qhat == cal[math.ceil(151 * 0.9) - 1]


# ----------------------------------------------------------------------------- selective and DEE

def test_selective_against_loop():
  rng = np.random.default_rng(8)
  conf, correct = rng.uniform(size=257), rng.uniform(size=257) < 0.8
  out = uncertainty.selective(conf, correct)
  order = sorted(range(257), key=lambda i: -conf[i])
  risks = [np.mean([not correct[i] for i in order[:k]]) for k in range(1, 258)]
  assert out["aurc"] == pytest.approx(np.mean(risks), abs=1e-12)
  assert out["error_at_80"] == pytest.approx(risks[math.ceil(0.8 * 257) - 1], abs=1e-12)
  assert out["error_at_90"] == pytest.approx(risks[math.ceil(0.9 * 257) - 1], abs=1e-12)
  assert out["curve"]["risk"][-1] == pytest.approx(1 - np.mean(correct))


def test_deep_ensemble_equivalent():
  curve = [0.5, 0.4, 0.35, 0.33]
  for k, v in enumerate(curve, start=1):
    assert uncertainty.deep_ensemble_equivalent(curve, v) == (float(k), "")
  assert uncertainty.deep_ensemble_equivalent(curve, 0.45) == (pytest.approx(1.5), "")
  assert uncertainty.deep_ensemble_equivalent(curve, 0.6) == (1.0, "<1")
  assert uncertainty.deep_ensemble_equivalent(curve, 0.3) == (4.0, ">4")


# ----------------------------------------------------------------------------- data

def _smooth_images(n=16, size=28):
  yy, xx = np.mgrid[:size, :size]
  rng = np.random.default_rng(9)
  out = []
  for _ in range(n):
    cy, cx, r = rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(3, 7)
    out.append(200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + 20)
  return np.clip(np.stack(out)[..., None], 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(corruptions.CORRUPTIONS))
def test_corruptions_monotone_and_seeded(name):
  images = np.concatenate([_smooth_images(), ood_data.digits_28x28()[:16]])
  changes = [0.0]
  for s in corruptions.SEVERITIES:
    out = corruptions.corrupt(images, name, s, seed=3)
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(out, corruptions.corrupt(images, name, s, seed=3))
    changes.append(float(np.mean(np.abs(out.astype(np.float64) - images))))
  assert all(b > a for a, b in zip(changes, changes[1:])), changes
  if name.endswith("noise"):
    other_seed = corruptions.corrupt(images, name, 3, seed=4)
    assert not np.array_equal(corruptions.corrupt(images, name, 3, seed=3), other_seed)


def test_corruption_rejects_bad_arguments():
  images = _smooth_images(2)
  with pytest.raises(ValueError, match="allowed"):
    corruptions.corrupt(images, "fog", 1)
  with pytest.raises(ValueError, match="severity"):
    corruptions.corrupt(images, "rotate", 6)


def test_ood_sets_offline():
  digits = ood_data.digits_28x28()
  assert digits.shape == (1797, 28, 28, 1) and digits.dtype == np.uint8
  assert digits[:, :4].max() == 0 and digits.max() == 255  # Black border, full-range strokes.
  np.testing.assert_array_equal(digits, ood_data.digits_28x28())
  u = ood_data.noise_images((28, 28, 1), "uniform", 10)
  np.testing.assert_array_equal(u, ood_data.noise_images((28, 28, 1), "uniform", 10))
  from snapjax import data
  sets, skipped = ood_data.ood_sets(data.get_spec("cifar10"), "/nonexistent")
  assert set(sets) == {"uniform_noise", "gaussian_noise"} and len(skipped) == 2
  assert all("not prepared" in line for line in skipped)


def test_cifar10_c_configs_and_loader(tmp_path):
  import tensorflow_datasets as tfds
  assert ood_data.cifar10_c_configs(str(tmp_path)) == []
  for name in ("zoom_blur_5", "gaussian_noise_1", "not_a_config"):
    (tmp_path / ood_data.CIFAR10_C / name).mkdir(parents=True)
  assert ood_data.cifar10_c_configs(str(tmp_path)) == [("gaussian_noise", 1), ("zoom_blur", 5)]
  with tfds.testing.mock_data(num_examples=6):
    images, labels = ood_data.load_cifar10_c(str(tmp_path), "gaussian_noise", 1, num=4)
  assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8 and labels.shape == (4,)
