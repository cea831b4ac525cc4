"""Ensemble members side by side (config.num_members, snapjax/members.py) on 4 fake CPU devices.

The oracle: member k of a K-member run ends with the snapshots of the 1-member run with seed + k. The runs are
the tiny config cut to one epoch (16 steps) at init_lr=1e-4, as tests/test_multihost.py does: two layouts of one
computation differ only in the order of their float sums (here: the gradient and BatchNorm sums of a member are
split over D / G devices instead of D), and at the tiny config's init_lr of 0.1 training amplifies that order
(measured: 9e-4 after 32 steps, 0.1 after 64), at 1e-4 it does not.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from snapjax import checkpoints, config as config_lib, ensemble, evaluation, experiment, members, runs, training
from snapjax.errors import ConfigError

from helpers import NUM_TEST, snapshot_arrays, tiny_config

pytestmark = pytest.mark.devices(4)

SEED = 3
OVERRIDES = {"num_epochs": 1.0, "init_lr": 1e-4, "seed": SEED, "checkpoint_every_steps": 5, "log_every_steps": 4}
SNAPSHOT_STEPS = [8, 16]
ATOL = 1e-5  # Params: 10x the summation-order drift tests/test_multihost.py measured at this lr.
# BatchNorm's running variance (E[x^2] - E[x]^2, a cancelling sum) moves further when a member's batch statistics
# are summed over 2 devices of 16 examples instead of 4 of 8: measured up to 1.5e-4 relative (1.7e-5 absolute).
BN_RTOL = 1e-3


def _assert_close(variables, reference):
  """Params within ATOL; BatchNorm statistics within BN_RTOL relative (plus ATOL)."""
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=ATOL), variables["params"],
               reference["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=BN_RTOL, atol=ATOL), variables["batch_stats"],
               reference["batch_stats"])


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _member_snapshots(workdir):
  """{(member, step): variables} of a run, read back as eval.py does."""
  exp = experiment.build(evaluation.load_run_config(workdir))
  return {(m.member, m.step): jax.tree.map(np.asarray, m.variables)
          for m in evaluation.restore_members([workdir], exp)}


@pytest.fixture(scope="module")
def seed_runs(tiny_data, tmp_path_factory):
  """The 1-member runs with seeds SEED and SEED + 1: {seed: {step: variables}}."""
  out = {}
  for seed in (SEED, SEED + 1):
    workdir = str(tmp_path_factory.mktemp(f"seed{seed}"))
    training.train_and_evaluate(tiny_config(tiny_data, **{**OVERRIDES, "seed": seed}), workdir)
    out[seed] = snapshot_arrays(workdir)
  return out


@pytest.fixture(scope="module")
def k2_run(tiny_data, tmp_path_factory):
  """A K = 2 run on a (2, 2) member x data mesh: (workdir, result, train states saved {step: state})."""
  workdir = str(tmp_path_factory.mktemp("k2"))
  saved = {}
  hooks = training.Hooks(on_state_saved=lambda step, state: saved.update({step: jax.device_get(state)}))
  result = training.train_and_evaluate(tiny_config(tiny_data, num_members=2, member_groups=2, **OVERRIDES), workdir,
                                       hooks=hooks)
  return workdir, result, saved


# Member axis of 2 groups x 2 data devices (the default strategy, "loop"); one group, by lax.map and by vmap.
@pytest.mark.slow
@pytest.mark.parametrize("groups, strategy", [(2, "auto"), (1, "map"), (1, "vmap")])
def test_k2_members_equal_the_runs_with_seeds_s_and_s_plus_1(seed_runs, k2_run, tiny_data, tmp_path, groups, strategy):
  if groups == 2:
    workdir, result, _ = k2_run
  else:
    workdir = str(tmp_path / "k2g1")
    result = training.train_and_evaluate(tiny_config(tiny_data, num_members=2, member_groups=1,
                                                     member_strategy=strategy, **OVERRIDES), workdir)
  assert not result.preempted and result.step == 16
  assert [(s["member"], s["step"]) for s in result.snapshot_scores] == [(0, 8), (1, 8), (0, 16), (1, 16)]
  snaps = _member_snapshots(workdir)
  assert sorted(snaps) == [(k, s) for k in (0, 1) for s in SNAPSHOT_STEPS]
  diffs = {key: _max_abs_diff(v, seed_runs[SEED + key[0]][key[1]]) for key, v in snaps.items()}
  print(f"member_groups={groups}, {strategy}: max |member - seed run| per (member, step): {diffs}")
  for (k, step), v in snaps.items():
    _assert_close(v, seed_runs[SEED + k][step])
  assert _max_abs_diff(snaps[(0, 16)], snaps[(1, 16)]) > 1e-3  # Independent members.


def test_snapshot_layout_and_metadata_record_the_members(k2_run, tiny_data):
  workdir, _, _ = k2_run
  exp = experiment.build(evaluation.load_run_config(workdir))
  ckpt = checkpoints.RunCheckpoints(workdir, read_only=True)
  try:
    assert ckpt.snapshot_steps() == SNAPSHOT_STEPS
    # Plain orbax, as README documents: snapshots/<step>/variables holds every leaf with a leading member axis.
    import orbax.checkpoint as ocp
    raw = ocp.StandardCheckpointer().restore(ckpt.snapshot_path(16) + "/variables")
    kernel = raw["params"]["stem_conv"]["kernel"]
    assert kernel.shape[0] == 2
    abstract = runs.stacked_abstract(exp.abstract_variables(), 2)
    _, meta = ckpt.restore_snapshot(16, abstract)
  finally:
    ckpt.close()
  assert meta["members"] == [0, 1] and meta["seeds"] == [SEED, SEED + 1] and meta["step"] == 16
  assert len(meta["test_error"]) == 2
  np.testing.assert_array_equal(np.asarray(kernel)[1], _member_snapshots(workdir)[(1, 16)]["params"]["stem_conv"][
      "kernel"])


@pytest.mark.slow
def test_eval_reports_every_member_and_the_true_ensemble(k2_run, seed_runs, tiny_data, tmp_path):
  workdir, result, _ = k2_run
  report = evaluation.evaluate_runs([workdir], out_dir=str(tmp_path), plot=False)
  assert [(s["member"], s["step"]) for s in report["snapshots"]] == [(0, 8), (1, 8), (0, 16), (1, 16)]
  for s, logged in zip(report["snapshots"], result.snapshot_scores):
    assert s["error"] == logged["error"]
  assert [(m["member"], m["seed"], m["steps"]) for m in report["members"]] == [
      (0, SEED, SNAPSHOT_STEPS), (1, SEED + 1, SNAPSHOT_STEPS)]
  true = report["true_ensemble"]
  assert true["size"] == 2 and [(t["member"], t["step"]) for t in true["members"]] == [(0, 16), (1, 16)]
  # Naive reference: the mean softmax of the chosen snapshots, applied one by one.
  from snapjax import data
  exp = experiment.build(evaluation.load_run_config(workdir))
  images, labels = data.load_fashion_mnist(tiny_data, "test")
  x = data.normalize(images, exp.spec)
  snaps = _member_snapshots(workdir)
  probs = {key: np.asarray(jax.nn.softmax(exp.apply_fn(v, x)), np.float64) for key, v in snaps.items()}

  def error(keys):
    return float(np.mean(np.mean([probs[k] for k in keys], 0).argmax(-1) != labels))

  np.testing.assert_allclose(true["error"], error([(0, 16), (1, 16)]), atol=1e-9)
  for k, m in enumerate(report["members"]):
    assert [e["m"] for e in m["ensembles"]] == [1, 2]
    np.testing.assert_allclose(m["ensembles"][0]["error"], error([(k, 16)]), atol=1e-9)
    np.testing.assert_allclose(m["ensembles"][1]["error"], error([(k, 8), (k, 16)]), atol=1e-9)
  np.testing.assert_allclose(report["ensemble"]["error"], error(list(snaps)), atol=1e-9)
  assert report["ensemble"]["m"] == 4 and report["num_test_examples"] == NUM_TEST
  # Several K-member runs (and 1-member runs) ensemble together: every member of every run.
  seed_dir = str(tmp_path / "seed_run")
  training.train_and_evaluate(tiny_config(tiny_data, **{**OVERRIDES, "seed": 7}), seed_dir)
  both = evaluation.evaluate_runs([workdir, seed_dir], out_dir=str(tmp_path / "both"), plot=False)
  assert len(both["snapshots"]) == 6 and both["true_ensemble"]["size"] == 3
  assert [(m["workdir"], m["member"]) for m in both["members"]] == [(workdir, 0), (workdir, 1), (seed_dir, 0)]


@pytest.mark.parametrize("stop_at", [5, 8])  # Between saves; at a snapshot.
def test_interrupted_k2_run_resumes_bitwise(k2_run, tiny_data, tmp_path, stop_at):
  workdir = str(tmp_path / "run")
  config = tiny_config(tiny_data, num_members=2, member_groups=2, **{**OVERRIDES, "eval_snapshots": False})
  first = training.train_and_evaluate(config, workdir, hooks=training.Hooks(stop_at=lambda step: step == stop_at))
  assert first.preempted and first.step == stop_at
  restored = []
  second = training.train_and_evaluate(
      config, workdir, hooks=training.Hooks(on_state_restored=lambda step, state: restored.append(step)))
  assert restored == [stop_at] and not second.preempted and second.step == 16
  resumed, reference = _member_snapshots(workdir), _member_snapshots(k2_run[0])
  assert sorted(resumed) == sorted(reference)
  for key in reference:
    jax.tree.map(np.testing.assert_array_equal, resumed[key], reference[key])


def test_nonfinite_member_is_named(tiny_data, tmp_path):
  def poison_member_1(state):  # Member 1's weights become NaN: its first loss is non-finite, member 0's is not.
    nan_1 = lambda a: a.at[1].set(jnp.nan) if jnp.issubdtype(a.dtype, jnp.floating) else a
    return {**state, "params": jax.tree.map(nan_1, state["params"])}

  config = tiny_config(tiny_data, num_members=2, **OVERRIDES)
  with pytest.raises(training.TrainingDiverged, match=rf"^member 1 \(seed {SEED + 1}\) diverged: non-finite loss "
                                                         r"or gradient at step 1 "):
    training.train_and_evaluate(config, str(tmp_path / "run"), hooks=training.Hooks(on_init=poison_member_1))


SC_OVERRIDES = {**OVERRIDES, "method": "single_cycle", "num_cycles": 3}
SC_STEPS = [6, 12, 16]  # ceil(16 / 3) = 6: the last model trains 4 updates (the others are masked then).


@pytest.fixture(scope="module")
def sequential_single_cycle(tiny_data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sc_sequential"))
  training.train_and_evaluate(tiny_config(tiny_data, **SC_OVERRIDES), workdir)
  return snapshot_arrays(workdir)


@pytest.mark.slow
def test_single_cycle_models_side_by_side_equal_one_after_another(sequential_single_cycle, tiny_data, tmp_path):
  workdir = str(tmp_path / "parallel")
  config = tiny_config(tiny_data, single_cycle_parallel=True, **SC_OVERRIDES)
  result = training.train_and_evaluate(config, workdir)
  assert result.step == 6  # 6 sequential updates; the last model ends (and is saved) after 4, the others after 6.
  assert [s["step"] for s in result.snapshot_scores] == [16, 6, 12]
  parallel = snapshot_arrays(workdir)
  assert sorted(parallel) == sorted(sequential_single_cycle) == SC_STEPS
  diffs = {s: _max_abs_diff(parallel[s], sequential_single_cycle[s]) for s in SC_STEPS}
  print(f"max |parallel - sequential SingleCycle| per snapshot: {diffs}")
  for s in SC_STEPS:
    _assert_close(parallel[s], sequential_single_cycle[s])
  ckpt = checkpoints.RunCheckpoints(workdir, read_only=True)
  exp = experiment.build(config)
  try:  # The sequential run's layout and metadata: one model per snapshot.
    metas = [ckpt.restore_snapshot(s, exp.abstract_variables())[1] for s in SC_STEPS]
  finally:
    ckpt.close()
  assert [(m["model"], m["cycle"]) for m in metas] == [(0, 1), (1, 2), (2, 3)]
  # Interrupted at loop step 4 (model 2 ended at step 16 and was saved, models 0-1 mid-cycle), resumed bitwise.
  resumed_dir = str(tmp_path / "resumed")
  c = tiny_config(tiny_data, single_cycle_parallel=True, **{**SC_OVERRIDES, "eval_snapshots": False})
  assert training.train_and_evaluate(c, resumed_dir, hooks=training.Hooks(stop_at=lambda i: i == 4)).preempted
  assert not training.train_and_evaluate(c, resumed_dir).preempted
  resumed = snapshot_arrays(resumed_dir)
  for s in SC_STEPS:
    jax.tree.map(np.testing.assert_array_equal, resumed[s], parallel[s])


@pytest.mark.slow
def test_k2_single_cycle_sequential_members_equal_their_seed_runs(sequential_single_cycle, tiny_data, tmp_path):
  workdir = str(tmp_path / "k2sc")
  training.train_and_evaluate(tiny_config(tiny_data, num_members=2, **SC_OVERRIDES), workdir)
  snaps = _member_snapshots(workdir)
  assert sorted(snaps) == [(k, s) for k in (0, 1) for s in SC_STEPS]
  for s in SC_STEPS:  # Member 0 is the seed-SEED SingleCycle run.
    _assert_close(snaps[(0, s)], sequential_single_cycle[s])


@pytest.mark.parametrize("overrides, match", [
    ({"num_members": 0}, r"num_members must be an integer >= 1, got 0"),
    ({"num_members": 2, "member_groups": 4}, r"member_groups=4 does not fit 2 training member\(s\) on 4 device\(s\); "
                                             r"allowed: 0 \(auto\), 1, 2$"),
    ({"num_members": 3, "member_groups": 2}, r"allowed: 0 \(auto\), 1$"),
    ({"member_strategy": "bad"}, r"member_strategy=.bad. is not known; allowed: auto, loop, map, vmap"),
    ({"single_cycle_parallel": True}, r"needs method='single_cycle'"),
])
def test_member_fields_that_do_not_fit_are_one_line_config_errors(tiny_data, tmp_path, overrides, match):
  with pytest.raises(ConfigError, match=match):
    training.train_and_evaluate(tiny_config(tiny_data, **overrides), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # Refused before anything was written (or compiled).


def test_layout_defaults():
  c = config_lib.base_config()
  assert members.resolve_layout(c, 4) == (1, "loop") and not members.is_member_run(c)
  c.num_members = 8
  assert members.resolve_layout(c, 4) == (4, "loop")
  c.num_members, c.member_strategy = 6, "vmap"
  assert members.resolve_layout(c, 4) == (2, "vmap")


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(5)(x.mean((1, 2)))


@pytest.mark.parametrize("strategy", ["map", "vmap"])
@pytest.mark.parametrize("last_m", [None, 1, 3])
def test_ensemble_predict_over_a_member_axis_equals_one_device(strategy, last_m):
  model = _ConvNet()
  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 3))
  snaps = [model.init(jax.random.key(k), x) for k in range(4)]
  stacked = ensemble.stack_snapshots(snaps)
  apply_fn = model.apply
  mean, probs = ensemble.ensemble_predict(apply_fn, stacked, x, last_m=last_m, strategy=strategy,
                                          return_members=True)
  mesh = members.member_mesh(2)  # 2 groups of 2 members each, x's batch split over the 2 data devices.
  on_mesh = jax.device_put(stacked, NamedSharding(mesh, P("member")))
  x_mesh = jax.device_put(x, NamedSharding(mesh, P("data")))
  assert ensemble.member_axis(on_mesh) == (mesh, "member") and ensemble.member_axis(stacked) is None
  mean_s, probs_s = ensemble.ensemble_predict(apply_fn, on_mesh, x_mesh, last_m=last_m, strategy=strategy,
                                              return_members=True)
  np.testing.assert_allclose(mean_s, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(probs_s, probs, rtol=1e-5, atol=1e-6)
  hlo = ensemble._ensemble_sharded.lower(apply_fn, on_mesh, x_mesh, last_m=last_m or 4, strategy=strategy,
                                         return_members=False, mesh=mesh, axis="member").compile().as_text()
  assert len(re.findall(r"all-reduce(-start)?\(", hlo)) == 1, hlo  # The mean: one cross-device reduction.


def test_train_py_refuses_a_layout_that_does_not_fit_with_exit_2_before_compiling(tiny_data, tmp_path):
  import helpers
  argv = helpers.train_argv("train.py", tiny_data, str(tmp_path / "run"), {"num_members": 3, "member_groups": 2})
  proc = helpers.run_python(argv, env=helpers.subprocess_env(4, JAX_LOG_COMPILES="1"), timeout=180)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines[-1] == ("error: member_groups=2 does not fit 3 training member(s) on 4 device(s); "
                       "allowed: 0 (auto), 1"), lines[-1]
  assert not [l for l in lines if "Finished XLA compilation" in l or "Compiling " in l]


def test_workdir_held_by_a_live_run_is_refused(tiny_data, tmp_path):
  from snapjax import workdir_lock
  workdir = str(tmp_path / "run")
  lock = workdir_lock.acquire(workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError):
      training.train_and_evaluate(tiny_config(tiny_data, num_members=2, **OVERRIDES), workdir)
  finally:
    lock.release()
