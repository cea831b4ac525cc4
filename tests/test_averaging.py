"""SWA, EMA and SWAG in training: the average in the train state against NumPy over the iterates a hook kept from the
same run, the averaged snapshot, BatchNorm statistics, resuming mid-average bitwise, and K = 2 members."""
import jax
import numpy as np
import pytest

from helpers import snapshot_arrays, tiny_config
from snapjax import averaging, bn_data, checkpoints, experiment, training, weight_space

pytestmark = pytest.mark.slow

# 16 steps/epoch, 64 updates. SWA from epoch 2 (update 32) every 8 updates: collections after 32, 40, ..., 64.
SWA = dict(method="swa", schedule="swa", num_cycles=1, swa_start=2.0, swa_every_steps=8, swa_lr=0.05,
           eval_snapshots=False, checkpoint_every_steps=8)


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a).copy(), tree)


def _train_keeping_states(config, workdir, **hooks):
  """Train; every saved train state (each checkpoint_every_steps) kept on the host by the on_state_saved hook."""
  states = {}
  result = training.train_and_evaluate(config, workdir, hooks=training.Hooks(
      on_state_saved=lambda step, state: states.__setitem__(step, _np(state)), **hooks))
  return result, states


def _assert_tree_close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


@pytest.mark.parametrize("smoothout_a", [0.0, 0.01])  # The plain step, and SmoothOut's under the same average.
def test_swa_average_is_the_mean_of_the_collected_iterates(tiny_data, tmp_path, smoothout_a):
  config = tiny_config(tiny_data, **SWA, swa_bn="average", smoothout_a=smoothout_a)
  result, states = _train_keeping_states(config, str(tmp_path / "run"))
  assert result.snapshot_steps == [64]
  collected = [states[s] for s in (32, 40, 48, 56, 64)]
  final = states[64]["average"]
  assert int(final["count"]) == 5
  mean = lambda key: jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), 0), *[c[key] for c in collected])
  _assert_tree_close(final["mean"], mean("params"), rtol=1e-5, atol=1e-7)
  _assert_tree_close(final["batch_stats"], mean("batch_stats"), rtol=1e-5, atol=1e-7)
  assert int(states[24]["average"]["count"]) == 0  # Nothing before swa_start.
  # The snapshot is the averaged network, with the averaged statistics (swa_bn="average").
  snap = snapshot_arrays(str(tmp_path / "run"))[64]
  jax.tree.map(np.testing.assert_array_equal, snap, {"params": final["mean"], "batch_stats": final["batch_stats"]})


def test_swa_snapshot_statistics_are_measured_on_training_batches(tiny_data, tmp_path):
  config = tiny_config(tiny_data, **SWA, swa_bn_batches=4)
  _, states = _train_keeping_states(config, str(tmp_path / "run"))
  snap = snapshot_arrays(str(tmp_path / "run"))[64]
  final = states[64]
  jax.tree.map(np.testing.assert_array_equal, snap["params"], final["average"]["mean"])
  exp = experiment.build(config)
  arrays = exp.load_split(exp.spec.train_split)
  want = weight_space.recompute_batch_stats(bn_data.train_apply_fn(exp), {"params": final["average"]["mean"],
                                            "batch_stats": final["batch_stats"]}, bn_data.bn_batches(exp, arrays, 4))
  _assert_tree_close(snap["batch_stats"], _np(want["batch_stats"]), rtol=1e-6, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(snap["batch_stats"])[0], jax.tree.leaves(final["batch_stats"])[0])


def test_ema_is_the_numpy_recursion_over_every_update(tiny_data, tmp_path):
  decay = 0.8
  config = tiny_config(tiny_data, method="ema", schedule="step", num_cycles=1, num_epochs=1.0, ema_decay=decay,
                       eval_snapshots=False, checkpoint_every_steps=1)
  _, states = _train_keeping_states(config, str(tmp_path / "run"))
  ema = None
  for step in range(1, 17):
    p = jax.tree.map(lambda a: a.astype(np.float64), states[step]["params"])
    ema = p if ema is None else jax.tree.map(lambda e, x: decay * e + (1 - decay) * x, ema, p)
    assert int(states[step]["average"]["count"]) == step
    _assert_tree_close(states[step]["average"]["mean"], ema, rtol=2e-5, atol=1e-7)


def test_resume_mid_average_is_bitwise(tiny_data, tmp_path):
  config = tiny_config(tiny_data, **{**SWA, "checkpoint_every_steps": 4})  # Dispatches end every 4: a stop at 44.
  full, full_states = _train_keeping_states(config, str(tmp_path / "full"))
  stopped = training.train_and_evaluate(config, str(tmp_path / "resumed"),
                                        hooks=training.Hooks(stop_at=lambda step: step == 44))
  assert stopped.preempted and stopped.step == 44
  _, states = _train_keeping_states(config, str(tmp_path / "resumed"))
  jax.tree.map(np.testing.assert_array_equal, states[64], full_states[64])  # The average included.
  jax.tree.map(np.testing.assert_array_equal, snapshot_arrays(str(tmp_path / "resumed"))[64],
               snapshot_arrays(str(tmp_path / "full"))[64])


def test_swag_moments_are_those_of_the_collected_iterates(tiny_data, tmp_path):
  config = tiny_config(tiny_data, **{**SWA, "method": "swag"}, swag_rank=3)
  _, states = _train_keeping_states(config, str(tmp_path / "run"))
  thetas = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(states[s]["params"])]).astype(np.float64)
            for s in (32, 40, 48, 56, 64)]
  thetas = np.stack(thetas)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  final = states[64]["average"]
  np.testing.assert_allclose(flat(final["mean"]), thetas.mean(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(flat(final["sq_mean"]), (thetas ** 2).mean(0), rtol=1e-5, atol=1e-8)
  running = np.cumsum(thetas, 0) / np.arange(1, 6)[:, None]
  devs = thetas - running  # Iterates 3, 4, 5 in ring columns 2, 0, 1.
  cols = [flat(jax.tree.map(lambda d, j=j: d[j], final["deviations"])) for j in range(3)]
  for i, j in ((2, 2), (3, 0), (4, 1)):
    np.testing.assert_allclose(cols[j], devs[i], rtol=1e-4, atol=1e-6)
  # Saved beside the snapshot, as the state holds them.
  ckpt = checkpoints.RunCheckpoints(str(tmp_path / "run"), read_only=True)
  saved = ckpt.restore_extra(64, "swag", jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), averaging.swag_moments(states[64])))
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, _np(saved), averaging.swag_moments(states[64]))


@pytest.mark.devices(4)
def test_swa_with_two_members_averages_each_member(tiny_data, tmp_path):
  config = tiny_config(tiny_data, **SWA, num_members=2, swa_bn="average")
  _, states = _train_keeping_states(config, str(tmp_path / "run"))
  final = states[64]["average"]
  assert np.asarray(final["count"]).tolist() == [5, 5]
  for k in range(2):
    collected = [jax.tree.map(lambda a: a[k], states[s]["params"]) for s in (32, 40, 48, 56, 64)]
    want = jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), 0), *collected)
    _assert_tree_close(jax.tree.map(lambda a: a[k], final["mean"]), want, rtol=1e-5, atol=1e-7)
  ckpt = checkpoints.RunCheckpoints(str(tmp_path / "run"), read_only=True)
  assert ckpt.snapshot_steps() == [64]
  ckpt.close()
