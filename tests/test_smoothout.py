"""SmoothOut / AdaSmoothOut: the noise, its schedule and the train step against independent references in here."""
import doctest
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from snapjax import config as config_lib, experiment, schedules, smoothout, train_step, training
from snapjax.errors import ConfigError

from helpers import snapshot_arrays, tiny_config

pytestmark = pytest.mark.devices(4)  # The step runs on conftest's 4 CPU devices, the batch sharded over them.

NUM_DEVICES, BATCH = 4, 32
TOTAL_STEPS = 20
DROPOUT_KEY = jax.random.PRNGKey(3)


class SmoothNet(nn.Module):
  """Conv -> BatchNorm -> tanh -> pooled Dense: kernels of rank 4 and 2, biases, BatchNorm, and a loss smooth
  in the weights (with ReLUs, the last-bit differences between two ways of adding the noise move some
  activations across a kink and the gradients differ visibly)."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(10)(jnp.tanh(x).mean((1, 2)))


@pytest.fixture(scope="module")
def setup():
  """SmoothNet on a random 8x8x1 batch of 32 sharded over 4 devices; parameters moved off their init values."""
  mesh = experiment.make_mesh()
  model = SmoothNet()
  schedule = schedules.snapshot_schedule(0.1, TOTAL_STEPS, 2)
  tx = train_step.make_optimizer(tiny_config(""), schedule)
  variables = model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 8, 8, 1)), train=False)
  rng = np.random.default_rng(0)
  # Moved off the init (BatchNorm scale 1, biases 0), so weight-relative noise is non-zero everywhere.
  params = jax.tree.map(lambda w: w + 0.05 * rng.standard_normal(w.shape).astype(np.float32), variables["params"])
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": variables["batch_stats"],
           "opt_state": tx.init(params)}
  x = rng.standard_normal((BATCH, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 10, BATCH).astype(np.int32)
  sharded = NamedSharding(mesh, P(experiment.DATA_AXIS))
  return dict(model=model, tx=tx, schedule=schedule, x=x, y=y, state=jax.device_get(state),
              placed=(jax.device_put(state, NamedSharding(mesh, P())), jax.device_put(x, sharded),
                      jax.device_put(y, sharded)))


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


# ------------------------------------------------------------------------------------ independent references

def ref_coefficient(schedule, t, total, index=0.55, scale=10.0):
  if schedule == "constant":
    return 1.0
  if schedule == "anneal":
    return (1.0 / (1.0 + t) ** index) ** 0.5
  return (math.tanh(scale * (t / total - 0.5)) + 1.0) / 2.0


def ref_draws(dropout_key, step, chunk, params):
  """The documented key derivation: the noise stream (2**32 - 1), then step, then chunk; one split per leaf."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(dropout_key, 2**32 - 1), step), chunk)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef, [np.asarray(jax.random.uniform(k, w.shape, jnp.float32, -1.0, 1.0), np.float64)
                   for k, w in zip(keys, leaves)]


def ref_noise(kind, dropout_key, step, chunk, params, bound):
  treedef, draws = ref_draws(dropout_key, step, chunk, params)
  out = []
  for u, w in zip(draws, jax.tree.leaves(params)):
    w = np.asarray(w, np.float64)
    if kind == "uniform":
      n = bound * u
    elif kind == "weight":
      n = bound * u * np.abs(w)
    elif w.ndim <= 1:
      n = bound * np.sign(u) * np.abs(w)
    else:
      axes = tuple(range(w.ndim - 1))
      n = bound * u * np.sqrt((w ** 2).sum(axes, keepdims=True)) / np.sqrt((u ** 2).sum(axes, keepdims=True))
    out.append(n.astype(np.float32))
  return jax.tree.unflatten(treedef, out)


def ref_chunk(a, k, num_chunks):
  """Chunk k: the k-th of num_chunks slices of each device's local batch (8 examples each), devices in order."""
  local, per = BATCH // NUM_DEVICES, BATCH // NUM_DEVICES // num_chunks
  return np.concatenate([a[d * local + k * per: d * local + (k + 1) * per] for d in range(NUM_DEVICES)])


