"""SWAG's moments against NumPy, its samples' covariance against the one the moments define, S = 1 at zero variance."""
import jax
import numpy as np
import pytest

import snapjax
from snapjax import swag


def _iterates(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"a": rng.normal(size=(3,)).astype(np.float32), "b": {"w": rng.normal(size=(2, 2)).astype(np.float32)}}
          for _ in range(n)]


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _numpy_moments(iterates, rank):
  """The paper's Algorithm 1 in NumPy (float64): mean, second moment, and the last `rank` deviations theta_i - mean_i."""
  thetas = np.stack([_flat(t).astype(np.float64) for t in iterates])
  means = np.cumsum(thetas, 0) / np.arange(1, len(thetas) + 1)[:, None]
  devs = thetas - means  # Row i: theta_i minus the running mean after it is collected.
  return thetas.mean(0), (thetas ** 2).mean(0), thetas.var(0), devs[-rank:]


@pytest.mark.parametrize("n, rank", [(7, 3), (3, 5), (5, 5), (1, 2)])
def test_moments_equal_numpy_mean_variance_and_deviations(n, rank):
  iterates = _iterates(n)
  m = swag.swag_init(iterates[0], rank)
  collect = jax.jit(swag.swag_collect)
  for t in iterates:
    m = collect(m, t)
  mean, sq_mean, var, devs = _numpy_moments(iterates, rank)
  assert int(m["count"]) == n
  np.testing.assert_allclose(_flat(m["mean"]), mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_flat(m["sq_mean"]), sq_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_flat(swag.swag_variance(m)), var, rtol=1e-4, atol=1e-5)
  # The ring buffer holds the last min(n, rank) deviations, iterate i (1-based) in column (i - 1) % rank.
  cols = np.stack([_flat(jax.tree.map(lambda d, j=j: d[j], m["deviations"])) for j in range(rank)])
  held = [(i - 1) % rank for i in range(max(1, n - rank + 1), n + 1)]
  np.testing.assert_allclose(cols[held], devs, rtol=1e-5, atol=1e-6)
  if n < rank:
    assert not cols[n:].any()


def test_samples_have_the_covariance_the_moments_define():
  iterates, rank = _iterates(8, seed=1), 4
  m = swag.swag_init(iterates[0], rank)
  for t in iterates:
    m = swag.swag_collect(m, t)
  mean, _, var, devs = _numpy_moments(iterates, rank)
  want_cov = np.diag(var) / 2 + devs.T @ devs / (2 * (rank - 1))
  s = 40_000
  draws = snapjax.swag_sample(m, jax.random.key(3), s)
  x = np.concatenate([np.asarray(l).reshape(s, -1) for l in jax.tree.leaves(draws)], axis=1).astype(np.float64)
  # Standard errors of a sample mean and covariance of 40,000 Gaussian draws: sd / 200 and about sd_i sd_j / 140.
  sd = np.sqrt(np.diag(want_cov))
  assert np.all(np.abs(x.mean(0) - mean) < 5 * sd / np.sqrt(s))
  got_cov = np.cov(x, rowvar=False)
  assert np.all(np.abs(got_cov - want_cov) < 5 * np.outer(sd, sd) * np.sqrt(2 / s)), np.abs(got_cov - want_cov).max()
  # Not just the diagonal: the low-rank part is there (the off-diagonal entries are far from zero).
  assert np.abs(want_cov - np.diag(np.diag(want_cov))).max() > 20 * (sd.max() ** 2) * np.sqrt(2 / s)


def test_one_sample_at_zero_variance_is_the_swa_mean():
  params = _iterates(1)[0]
  m = swag.swag_init(params, 3)
  for _ in range(4):  # The same weights every time: zero variance, zero deviations.
    m = swag.swag_collect(m, params)
  draw = snapjax.swag_sample(m, jax.random.key(0), 1)
  jax.tree.map(lambda d, p: np.testing.assert_array_equal(np.asarray(d)[0], p), draw, params)


def test_samples_are_keyed_by_seed_and_prefix_stable():
  m = swag.swag_init(_iterates(1)[0], 2)
  for t in _iterates(3):
    m = swag.swag_collect(m, t)
  five = snapjax.swag_sample(m, jax.random.key(7), 5)
  three = snapjax.swag_sample(m, jax.random.key(7), 3)
  other = snapjax.swag_sample(m, jax.random.key(8), 3)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[:3], b), five, three)
  assert not np.array_equal(_flat(jax.tree.map(lambda a: a[0], three)), _flat(jax.tree.map(lambda a: a[0], other)))
  with pytest.raises(ValueError, match="num_samples"):
    snapjax.swag_sample(m, jax.random.key(0), 0)
