"""Tests for snapjax.ensemble against naive per-snapshot NumPy loops and closed-form metrics."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from snapjax import ensemble

M = 4
B = 6
C = 5


def _np_softmax(logits_BxC: np.ndarray) -> np.ndarray:
  z = np.asarray(logits_BxC, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _naive_members(apply_fn, snapshots, x, last_m):
  """Per-snapshot probabilities of the last m snapshots, one eager call each, NumPy softmax."""
  m = len(snapshots) if last_m is None else last_m
  return np.stack([_np_softmax(apply_fn(s, x)) for s in snapshots[len(snapshots) - m:]])


# Plain-function MLP.
def _mlp_apply(v, x):
  return jax.nn.relu(x @ v["w1"] + v["b1"][None]) @ v["w2"] + v["b2"][None]


def _mlp_case():
  keys = jax.random.split(jax.random.key(0), M + 1)
  snaps = [{"w1": jax.random.normal(jax.random.fold_in(k, 0), (3, 8)),
            "b1": jax.random.normal(jax.random.fold_in(k, 1), (8,)),
            "w2": jax.random.normal(jax.random.fold_in(k, 2), (8, C)),
            "b2": jax.random.normal(jax.random.fold_in(k, 3), (C,))} for k in keys[:M]]
  x = jax.random.normal(keys[M], (B, 3))
  return _mlp_apply, snaps, x


# Small Linen conv model with BatchNorm (params + batch_stats).
class _ConvBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(C)(x)


_CONV = _ConvBN()


def _conv_apply(v, x):
  return _CONV.apply(v, x, train=False)


def _conv_case():
  x = jax.random.normal(jax.random.key(1), (B, 6, 6, 2))
  snaps = []
  for i in range(M):
    v = _CONV.init(jax.random.key(10 + i), x, train=False)
    k1, k2 = jax.random.split(jax.random.key(20 + i))
    stats = v["batch_stats"]["BatchNorm_0"]
    v = {"params": v["params"], "batch_stats": {"BatchNorm_0": {
        "mean": stats["mean"] + jax.random.normal(k1, stats["mean"].shape),
        "var": stats["var"] + jax.random.uniform(k2, stats["var"].shape)}}}
    snaps.append(v)
  return _conv_apply, snaps, x


# NNX module through split/merge.
class _NnxMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(3, 7, rngs=rngs)
    self.l2 = nnx.Linear(7, C, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.tanh(self.l1(x)))


_NNX_GRAPHDEF, _ = nnx.split(_NnxMLP(nnx.Rngs(0)))


def _nnx_apply(state, x):
  return nnx.merge(_NNX_GRAPHDEF, state)(x)


def _nnx_case():
  snaps = [nnx.split(_NnxMLP(nnx.Rngs(100 + i)))[1] for i in range(M)]
  x = jax.random.normal(jax.random.key(2), (B, 3))
  return _nnx_apply, snaps, x


CASES = {"mlp": _mlp_case, "linen_conv_bn": _conv_case, "nnx": _nnx_case}
STRATEGY_OPTS = [("vmap", None), ("map", None), ("map", 3), ("loop", None), ("auto", None)]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strategy,chunk_size", STRATEGY_OPTS)
@pytest.mark.parametrize("last_m", [1, 3, None])
def test_matches_naive_loop(case, strategy, chunk_size, last_m):
  apply_fn, snaps, x = CASES[case]()
  stacked = ensemble.stack_snapshots(snaps)
  want_MxBxC = _naive_members(apply_fn, snaps, x, last_m)
  mean_BxC, probs_MxBxC = ensemble.ensemble_predict(
      apply_fn, stacked, x, last_m=last_m, strategy=strategy, chunk_size=chunk_size,
      return_members=True)
  assert mean_BxC.dtype == jnp.float32 and mean_BxC.shape == (B, C)
  assert probs_MxBxC.shape == want_MxBxC.shape
  np.testing.assert_allclose(probs_MxBxC, want_MxBxC, atol=2e-5)
  np.testing.assert_allclose(mean_BxC, want_MxBxC.mean(axis=0), atol=2e-5)
  if last_m is None:  # The mean-only program is a separate compile; once per case keeps tests fast.
    only_mean = ensemble.ensemble_predict(apply_fn, stacked, x, strategy=strategy, chunk_size=chunk_size)
    np.testing.assert_allclose(only_mean, want_MxBxC.mean(axis=0), atol=2e-5)


def test_last_m_uses_highest_indices():
  apply_fn, snaps, x = _mlp_case()
  stacked = ensemble.stack_snapshots(snaps)
  got = ensemble.ensemble_predict(apply_fn, stacked, x, last_m=1, strategy="loop")
  np.testing.assert_allclose(got, _np_softmax(apply_fn(snaps[-1], x)), atol=2e-5)
  assert not np.allclose(got, _np_softmax(apply_fn(snaps[0], x)), atol=1e-3)


@pytest.mark.parametrize("strategy", ["vmap", "map", "loop", "auto"])
def test_single_trace_per_shape_and_options(strategy):
  traces = []

  def apply_fn(v, x):
    traces.append(1)
    return _mlp_apply(v, x)

  _, snaps, x = _mlp_case()
  stacked = ensemble.stack_snapshots(snaps)
  first = ensemble.ensemble_predict(apply_fn, stacked, x, last_m=3, strategy=strategy)
  n = len(traces)
  assert n >= 1
  stacked2 = jax.tree.map(lambda a: a * 1.5, stacked)
  second = ensemble.ensemble_predict(apply_fn, stacked2, x + 1.0, last_m=3, strategy=strategy)
  assert len(traces) == n, "same shapes and options must not retrace"
  assert not np.allclose(first, second)
  np.testing.assert_allclose(
      second, _naive_members(_mlp_apply, [jax.tree.map(lambda a: a * 1.5, s) for s in snaps],
                             x + 1.0, 3).mean(axis=0), atol=2e-5)
  ensemble.ensemble_predict(apply_fn, stacked, x, last_m=2, strategy=strategy)
  assert len(traces) > n, "a new last_m is a new program"


def test_bf16_logits_softmax_in_float32():
  def apply_fn(v, x):
    return _mlp_apply(v, x).astype(jnp.bfloat16) * 4

  _, snaps, x = _mlp_case()
  stacked = ensemble.stack_snapshots(snaps)
  for strategy in ("vmap", "map", "loop"):
    mean_BxC, probs_MxBxC = ensemble.ensemble_predict(apply_fn, stacked, x, strategy=strategy,
                                                      return_members=True)
    assert mean_BxC.dtype == jnp.float32 and probs_MxBxC.dtype == jnp.float32
    want = np.stack([_np_softmax(np.asarray(apply_fn(s, x)).astype(np.float32)) for s in snaps])
    # A bf16 softmax is off by ~1e-3; float32 on the bf16 logits matches to ~1e-7.
    np.testing.assert_allclose(probs_MxBxC, want, atol=1e-6)
    np.testing.assert_allclose(mean_BxC, want.mean(axis=0), atol=1e-6)


@pytest.mark.devices(4)
def test_keeps_data_sharding_of_x():
  apply_fn, snaps, x = _mlp_case()
  x = jax.random.normal(jax.random.key(3), (8, 3))
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  stacked = ensemble.stack_snapshots(snaps)
  want = _naive_members(apply_fn, snaps, x, None).mean(axis=0)
  for strategy in ("vmap", "map", "loop"):
    got = ensemble.ensemble_predict(apply_fn, stacked, x_sharded, strategy=strategy)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2), (strategy, got.sharding)


def test_works_inside_outer_jit():
  apply_fn, snaps, x = _mlp_case()
  stacked = ensemble.stack_snapshots(snaps)
  got = jax.jit(lambda s, x: ensemble.ensemble_predict(apply_fn, s, x, last_m=2))(stacked, x)
  np.testing.assert_allclose(got, _naive_members(apply_fn, snaps, x, 2).mean(axis=0), atol=2e-5)


def test_auto_resolves_by_platform():
  x = jnp.ones((2, 3))
  assert ensemble.resolve_strategy("auto", x) == "map"  # Measured fastest on CPU (module docstring).
  assert ensemble.resolve_strategy("auto", None) == "map"
  for name in ("vmap", "map", "loop"):
    assert ensemble.resolve_strategy(name, x) == name


def test_stack_snapshots_shapes_and_values():
  _, snaps, _ = _conv_case()
  stacked = ensemble.stack_snapshots(snaps)
  flat_stacked = jax.tree_util.tree_leaves_with_path(stacked)
  for i, snap in enumerate(snaps):
    flat = jax.tree_util.tree_leaves_with_path(snap)
    assert [p for p, _ in flat] == [p for p, _ in flat_stacked]
    for (_, leaf), (_, s) in zip(flat, flat_stacked):
      assert s.shape == (M, *leaf.shape) and s.dtype == leaf.dtype
      np.testing.assert_array_equal(s[i], leaf)


def _conv_like(kernel_shape=(3, 3, 2, 4)):
  return {"params": {"Conv_0": {"kernel": np.zeros(kernel_shape, np.float32), "bias": np.zeros(4, np.float32)}},
          "batch_stats": {"BatchNorm_0": {"mean": np.zeros(4, np.float32)}}}


def test_stack_snapshots_shape_mismatch_names_leaf_and_index():
  snaps = [_conv_like(), _conv_like(), _conv_like((3, 3, 2, 5))]
  with pytest.raises(ValueError, match=r"snapshots\[2\].*params/Conv_0/kernel.*\(3, 3, 2, 5\).*\(3, 3, 2, 4\)"):
    ensemble.stack_snapshots(snaps)


def test_stack_snapshots_dtype_mismatch():
  bad = _conv_like()
  bad["batch_stats"]["BatchNorm_0"]["mean"] = np.zeros(4, np.float16)
  with pytest.raises(ValueError, match=r"snapshots\[1\].*batch_stats/BatchNorm_0/mean.*float16.*float32"):
    ensemble.stack_snapshots([_conv_like(), bad])


def test_stack_snapshots_structure_mismatch_names_leaf():
  bad = _conv_like()
  del bad["params"]["Conv_0"]["bias"]
  with pytest.raises(ValueError, match=r"snapshots\[1\].*params/Conv_0/bias"):
    ensemble.stack_snapshots([_conv_like(), bad])
  with pytest.raises(ValueError, match="non-empty"):
    ensemble.stack_snapshots([])


@pytest.mark.parametrize("last_m", [0, -1, M + 1, 1.5, True, "2"])
def test_bad_last_m_raises_before_compiling(last_m):
  traces = []

  def apply_fn(v, x):
    traces.append(1)
    return _mlp_apply(v, x)

  _, snaps, x = _mlp_case()
  stacked = ensemble.stack_snapshots(snaps)
  with pytest.raises(ValueError, match=re.escape(f"last_m must be None or an int in [1, {M}]") + ".*" +
                     re.escape(repr(last_m))):
    ensemble.ensemble_predict(apply_fn, stacked, x, last_m=last_m)
  assert not traces


def test_bad_strategy_and_chunk_size():
  _, snaps, x = _mlp_case()
  stacked = ensemble.stack_snapshots(snaps)
  with pytest.raises(ValueError, match=r"strategy must be one of .*'vmap'.*'map'.*'loop'.*got 'pmap'"):
    ensemble.ensemble_predict(_mlp_apply, stacked, x, strategy="pmap")
  with pytest.raises(ValueError, match=r"chunk_size must be None or a positive int, got 0"):
    ensemble.ensemble_predict(_mlp_apply, stacked, x, strategy="map", chunk_size=0)


def _metric_case():
  rng = np.random.default_rng(0)
  probs_BxC = _np_softmax(rng.normal(size=(12, C)) * 3).astype(np.float32)
  probs_BxC[0] = np.eye(C)[2]  # p(label) = 0 for label != 2: exercises the clip.
  labels_B = rng.integers(0, C, size=12)
  labels_B[0] = 1
  mask_B = np.array([1] * 9 + [0] * 3)
  return probs_BxC, labels_B, mask_B


def _np_metrics(probs_BxC, labels_B):
  err = np.mean(probs_BxC.argmax(-1) != labels_B)
  p = np.clip(probs_BxC[np.arange(len(labels_B)), labels_B].astype(np.float64), 1e-12, 1.0)
  return err, np.mean(-np.log(p))


def test_metrics_match_numpy_and_mask_excludes_padding():
  probs_BxC, labels_B, mask_B = _metric_case()
  want_err, want_nll = _np_metrics(probs_BxC, labels_B)
  np.testing.assert_allclose(ensemble.error_rate(probs_BxC, labels_B), want_err, rtol=1e-6)
  np.testing.assert_allclose(ensemble.nll(probs_BxC, labels_B), want_nll, rtol=1e-5)
  want_err, want_nll = _np_metrics(probs_BxC[:9], labels_B[:9])
  # Padded rows hold garbage: all-wrong, confident predictions; they must not count.
  probs_pad = probs_BxC.copy()
  probs_pad[9:] = np.eye(C)[(labels_B[9:] + 1) % C]
  for fn in (ensemble.error_rate, jax.jit(ensemble.error_rate)):
    np.testing.assert_allclose(fn(probs_pad, labels_B, mask_B), want_err, rtol=1e-6)
  for fn in (ensemble.nll, jax.jit(ensemble.nll)):
    np.testing.assert_allclose(fn(probs_pad, labels_B, mask_B), want_nll, rtol=1e-5)


def test_counts_accumulate_exactly_over_batches():
  probs_BxC, labels_B, mask_B = _metric_case()
  total = None
  counts_fn = jax.jit(ensemble.counts)
  for sl in (slice(0, 5), slice(5, 10), slice(10, 12)):
    c = counts_fn(probs_BxC[sl], labels_B[sl], mask_B[sl])
    total = c if total is None else total.merge(c)
  want_err, want_nll = _np_metrics(probs_BxC[:9], labels_B[:9])
  assert int(total.num_examples) == 9
  assert int(total.num_errors) == round(want_err * 9)
  np.testing.assert_allclose(total.sum_nll, want_nll * 9, rtol=1e-5)
  np.testing.assert_allclose(total.error_rate(), want_err, rtol=1e-6)
  np.testing.assert_allclose(total.nll(), want_nll, rtol=1e-5)


def test_metrics_bf16_probs_and_shape_errors():
  probs_BxC, labels_B, _ = _metric_case()
  probs_bf16 = jnp.asarray(probs_BxC, jnp.bfloat16)
  want_err, want_nll = _np_metrics(np.asarray(probs_bf16.astype(jnp.float32)), labels_B)
  assert ensemble.nll(probs_bf16, labels_B).dtype == jnp.float32
  np.testing.assert_allclose(ensemble.nll(probs_bf16, labels_B), want_nll, rtol=1e-5)
  np.testing.assert_allclose(ensemble.error_rate(probs_bf16, labels_B), want_err, rtol=1e-6)
  with pytest.raises(ValueError, match=r"labels_B must have shape \(12,\)"):
    ensemble.error_rate(probs_BxC, labels_B[:3])
  with pytest.raises(ValueError, match=r"mask_B must be None or have shape \(12,\)"):
    ensemble.nll(probs_BxC, labels_B, np.ones(3))