# -------------------------------------------------------------------------------------------------- tests

def test_docstring_examples_run():
  result = doctest.testmod(smoothout, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0 and result.attempted >= 9


@pytest.mark.parametrize("kind, chunks", [("uniform", 1), ("weight", 2), ("filter", 4)])
def test_a_zero_is_exactly_the_plain_step(setup, kind, chunks):
  config = tiny_config("", smoothout_a=0.0, smoothout_noise=kind, smoothout_chunks=chunks,
                       smoothout_schedule="tanh")
  assert train_step.make_smoothout(config, train_step.Plan(16, 64, (32, 64))) is None
  args = (setup["model"], setup["tx"], setup["schedule"], DROPOUT_KEY)
  plain = jax.jit(train_step.make_train_step(*args))
  off = jax.jit(train_step.make_train_step(*args, smoothout.SmoothOut(0.0, kind, chunks, "tanh", TOTAL_STEPS),
                                           NUM_DEVICES))
  state, x, y = setup["placed"]
  assert plain.lower(state, x, y).as_text() == off.lower(state, x, y).as_text()  # One program.
  s_plain = s_off = state
  for _ in range(3):
    s_plain, m_plain = plain(s_plain, x, y)
    s_off, m_off = off(s_off, x, y)
    jax.tree.map(np.testing.assert_array_equal, _host(s_off), _host(s_plain))
    jax.tree.map(np.testing.assert_array_equal, _host(m_off), _host(m_plain))
  assert "smoothout_a" not in m_off


@pytest.mark.parametrize("kind, chunks, schedule, a, step", [
    ("uniform", 1, "constant", 0.05, 0), ("filter", 1, "tanh", 0.5, 13), ("weight", 2, "anneal", 0.3, 5)])
def test_update_equals_optax_update_of_the_noisy_gradient(setup, kind, chunks, schedule, a, step):
  model, tx = setup["model"], setup["tx"]
  so = smoothout.SmoothOut(a, kind, chunks, schedule, TOTAL_STEPS)
  jitted = jax.jit(train_step.make_train_step(model, tx, setup["schedule"], DROPOUT_KEY, so, NUM_DEVICES))
  state, x, y = setup["placed"]
  state = {**state, "step": jnp.int32(step)}  # Only the coefficient and noise keys read it (optax counts its own).
  compiled = jitted.lower(state, x, y).compile()
  # The chunks are cut from each device's own batch: nothing but the usual all-reduces crosses devices.
  hlo = compiled.as_text()
  assert not [op for op in ("all-gather", "all-to-all", "collective-permute") if op in hlo]
  new_state, metrics = _host(compiled(state, x, y))

  # Independent path: noise added here, jax.grad of the plain loss, running statistics threaded by hand.
  def loss_fn(params, batch_stats, x, y):
    logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                   mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_vars["batch_stats"]

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  clean, batch_stats = setup["state"]["params"], setup["state"]["batch_stats"]
  bound = a * ref_coefficient(schedule, step, TOTAL_STEPS)
  grads, losses = [], []
  for k in range(chunks):
    noisy = jax.tree.map(np.add, clean, ref_noise(kind, DROPOUT_KEY, step, k, clean, bound))
    (loss, batch_stats), g = grad_fn(noisy, batch_stats, ref_chunk(setup["x"], k, chunks),
                                     ref_chunk(setup["y"], k, chunks))
    grads.append(g)
    losses.append(float(loss))
  grad = jax.tree.map(lambda *g: sum(g) / chunks, *grads)
  updates, _ = tx.update(grad, setup["state"]["opt_state"], clean)
  expected = _host(optax.apply_updates(clean, updates))

  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=0, atol=1e-6), new_state["params"],
               expected)
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6),
               new_state["batch_stats"], _host(batch_stats))
  np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(metrics["smoothout_a"], bound, rtol=1e-6)
  assert int(new_state["step"]) == step + 1
  # The noise matters: the gradient at the clean weights gives a visibly different update.
  (_, _), plain_grad = grad_fn(clean, setup["state"]["batch_stats"], setup["x"], setup["y"])
  plain = _host(optax.apply_updates(clean, tx.update(plain_grad, setup["state"]["opt_state"], clean)[0]))
  assert max(float(np.max(np.abs(p - q))) for p, q in zip(jax.tree.leaves(plain), jax.tree.leaves(expected))) > 1e-4


