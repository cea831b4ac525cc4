"""Tests for snapjax.weight_space against NumPy: weight averages, interpolation, BatchNorm statistics recomputed."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import snapjax
from snapjax import experiment, weight_space

MOMENTUM = 0.9  # snapjax.models' BatchNorm momentum (snapjax/models/resnet.py), restated as the reference's.


def _model_and_batches(num_batches=4, batch=16, seed=0):
  """resnet8 on 8x8x1 inputs with non-trivial statistics, and fixed batches of varying means and scales."""
  model = snapjax.models.get("resnet8", num_classes=10)
  rng = np.random.default_rng(seed)
  batches = [(rng.standard_normal((batch, 8, 8, 1)) * (1 + k) + k).astype(np.float32) for k in range(num_batches)]
  variables = model.init(jax.random.key(seed), batches[0], train=False)
  return model, {"params": variables["params"], "batch_stats": variables["batch_stats"]}, batches


def _train_apply(model):
  return functools.partial(model.apply, train=True, mutable=["batch_stats"])


def _reference_stats(model, variables, batches):
  """Independent reference: each batch's own statistics from one training-mode apply at zero running statistics,
  undoing the known momentum ((1 - momentum) * batch statistic), then their plain mean over batches in float64."""
  per_batch = []
  for x in batches:
    zeros = jax.tree.map(np.zeros_like, variables["batch_stats"])
    _, new = model.apply({"params": variables["params"], "batch_stats": zeros}, x, train=True, mutable=["batch_stats"])
    per_batch.append(jax.tree.map(lambda a: np.asarray(a, np.float64) / (1 - MOMENTUM), new["batch_stats"]))
  return jax.tree.map(lambda *xs: np.mean(xs, axis=0), *per_batch)


def _assert_tree_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), **tol),
               a, b)


# ----------------------------------------------------------------------------- average / interpolate


def test_average_snapshots_equals_numpy_mean_of_the_last_m():
  rng = np.random.default_rng(1)
  snaps = [{"params": {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(
      np.float32)}, "batch_stats": {"mean": rng.standard_normal(4).astype(np.float32)}} for _ in range(5)]
  stacked = snapjax.stack_snapshots(snaps)
  for m in (1, 2, 3, 5):
    avg = snapjax.average_snapshots(stacked, last_m=m)
    reference = jax.tree.map(lambda *xs: np.mean(np.asarray(xs, np.float64), axis=0), *snaps[5 - m:])
    _assert_tree_close(avg, reference, rtol=1e-6, atol=1e-7)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), avg) == jax.tree.map(lambda a: (a.shape, a.dtype), snaps[0])
  _assert_tree_close(snapjax.average_snapshots(stacked), snapjax.average_snapshots(stacked, last_m=5), rtol=0, atol=0)


def test_average_of_identical_snapshots_is_the_snapshot_params_and_error():
  model, variables, batches = _model_and_batches()
  stacked = snapjax.stack_snapshots([variables] * 3)
  avg = snapjax.average_snapshots(stacked)
  _assert_tree_close(avg, variables, rtol=1e-6, atol=1e-7)
  # The same statistics measured the same way, the same predictions on held-out inputs.
  fresh_avg = snapjax.recompute_batch_stats(_train_apply(model), avg, batches)
  fresh_snap = snapjax.recompute_batch_stats(_train_apply(model), variables, batches)
  x, y = batches[-1][::-1].copy(), np.arange(16) % 10
  probs = [jax.nn.softmax(model.apply(v, x, train=False)) for v in (fresh_avg, fresh_snap)]
  assert float(snapjax.error_rate(probs[0], y)) == float(snapjax.error_rate(probs[1], y))
  np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)


def test_average_snapshots_rejects_bad_input():
  stacked = snapjax.stack_snapshots([{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}])
  for bad in (0, 3, True, 1.5):
    with pytest.raises(ValueError, match="last_m"):
      snapjax.average_snapshots(stacked, last_m=bad)
  with pytest.raises(ValueError, match="count.*int32.*floating"):
    snapjax.average_snapshots({"count": jnp.zeros((2,), jnp.int32)})


def test_interpolate_snapshots_endpoints_are_exact_and_the_line_is_numpy_s():
  rng = np.random.default_rng(2)
  a = {"w": rng.standard_normal((3, 5)).astype(np.float32), "s": {"v": rng.standard_normal(2).astype(np.float32)}}
  b = jax.tree.map(lambda x: (x * 3 + 1).astype(np.float32), a)
  lambdas = np.linspace(0, 1, 11)
  path = snapjax.interpolate_snapshots(a, b, lambdas)
  assert path["w"].shape == (11, 3, 5) and path["w"].dtype == np.float32
  _assert_tree_close(jax.tree.map(lambda p: p[0], path), a, rtol=0, atol=0)
  _assert_tree_close(jax.tree.map(lambda p: p[-1], path), b, rtol=0, atol=0)
  for k, lam in enumerate(lambdas):
    reference = jax.tree.map(lambda x, y: lam * np.float64(y) + (1 - lam) * np.float64(x), a, b)
    _assert_tree_close(jax.tree.map(lambda p: p[k], path), reference, rtol=1e-6, atol=1e-6)


def test_interpolate_snapshots_rejects_bad_input():
  a = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match="lambdas"):
    snapjax.interpolate_snapshots(a, a, [])
  with pytest.raises(ValueError, match="lambdas"):
    snapjax.interpolate_snapshots(a, a, [0.0, np.nan])
  with pytest.raises(ValueError, match="w"):
    snapjax.interpolate_snapshots(a, {"w": jnp.zeros(3)}, [0.5])


# ----------------------------------------------------------------------------- BatchNorm statistics


def test_recompute_batch_stats_equals_the_mean_of_each_batch_s_statistics():
  model, variables, batches = _model_and_batches()
  garbage = {**variables, "batch_stats": jax.tree.map(lambda a: jnp.full_like(a, 7.0), variables["batch_stats"])}
  fresh = snapjax.recompute_batch_stats(_train_apply(model), garbage, batches)
  _assert_tree_close(fresh["batch_stats"], _reference_stats(model, variables, batches), rtol=2e-5, atol=1e-5)
  assert fresh["params"] is garbage["params"]  # Parameters untouched.
  assert jax.tree.structure(fresh) == jax.tree.structure(variables)


def test_recompute_batch_stats_restores_trained_statistics_from_zeros():
  """A model whose running statistics were trained by a long exponential average on one batch: the exact mean over
  that batch gives them back; on several batches, the long average lands near the exact mean."""
  model, variables, batches = _model_and_batches()
  step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"])
  trained = dict(variables)
  for _ in range(250):  # 0.9^250 ~ 4e-12: the initial statistics are forgotten.
    trained["batch_stats"] = step(trained, batches[0])
  zeroed = {**trained, "batch_stats": jax.tree.map(jnp.zeros_like, trained["batch_stats"])}
  fresh = snapjax.recompute_batch_stats(_train_apply(model), zeroed, batches[:1])
  _assert_tree_close(fresh["batch_stats"], trained["batch_stats"], rtol=1e-5, atol=1e-5)

  # Statistics averaged over a cycle of 4 similar batches (same distribution, no drift): the long average with
  # momentum 0.9 is within a few percent of the exact mean.
  rng = np.random.default_rng(3)
  similar = [rng.standard_normal((64, 8, 8, 1)).astype(np.float32) + 0.5 for _ in range(4)]
  for k in range(400):
    trained["batch_stats"] = step(trained, similar[k % 4])
  fresh = snapjax.recompute_batch_stats(_train_apply(model), zeroed, similar)
  exact = _reference_stats(model, trained, similar)
  _assert_tree_close(fresh["batch_stats"], exact, rtol=2e-5, atol=1e-5)
  _assert_tree_close(fresh["batch_stats"], trained["batch_stats"], rtol=0.1, atol=0.02)


def test_recompute_batch_stats_does_not_need_the_momentum():
  """Any momentum: a BatchNorm with momentum 0.99 and one with 0.5 both give the plain mean of batch statistics."""
  x = np.random.default_rng(4).standard_normal((3, 32, 5)).astype(np.float32) * [1, 2, 3, 4, 5] + [0, 1, 2, 3, 4]
  for momentum in (0.5, 0.99):
    bn = nn.BatchNorm(use_running_average=False, momentum=momentum)
    variables = bn.init(jax.random.key(0), x[0])
    fresh = snapjax.recompute_batch_stats(functools.partial(bn.apply, mutable=["batch_stats"]), variables, list(x))
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(fresh["batch_stats"]["mean"], x64.mean(axis=1).mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fresh["batch_stats"]["var"], x64.var(axis=1).mean(axis=0), rtol=1e-5, atol=1e-6)


def test_recompute_batch_stats_stacked_equals_one_at_a_time_and_reports_progress():
  model, variables, batches = _model_and_batches(num_batches=3)
  other = jax.tree.map(lambda a: a * 1.5, variables)
  points = snapjax.interpolate_snapshots(variables, other, [0.0, 0.5, 1.0])
  done = []
  fresh = snapjax.recompute_batch_stats(_train_apply(model), points, batches, stacked=True, progress=done.append)
  assert done == [1, 2, 3]
  for k in range(3):
    alone = snapjax.recompute_batch_stats(_train_apply(model), jax.tree.map(lambda a: a[k], points), batches)
    _assert_tree_close(jax.tree.map(lambda a: a[k], fresh["batch_stats"]), alone["batch_stats"], rtol=1e-5,
                       atol=1e-6)


@pytest.mark.devices(4)
def test_recompute_batch_stats_on_batches_sharded_over_the_mesh():
  model, variables, batches = _model_and_batches()
  mesh = experiment.make_mesh()
  sharded = [experiment.put_sharded(mesh, x) for x in batches]
  replicated = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  fresh = snapjax.recompute_batch_stats(_train_apply(model), replicated, sharded)
  _assert_tree_close(fresh["batch_stats"], _reference_stats(model, variables, batches), rtol=2e-5, atol=1e-5)


def test_recompute_batch_stats_rejects_bad_input():
  model, variables, batches = _model_and_batches(num_batches=1)
  with pytest.raises(ValueError, match="batch_stats"):
    snapjax.recompute_batch_stats(_train_apply(model), {"params": variables["params"]}, batches)
  with pytest.raises(ValueError, match="no batch"):
    snapjax.recompute_batch_stats(_train_apply(model), variables, [])
  no_stats = {"params": variables["params"], "batch_stats": {}}
  assert weight_space.recompute_batch_stats(_train_apply(model), no_stats, []) is no_stats
