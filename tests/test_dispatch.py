"""Several updates per dispatch (config.steps_per_dispatch): the same training, bitwise, as one update per dispatch,
with snapshots, saves, the non-finite check and preemption exact; each compiled program compiles once per run."""
import collections
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snapjax import checkpoints, dispatch, training
from snapjax.errors import ConfigError

from helpers import snapshot_arrays, tiny_config

pytestmark = pytest.mark.devices(4)  # In-process runs use conftest's 4 CPU devices.

K = 4
# The tiny run cut into 3 cycles: snapshots at 22, 44 and 64, states every 10 steps, logs every 8, epochs of 16 steps,
# so most of the steps where a dispatch must end are not multiples of K.
SNAPS = (22, 44, 64)
OVERRIDES = {"num_cycles": 3, "eval_snapshots": False}
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class _Compiles:
  """Counts XLA compilations by jitted function name while active (cache hits of the persistent cache count too)."""

  def __enter__(self):
    self.count = collections.Counter()
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def _listen(self, event, duration, **kwargs):
    del duration
    if event == COMPILE_EVENT:
      self.count[kwargs.get("fun_name")] += 1

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


def _run(data_dir, workdir, hooks=None, **overrides):
  """A run of the 3-cycle tiny config; returns (result, {step: train state saved at that step, as NumPy})."""
  saved = {}
  hooks = hooks or training.Hooks()
  hooks.on_state_saved = lambda step, state: saved.update({step: jax.tree.map(np.asarray, state)})
  result = training.train_and_evaluate(tiny_config(data_dir, **{**OVERRIDES, **overrides}), workdir, hooks=hooks)
  return result, saved


def _assert_bitwise(got, want, what):
  leaves_g, tree_g = jax.tree.flatten(got)
  leaves_w, tree_w = jax.tree.flatten(want)
  assert tree_g == tree_w, what
  for g, w in zip(leaves_g, leaves_w):
    assert g.dtype == w.dtype and g.shape == w.shape and g.tobytes() == w.tobytes(), what


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
  """One update per dispatch: (snapshots, final train state)."""
  workdir = str(tmp_path_factory.mktemp("k1"))
  result, saved = _run(tiny_data, workdir, steps_per_dispatch=1)
  assert result.step == 64 and result.snapshot_steps == list(SNAPS)
  return snapshot_arrays(workdir), saved[64]


def test_dispatches_end_at_every_step_the_host_acts_on():
  at, every, total = SNAPS, (8, 10, 16), 64
  ends, step = [], 0
  while step < total:
    step = dispatch.dispatch_end(step, K, total, at=at, every=every)
    ends.append(step)
  acts = set(at) | {s for e in every for s in range(e, total + 1, e)}
  assert acts <= set(ends) and ends[-1] == total  # Every such step ends a dispatch...
  assert all(0 < b - a <= K for a, b in zip([0] + ends, ends))  # ...and no dispatch runs more than K updates.
  assert ends[:8] == [4, 8, 10, 14, 16, 20, 22, 24]
  assert dispatch.dispatch_end(60, K, 62) == 62 and dispatch.dispatch_end(5, 1, 64, at=at, every=every) == 6
  assert dispatch.dispatch_end(0, 100, 64, every=(None, 0)) == 64


def test_canonical_convolutions_make_a_loop_body_compute_like_the_top_level():
  """XLA:CPU rewrites only the entry computation's convolutions into the order its fast kernels need."""
  conv = nn.Conv(8, (3, 3), use_bias=False)
  xs = jax.random.normal(jax.random.key(0), (3, 4, 12, 12, 5))
  params = conv.init(jax.random.key(1), xs[0])

  def update(p, x):
    g = jax.grad(lambda p: jnp.sum(jnp.tanh(conv.apply(p, x))))(p)
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

  top = params
  for x in xs:
    top = jax.jit(update)(top, x)

  def looped(body):
    return jax.jit(lambda p: jax.lax.fori_loop(0, len(xs), lambda i, p: body(p, xs[i]), p))(params)

  _assert_bitwise(looped(dispatch.canonical_convolutions(update)), top, "canonical loop body vs top level")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), looped(update), top)