def test_noise_kinds_have_their_bounds_and_filter_norms(setup):
  params = setup["state"]["params"]
  bound = 0.3 * ref_coefficient("tanh", 12, TOTAL_STEPS)
  _, draws = ref_draws(DROPOUT_KEY, 12, 1, params)
  leaves = [np.asarray(w, np.float64) for w in jax.tree.leaves(params)]
  assert {w.ndim for w in leaves} == {1, 2, 4}  # Biases and BatchNorm, the classifier, the convolutions.

  key = smoothout.noise_key(DROPOUT_KEY, 12, 1)
  uniform = [np.asarray(n, np.float64) for n in jax.tree.leaves(smoothout.noise("uniform", key, params, bound))]
  for n, u in zip(uniform, draws):
    assert np.all(np.abs(n) <= bound)
    np.testing.assert_allclose(n, bound * u, rtol=1e-6)  # The documented draw, scaled.
  assert max(np.abs(n).max() for n in uniform) > 0.9 * bound

  weight = [np.asarray(n, np.float64) for n in jax.tree.leaves(smoothout.noise("weight", key, params, bound))]
  for n, w in zip(weight, leaves):
    assert np.all(np.abs(n) <= bound * np.abs(w) * (1 + 1e-6))

  filt = [np.asarray(n, np.float64) for n in jax.tree.leaves(smoothout.noise("filter", key, params, bound))]
  for n, w, u in zip(filt, leaves, draws):
    assert n.shape == w.shape
    if w.ndim == 1:
      np.testing.assert_allclose(np.abs(n), bound * np.abs(w), rtol=1e-5)
      np.testing.assert_array_equal(np.sign(n), np.sign(u))
      continue
    for j in range(w.shape[-1]):  # One filter per output unit: the kernel's last axis.
      np.testing.assert_allclose(np.linalg.norm(n[..., j]), bound * np.linalg.norm(w[..., j]), rtol=1e-5)
      np.testing.assert_allclose(n[..., j] / np.linalg.norm(n[..., j]), u[..., j] / np.linalg.norm(u[..., j]),
                                 rtol=1e-4, atol=1e-6)


def test_filter_draw_below_the_guard_is_not_rescaled():
  u = np.ones((2, 3), np.float32)
  u[:, 1] = 1e-8  # Norm ~1.4e-8 < 1e-6: kept as drawn (no division by ~0).
  w = np.full((2, 3), 2.0, np.float32)
  n = np.asarray(smoothout._leaf_noise("filter", jnp.asarray(u), jnp.asarray(w), jnp.float32(0.5)))
  assert np.all(np.isfinite(n))
  np.testing.assert_allclose(n[:, 1], 0.5e-8, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(n[:, 0]), 0.5 * np.linalg.norm(w[:, 0]), rtol=1e-6)


@pytest.mark.parametrize("schedule, index, scale", [
    ("constant", 0.55, 10.0), ("anneal", 0.55, 10.0), ("anneal", 0.3, 10.0), ("tanh", 0.55, 10.0),
    ("tanh", 0.55, 3.0)])
def test_coefficient_matches_the_closed_forms(schedule, index, scale):
  total = 100
  so = smoothout.SmoothOut(0.02, "uniform", 1, schedule, total, anneal_index=index, tanh_scale=scale)
  for t in (0, 1, 7, 50, 99, 100):
    want = ref_coefficient(schedule, t, total, index, scale)
    np.testing.assert_allclose(float(smoothout.coefficient(schedule, t, total, anneal_index=index,
                                                           tanh_scale=scale)), want, rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(so.bound)(jnp.int32(t))), 0.02 * want, rtol=1e-6)


