"""SingleCycle Ensembles (method="single_cycle"): M freshly initialised models, one cosine cycle each, 4 fake devices.

The tiny config with 3 cycles: 64 updates, cycles of ceil(64 / 3) = 22, snapshots at 22, 44 and 64.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snapjax import checkpoints, evaluation, experiment, training

from helpers import NUM_TEST, snapshot_arrays, tiny_config

pytestmark = pytest.mark.devices(4)

SNAPSHOT_STEPS = [22, 44, 64]


def _config(tiny_data, **overrides):
  return tiny_config(tiny_data, method="single_cycle", num_cycles=3, **overrides)


def _copy(tree):
  """Host copies of a state's arrays: the loop donates the state to the next update."""
  return jax.tree.map(lambda a: np.array(a, copy=True), tree)


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
  """One uninterrupted SingleCycle run; every fresh model's state (on_init) and the states saved at cycle ends."""
  workdir = str(tmp_path_factory.mktemp("single_cycle"))
  fresh, saved = [], {}
  hooks = training.Hooks(
      on_init=lambda state: fresh.append(_copy(state)) or state,
      on_state_saved=lambda step, state: saved.update({step: _copy(state)}) if step in SNAPSHOT_STEPS else None)
  result = training.train_and_evaluate(_config(tiny_data), workdir, hooks=hooks)
  return workdir, result, fresh, saved


def _largest(tree):
  """The largest array of a pytree (a convolution kernel, never an all-zero bias)."""
  return max(jax.tree.leaves(tree), key=np.size)


def _init_key(seed=0):
  """The loop's init key, restated: the first of four keys split from PRNGKey(seed)."""
  return jax.random.split(jax.random.PRNGKey(seed), 4)[0]


def test_one_snapshot_per_model_scored_and_ensembled_by_eval(run, tmp_path):
  workdir, result, _, _ = run
  assert not result.preempted and result.step == 64
  assert result.snapshot_steps == SNAPSHOT_STEPS
  assert [s["step"] for s in result.snapshot_scores] == SNAPSHOT_STEPS
  assert all(s["count"] == NUM_TEST and np.isfinite(s["nll"]) for s in result.snapshot_scores)
  exp = experiment.build(evaluation.load_run_config(workdir))
  ckpt = checkpoints.RunCheckpoints(workdir, read_only=True)
  try:
    assert ckpt.snapshot_steps() == SNAPSHOT_STEPS
    metas = [ckpt.restore_snapshot(s, exp.abstract_variables())[1] for s in SNAPSHOT_STEPS]
  finally:
    ckpt.close()
  assert [(m["method"], m["model"], m["cycle"]) for m in metas] == [("single_cycle", k, k + 1) for k in range(3)]
  for m, score in zip(metas, result.snapshot_scores):
    assert m["test_error"] == score["error"]
  report = evaluation.evaluate_runs([workdir], out_dir=str(tmp_path), plot=False)
  assert [s["step"] for s in report["snapshots"]] == SNAPSHOT_STEPS
  assert [e["m"] for e in report["ensembles"]] == [1, 2, 3]


def test_first_cycle_is_the_snapshot_ensembles_first_cycle(run, tiny_data, tmp_path):
  workdir = str(tmp_path / "snapshot")
  se = tiny_config(tiny_data, num_cycles=3, eval_snapshots=False)  # The same run as a Snapshot Ensemble.
  assert training.train_and_evaluate(se, workdir, hooks=training.Hooks(stop_at=lambda s: s == 22)).preempted
  first, ours = snapshot_arrays(workdir), snapshot_arrays(run[0])
  assert sorted(first) == [22]
  jax.tree.map(np.testing.assert_array_equal, ours[22], first[22])
  # After the hand-over the runs part: model 1 is not a continuation of model 0.
  assert not np.array_equal(_largest(ours[44]), _largest(ours[22]))


def test_each_model_starts_from_its_own_fresh_init_with_zero_momentum(run, tiny_data):
  _, _, fresh, saved = run
  assert [int(s["step"]) for s in fresh] == [0, 22, 44]  # Model 0 before training, then one per cycle end.
  exp = experiment.build(_config(tiny_data))
  x = jnp.zeros((1, *exp.input_shape), jnp.float32)
  # Independent of the loop's init, but jitted as it is: eager and jitted sampling differ in the last bit (XLA
  # fuses the normal's inverse-erf differently).
  init = jax.jit(lambda key: exp.model.init({"params": key, "dropout": key}, x, train=False))
  num_params = sum(a.size for a in jax.tree.leaves(fresh[0]["params"]))
  for k, state in enumerate(fresh):
    key = _init_key() if k == 0 else jax.random.fold_in(_init_key(), k)
    expected = init(key)
    jax.tree.map(np.testing.assert_array_equal, state["params"], jax.device_get(expected["params"]))
    jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], jax.device_get(expected["batch_stats"]))
    opt_leaves = jax.tree.leaves(state["opt_state"])
    momentum = [a for a in opt_leaves if np.issubdtype(a.dtype, np.floating)]
    assert sum(a.size for a in momentum) == num_params and all(not a.any() for a in momentum)
    # The optimiser's update counts go on with the step (the schedule and the data order continue).
    assert [int(a) for a in opt_leaves if np.issubdtype(a.dtype, np.integer)] == [int(state["step"])]
  for k in (1, 2):  # Independent inits, and the hand-over really dropped the momentum of the model that ended.
    assert not np.array_equal(_largest(fresh[k]["params"]), _largest(fresh[0]["params"]))
    ended = [a for a in jax.tree.leaves(saved[SNAPSHOT_STEPS[k - 1]]["opt_state"]) if a.dtype.kind == "f"]
    assert any(a.any() for a in ended)


@pytest.mark.parametrize("stop_at", [22, 33])  # At a cycle end (the state holds model 0's end); inside model 1.
def test_interrupted_run_resumes_to_identical_snapshots(run, tiny_data, tmp_path, stop_at):
  workdir = str(tmp_path / "run")
  config = _config(tiny_data, eval_snapshots=False)  # eval_snapshots may change on resume: training is the same.
  # One update per dispatch, so the run stops exactly at stop_at; the reference run dispatches the default 16.
  config.steps_per_dispatch = 1
  restored = []
  first = training.train_and_evaluate(config, workdir, hooks=training.Hooks(stop_at=lambda step: step == stop_at))
  assert first.preempted and first.step == stop_at
  second = training.train_and_evaluate(
      config, workdir, hooks=training.Hooks(on_state_restored=lambda step, state: restored.append(step)))
  assert restored == [stop_at] and not second.preempted and second.step == 64
  resumed, reference = snapshot_arrays(workdir), snapshot_arrays(run[0])
  assert sorted(resumed) == sorted(reference) == SNAPSHOT_STEPS
  for step in SNAPSHOT_STEPS:
    jax.tree.map(np.testing.assert_array_equal, resumed[step], reference[step])
