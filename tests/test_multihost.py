"""Multi-process training (2 processes x 2 CPU devices over gloo) against one process with 4 devices, and resuming
a run on another device count. The device count is fixed per process, so the other layouts run in subprocesses
(tests/multihost_worker.py: train.py plus probes); the 1 x 4 legs run in this process (conftest: 4 devices).
"""
import glob
import json
import os
import re

import jax
import numpy as np
import pytest

from snapjax import checkpoints, config as config_lib, evaluation, training, workdir as workdir_lib

import helpers
from helpers import NUM_TEST, NUM_TRAIN, WORKER, snapshot_arrays, tiny_config

TIMEOUT_S = 240  # Per launch; a run takes ~40 s here (mostly TensorFlow and JAX start-up).
# A few steps: the tiny config cut to half an epoch, 8 steps, 2 cycles with snapshots at steps 4 and 8, at a
# learning rate small enough that training does not amplify rounding. Two layouts of one run agree only up to the
# order in which the cross-device sums (gradients, BatchNorm statistics) add up, and at the tiny config's init_lr
# of 0.1 training amplifies that order by step 8 to 6e-6 on AVX-512 machines, 9e-5 on an AVX2-only EPYC, 1.7e-2
# on AVX-512 code limited to AVX2 (`python tests/measure_drift.py [--isa AVX2]` prints the drift step by step).
# At init_lr=1e-4 nothing is amplified: params, batch_stats and the momentum traces (the gradients) of 2x2 and
# 1x4 stayed within MEASURED_DRIFT of each other after every step on both ISAs (`--lr 1e-4`), so a larger
# difference means another data order, shard or RNG fold, not another order of sums.
# Two updates per dispatch: every even step ends a dispatch, so the stops these tests ask for (after steps 4 and 6,
# or between 2 and 8) are dispatch ends, and the hosts agree on multi-update dispatches.
OVERRIDES = {"num_epochs": 0.5, "init_lr": 1e-4, "steps_per_dispatch": 2}
SNAPSHOT_STEPS = [4, 8]
MEASURED_DRIFT = 1e-6
ATOL = 10 * MEASURED_DRIFT

pytestmark = [pytest.mark.slow, pytest.mark.devices(4)]  # The in-process legs are 1 x 4.


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
  """An uninterrupted run in this process: 1 process, 4 devices. Returns (result, {step: variables})."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = training.train_and_evaluate(_config(tiny_data), workdir)
  return result, snapshot_arrays(workdir)


def _config(data_dir, **overrides):
  return tiny_config(data_dir, **{**OVERRIDES, **overrides})


def _flat(state):
  """{key path: this process's copy} of a replicated pytree (the worker's _dump, in memory)."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0)) for k, v in leaves}


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _two_processes(data_dir, workdir, log_dir, *extra, **env_extra):
  """The worker as 2 processes x 2 devices joined on 127.0.0.1; returns (pids, per-process reports)."""
  report = os.path.join(log_dir, "report")
  port = helpers.free_port()
  argvs = [helpers.train_argv(WORKER, data_dir, workdir, OVERRIDES, "--coordinator_address", f"127.0.0.1:{port}",
                              "--num_processes", "2", "--process_id", str(i), "--cpu_collectives", "gloo", *extra)
           for i in range(2)]
  pids, outputs = helpers.launch(argvs, helpers.subprocess_env(2, SNAPJAX_WORKER_REPORT=report, **env_extra),
                                 log_dir, TIMEOUT_S)
  reports = [json.load(open(f"{report}.{i}")) for i in range(2)]
  for r, out in zip(reports, outputs):
    r["output"] = out
  return pids, reports