def test_bad_smoothout_settings_are_value_errors():
  with pytest.raises(ValueError, match="noise='gauss'.*filter"):
    smoothout.SmoothOut(0.1, "gauss")
  with pytest.raises(ValueError, match="schedule='cos'.*tanh"):
    smoothout.SmoothOut(0.1, schedule="cos")
  with pytest.raises(ValueError, match="chunks must be an integer >= 1"):
    smoothout.SmoothOut(0.1, chunks=0)


def test_chunks_must_divide_the_per_device_batch_only_while_smoothout_is_on():
  config_lib.validate(tiny_config("", smoothout_chunks=3), NUM_DEVICES)  # Off: the field is unused.
  config_lib.validate(tiny_config("", smoothout_a=0.01, smoothout_chunks=8), NUM_DEVICES)
  with pytest.raises(ConfigError, match="smoothout_chunks=3 does not divide the per-device batch 8"):
    config_lib.validate(tiny_config("", smoothout_a=0.01, smoothout_chunks=3), NUM_DEVICES)


# ----------------------------------------------------------------------------------------- end to end

def _flat(tree):
  """{key path: host copy} of a replicated pytree (jax.Arrays: this process's copy) or of a NumPy tree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0) if isinstance(v, jax.Array) else v)
          for k, v in leaves}


def _train(config, workdir, **hooks):
  saved, restored, metric_keys = {}, {}, set()

  def wrap_step(step_fn):
    def wrapped(state, x, y):
      new_state, metrics = step_fn(state, x, y)
      metric_keys.update(metrics)  # At trace time: which metrics the loop's step returns.
      return new_state, metrics
    return wrapped

  result = training.train_and_evaluate(config, workdir, hooks=training.Hooks(
      wrap_step=wrap_step, on_state_saved=lambda step, state: saved.update({step: _flat(state)}),
      on_state_restored=lambda step, state: restored.update({step: _flat(state)}), **hooks))
  return result, saved, restored, metric_keys


@pytest.mark.slow
def test_training_with_smoothout_saves_clean_weights_and_resumes_bitwise(tiny_data, tmp_path):
  # Two epochs of 16 steps, 2 cycles: snapshots at 16 and 32, train states every 10 steps and at the snapshots.
  config = tiny_config(tiny_data, num_epochs=2.0, smoothout_a=0.02, smoothout_noise="filter", smoothout_chunks=2,
                       smoothout_schedule="tanh", eval_snapshots=False,
                       steps_per_dispatch=1)  # Stops exactly at step 13 (a dispatch of 16 would end at 16).
  full, saved, _, keys = _train(config, str(tmp_path / "full"))
  assert full["step"] == 32 and "smoothout_a" in keys
  assert sorted(saved) == [10, 16, 20, 30, 32]
  snaps = snapshot_arrays(str(tmp_path / "full"))
  for step in (16, 32):  # Snapshots are the saved states' weights: what the step returned, no noise on them.
    for k, v in _flat(snaps[step]).items():
      np.testing.assert_array_equal(v, saved[step][k], err_msg=k)
  assert {k.split("]")[0] + "]" for k in saved[32]} == {"['batch_stats']", "['opt_state']", "['params']",
                                                        "['step']"}

  workdir = str(tmp_path / "resumed")
  first, saved_first, _, _ = _train(config, workdir, stop_at=lambda step: step == 13)
  assert first["preempted"] and first["step"] == 13
  second, saved_second, restored, _ = _train(config, workdir)
  assert not second["preempted"] and second["step"] == 32
  assert list(restored) == [13]
  for k, v in saved_first[13].items():  # The state read back is the one the step computed, bit for bit.
    np.testing.assert_array_equal(restored[13][k], v, err_msg=k)
  for step in (10, 16, 20, 30, 32):  # Before and after the interruption: the uninterrupted run's states.
    state = saved_first.get(step, saved_second.get(step))
    for k, v in saved[step].items():
      np.testing.assert_array_equal(state[k], v, err_msg=f"{step} {k}")
  resumed = snapshot_arrays(workdir)
  assert sorted(resumed) == [16, 32]
  for step in resumed:
    jax.tree.map(np.testing.assert_array_equal, resumed[step], snaps[step])
