"""A K = 2 member run as 2 processes x 2 devices (one member group per host): preempted, resumed, equal to one process.

Subprocesses as in tests/test_multihost.py (its tiny, low-lr config: only the order of float sums differs).
"""
import json
import os

import jax
import numpy as np
import pytest

from snapjax import evaluation, experiment, training

import helpers
from helpers import WORKER, tiny_config

TIMEOUT_S = 300
# Two loop steps per dispatch (a member run dispatches several, as a one-member run): 8 steps are 4 dispatches, so a
# notice at step 2 stops the hosts after one of the dispatches ending at 4 or 6, before the end.
OVERRIDES = {"num_epochs": 0.5, "init_lr": 1e-4, "num_members": 2, "member_groups": 2, "steps_per_dispatch": 2}
SNAPSHOT_STEPS = [4, 8]
ATOL = 1e-5

pytestmark = [pytest.mark.slow, pytest.mark.devices(4)]


def _member_snapshots(workdir):
  exp = experiment.build(evaluation.load_run_config(workdir))
  return {(m.member, m.step): jax.tree.map(np.asarray, m.variables)
          for m in evaluation.restore_members([workdir], exp)}


def _two_processes(data_dir, workdir, log_dir, **env_extra):
  report = os.path.join(log_dir, "report")
  port = helpers.free_port()
  argvs = [helpers.train_argv(WORKER, data_dir, workdir, OVERRIDES, "--coordinator_address", f"127.0.0.1:{port}",
                              "--num_processes", "2", "--process_id", str(i), "--cpu_collectives", "gloo")
           for i in range(2)]
  helpers.launch(argvs, helpers.subprocess_env(2, SNAPJAX_WORKER_REPORT=report, **env_extra), log_dir, TIMEOUT_S)
  return [json.load(open(f"{report}.{i}")) for i in range(2)]


def test_members_on_two_hosts_preempt_resume_and_equal_one_process(tiny_data, tmp_path):
  reference = str(tmp_path / "reference")
  training.train_and_evaluate(tiny_config(tiny_data, **OVERRIDES), reference)
  workdir = str(tmp_path / "run")
  # Process 1 alone gets SIGTERM at step 2: both hosts stop at one later step, the member state saved.
  first = _two_processes(tiny_data, workdir, str(tmp_path), SNAPJAX_WORKER_SIGTERM_AT="2:1")
  stops = [r["result"]["step"] for r in first]
  assert all(r["result"]["preempted"] for r in first) and stops[0] == stops[1] and 2 <= stops[0] < 8, stops
  second = _two_processes(tiny_data, workdir, str(tmp_path))
  assert all(not r["result"]["preempted"] and r["result"]["step"] == 8 for r in second)
  assert [(s["member"], s["step"]) for s in second[0]["result"]["snapshot_scores"] if s["step"] > stops[0]] == [
      (k, s) for s in SNAPSHOT_STEPS if s > stops[0] for k in (0, 1)]
  snaps, ref = _member_snapshots(workdir), _member_snapshots(reference)
  assert sorted(snaps) == sorted(ref) == [(k, s) for k in (0, 1) for s in SNAPSHOT_STEPS]
  diffs = {key: max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(ref[key])))
           for key, v in snaps.items()}
  print(f"stopped at {stops[0]}; max |2 hosts - 1 process| per (member, step): {diffs}")
  for key in snaps:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=ATOL), snaps[key], ref[key])