def test_two_processes_train_like_one_process_with_four_devices(tiny_data, reference, tmp_path):
  ref_result, ref_snaps = reference
  workdir = str(tmp_path / "run")
  # A stale run of another config: --fresh must move it aside once (process 0), not refuse it or race on it.
  os.makedirs(workdir)
  stale = config_lib.to_dict(_config(tiny_data, init_lr=0.3))
  json.dump(stale, open(os.path.join(workdir, workdir_lib.CONFIG_FILE), "w"))
  pids, reports = _two_processes(tiny_data, workdir, str(tmp_path), "--fresh")

  # One global mesh, the same device order on both hosts; each host holds only its devices' rows of the data.
  assert [r["process_index"] for r in reports] == [0, 1]
  assert reports[0]["mesh_device_ids"] == reports[1]["mesh_device_ids"] and len(reports[0]["mesh_device_ids"]) == 4
  per_device = NUM_TRAIN // 4
  for r in reports:
    positions = [i for i, d in enumerate(r["mesh_device_ids"]) if d in r["local_device_ids"]]
    expected = [[per_device * i, per_device * (i + 1)] for i in positions]
    train_arrays = [a for a in r["arrays"] if a["shape"][0] == NUM_TRAIN]
    assert [a["shape"] for a in train_arrays] == [[NUM_TRAIN, 28, 28, 1], [NUM_TRAIN]]
    for a in train_arrays:
      assert a["rows"] == a["addressable_rows"] == expected and not a["fully_addressable"]
  images_rows = [tuple(p) for r in reports for a in r["arrays"] if a["shape"][0] == NUM_TRAIN and len(a["shape"]) == 4
                 for p in a["rows"]]
  assert sorted(images_rows) == [(per_device * i, per_device * (i + 1)) for i in range(4)]  # Disjoint, complete.

  # Same parameters as one process with 4 devices: same data rows per mesh position, same RNG folds.
  assert reports[0]["result"] == reports[1]["result"]
  result = reports[0]["result"]
  assert not result["preempted"] and result["step"] == SNAPSHOT_STEPS[-1]
  snaps = snapshot_arrays(workdir)
  assert sorted(snaps) == sorted(ref_snaps) == SNAPSHOT_STEPS
  diffs = {s: _max_abs_diff(snaps[s], ref_snaps[s]) for s in snaps}
  print(f"max |2x2 - 1x4| per snapshot: {diffs}")
  for s in snaps:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=ATOL), snaps[s], ref_snaps[s])
  for mine, ref in zip(result["snapshot_scores"], ref_result["snapshot_scores"]):
    assert mine["step"] == ref["step"] and mine["count"] == ref["count"] == NUM_TEST
    np.testing.assert_allclose(mine["error"], ref["error"], atol=2 / NUM_TEST)

  # Only process 0 logs progress and snapshot scores.
  progress = re.compile(r"\] (step \d+/8 |Snapshot \d/2 at step|\[\d+\] train/)")
  assert [l for l in reports[0]["output"].splitlines() if progress.search(l)]
  assert not [l for l in reports[1]["output"].splitlines() if progress.search(l)], reports[1]["output"][-2000:]

  # Only process 0 writes: config.json (this run's), TensorBoard events (its pid in the name), the moved run.
  assert json.load(open(os.path.join(workdir, workdir_lib.CONFIG_FILE))) == config_lib.to_dict(_config(tiny_data))
  events = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert len(events) == 1 and f".{pids[0]}." in os.path.basename(events[0]), events
  moved = glob.glob(os.path.join(workdir, "previous-*"))
  assert len(moved) == 1 and json.load(open(os.path.join(moved[0], workdir_lib.CONFIG_FILE))) == stale

  # eval.py's logic, one process, reads the cooperatively written snapshots and scores them as training did.
  report = evaluation.evaluate_runs([workdir], out_dir=str(tmp_path / "eval"), plot=False)
  assert report["num_test_examples"] == NUM_TEST
  assert [s["step"] for s in report["snapshots"]] == SNAPSHOT_STEPS
  for logged, scored in zip(result["snapshot_scores"], report["snapshots"]):
    np.testing.assert_allclose(scored["error"], logged["error"], atol=1e-9)
    np.testing.assert_allclose(scored["nll"], logged["nll"], rtol=1e-4)