@pytest.mark.slow
def test_four_steps_per_dispatch_train_bitwise_like_one_and_compile_once(reference, tiny_data, tmp_path):
  snaps, final = reference
  workdir = str(tmp_path / "k4")
  with _Compiles() as compiles:
    result, saved = _run(tiny_data, workdir, steps_per_dispatch=K)
  assert result.step == 64 and not result.preempted
  assert sorted(saved) == [10, 20, 22, 30, 40, 44, 50, 60, 64]  # Saves still exactly at their steps.
  _assert_bitwise(snapshot_arrays(workdir), snaps, "snapshots of K=4 vs K=1")
  _assert_bitwise(saved[64], final, "final train state of K=4 vs K=1")
  # One program for every dispatch length (1..K), one per-epoch permutation program; no single-step program.
  assert compiles.count["jit(train_steps)"] == 1 and compiles.count["jit(epoch_permutation)"] == 1, compiles.count
  assert compiles.count["jit(train_step)"] == 0, compiles.count


@pytest.mark.slow
def test_preempted_inside_a_dispatch_stops_at_its_end_and_resumes_bitwise(reference, tiny_data, tmp_path):
  snaps, final = reference
  workdir = str(tmp_path / "run")
  asked = []

  def stop_at(step):
    asked.append(step)
    return step == 25

  # Dispatches ...21-22 (snapshot), 23-24 (log), 25-28: the notice for step 25 stops the run after step 28.
  first, saved = _run(tiny_data, workdir, training.Hooks(stop_at=stop_at), steps_per_dispatch=K)
  assert first.preempted and first.step == 28
  assert asked == list(range(1, 29))  # Asked about every step, once.
  states = sorted(int(n) for n in os.listdir(os.path.join(workdir, checkpoints.STATE_DIR)) if n.isdigit())
  assert max(saved) == states[-1] == 28
  ckpt = checkpoints.RunCheckpoints(workdir, read_only=True)
  assert ckpt.snapshot_steps() == [22]
  ckpt.close()
  # Resumed with another count per dispatch (it does not change what is trained): same run as K=1.
  second, saved = _run(tiny_data, workdir, steps_per_dispatch=3)
  assert not second.preempted and second.step == 64
  _assert_bitwise(snapshot_arrays(workdir), snaps, "snapshots of a preempted K=4 run resumed with K=3 vs K=1")
  _assert_bitwise(saved[64], final, "final state of a preempted K=4 run resumed with K=3 vs K=1")


def test_nonfinite_update_inside_a_dispatch_is_named_by_its_step(tiny_data, tmp_path):
  bad_step = 46  # Inside the dispatch 45-48; inputs are NaN from update 46 on (1-based, as logged).

  def poison(step_fn):

    def poisoned(state, x, labels):
      return step_fn(state, jnp.where(state["step"] >= bad_step - 1, x * jnp.nan, x), labels)

    return poisoned

  workdir = str(tmp_path / "run")
  with pytest.raises(training.TrainingDiverged) as exc:
    _run(tiny_data, workdir, training.Hooks(wrap_step=poison), steps_per_dispatch=K)
  message = str(exc.value)
  m = re.search(r"non-finite loss or gradient at step (\d+) .*lr=(\S+)\); last good snapshot: step 44 .*"
                r"train state kept at step 44$", message)
  assert m, message
  assert int(m.group(1)) == bad_step
  run_config = tiny_config(tiny_data, **OVERRIDES)
  from snapjax import train_step
  lr = train_step.make_schedule(run_config, 64)(bad_step - 1)
  np.testing.assert_allclose(float(m.group(2)), float(lr), rtol=1e-5)
  ckpt = checkpoints.RunCheckpoints(workdir, read_only=True)
  assert ckpt.snapshot_steps() == [22, 44]
  ckpt.close()


@pytest.mark.parametrize("value", [0, -1, True])  # ConfigDict itself refuses floats and strings.
def test_steps_per_dispatch_must_be_a_positive_integer(tiny_data, tmp_path, value):
  with pytest.raises(ConfigError, match=re.escape(f"steps_per_dispatch must be an integer >= 1, got {value!r}")):
    training.train_and_evaluate(tiny_config(tiny_data, steps_per_dispatch=value), str(tmp_path / "w"))