@pytest.mark.parametrize("agreement", ["sync_manager", "allgather"])
def test_sigterm_on_one_host_stops_every_host_at_one_step(tiny_data, reference, tmp_path, agreement):
  _, ref_snaps = reference
  workdir = str(tmp_path / "run")
  if agreement == "sync_manager":
    # Process 1 alone gets SIGTERM at step 2: JAX's preemption sync manager picks one later step for both hosts.
    env, allowed = {"SNAPJAX_WORKER_SIGTERM_AT": "2:1"}, range(2, 8)
  else:
    # The JAX service off: the hosts all-gather their flags every 2 steps (no flag at 2), so both stop at 4.
    env = {"SNAPJAX_WORKER_SIGTERM_AT": "3:1", "JAX_ENABLE_PREEMPTION_SERVICE": "false",
           "SNAPJAX_WORKER_AGREE_EVERY": "2"}
    allowed = [4]
  _, reports = _two_processes(tiny_data, workdir, str(tmp_path), **env)
  stops = [r["result"]["step"] for r in reports]
  assert all(r["result"]["preempted"] for r in reports) and stops[0] == stops[1] and stops[0] in allowed, stops
  assert str(stops[0]) in os.listdir(os.path.join(workdir, checkpoints.STATE_DIR))

  # Resume on one process with 4 devices (the same data order as 2 x 2): it ends where the reference ends.
  result = training.train_and_evaluate(_config(tiny_data), workdir)
  assert not result["preempted"] and result["step"] == SNAPSHOT_STEPS[-1]
  snaps = snapshot_arrays(workdir)
  assert sorted(snaps) == SNAPSHOT_STEPS
  print(f"stopped at {stops[0]}; max |resumed - reference| per snapshot: "
        f"{ {s: _max_abs_diff(snaps[s], ref_snaps[s]) for s in snaps} }")
  for s in snaps:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=ATOL), snaps[s], ref_snaps[s])


def test_resume_on_one_device_then_on_four(tiny_data, reference, tmp_path):
  _, ref_snaps = reference
  workdir = str(tmp_path / "run")
  config = _config(tiny_data)
  saved = {}

  # Leg 1: 4 devices, stopped right after the first snapshot.
  first = training.train_and_evaluate(config, workdir, hooks=training.Hooks(
      stop_at=lambda step: step == 4, on_state_saved=lambda step, state: saved.update({step: _flat(state)})))
  assert first["preempted"] and first["step"] == 4

  # Leg 2: 1 device (another process) resumes from step 4 and stops at 6 (no periodic save before the end).
  restored, last_saved = str(tmp_path / "restored"), str(tmp_path / "saved")
  helpers.launch([helpers.train_argv(WORKER, tiny_data, workdir, OVERRIDES)],
                 helpers.subprocess_env(1, SNAPJAX_WORKER_REPORT=str(tmp_path / "report"), SNAPJAX_WORKER_STOP_AT="6",
                                        SNAPJAX_WORKER_RESTORED=restored, SNAPJAX_WORKER_SAVED=last_saved),
                 str(tmp_path), TIMEOUT_S)
  report = json.load(open(str(tmp_path / "report") + ".0"))
  assert len(report["device_ids"]) == 1 and report["result"]["preempted"] and report["result"]["step"] == 6
  on_one = dict(np.load(restored + ".npz"))
  assert sorted(on_one) == sorted(saved[4])
  for k in saved[4]:  # The state restored on 1 device is, bit for bit, the one saved on 4.
    np.testing.assert_array_equal(on_one[k], saved[4][k], err_msg=k)

  # Leg 3: back on 4 devices from the state the 1-device leg saved at step 6, to the end.
  from_one = dict(np.load(last_saved + ".6.npz"))
  assert int(from_one["['step']"]) == 6
  restored_here = {}
  last = training.train_and_evaluate(config, workdir, hooks=training.Hooks(
      on_state_restored=lambda step, state: restored_here.update({step: _flat(state)})))
  assert not last["preempted"] and last["step"] == 8
  assert list(restored_here) == [6] and sorted(restored_here[6]) == sorted(from_one)
  for k in from_one:
    np.testing.assert_array_equal(restored_here[6][k], from_one[k], err_msg=k)

  # Every snapshot is there; the first (trained on 4 devices) is the 4-device run's, bit for bit. The last one
  # differs from the reference: each device shuffles its own shard, so the data order depends on the device count.
  snaps = snapshot_arrays(workdir)
  assert sorted(snaps) == SNAPSHOT_STEPS
  jax.tree.map(np.testing.assert_array_equal, snaps[4], ref_snaps[4])
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(snaps[8]))
  print(f"max |4->1->4 - 4| at step 8: {_max_abs_diff(snaps[8], ref_snaps[8])}")
  assert [(s["step"], s["count"]) for s in last["snapshot_scores"]] == [(8, NUM_TEST)]
  assert np.isfinite(last["snapshot_scores"][0]["nll"])
