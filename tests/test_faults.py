"""Fault injection: kill -9 at random and at orbax commit points, SIGTERM, non-finite loss; determinism.

Every interrupted run is compared bitwise (CPU, same seed) with one uninterrupted reference run.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snapjax import checkpoints, evaluation, training
from snapjax.errors import CheckpointError

import helpers
from helpers import snapshot_arrays, tiny_config

pytestmark = pytest.mark.devices(4)  # In-process runs and references use conftest's 4 CPU devices.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL, SNAPS = 64, (32, 64)  # The tiny run: 64 steps, snapshots at 32 and 64, state every 10 steps.
TMP = ".orbax-checkpoint-tmp"  # The suffix orbax 0.12.8 gives a step directory until its save commits.
RUN_TIMEOUT = 300.0  # Seconds for one subprocess run on a loaded 2-core machine.
# Seed of the random kill points; set SNAPJAX_FAULT_SEED to explore others (the chosen points are printed).
FAULT_SEED = int(os.environ.get("SNAPJAX_FAULT_SEED", "20170424"))

# Runs train.py exactly as the command line does, after hooking orbax so that the process SIGKILLs itself
# at a precise point of a save: FAULT=before_commit:<dir>/<step> (tmp fully written, not yet renamed),
# after_commit:<dir>/<step> (renamed, nothing after it ran) or mid_delete:<dir> (half the files of an
# old checkpoint removed by max_to_keep).
_RUNNER = r'''
import asyncio, os, runpy, signal, sys
from orbax.checkpoint._src.path import async_path, deleter

kind, _, target = os.environ["SNAPJAX_FAULT"].partition(":")

def die(what):
  print(f"FAULT: SIGKILL {what}", file=sys.stderr, flush=True)
  os.kill(os.getpid(), signal.SIGKILL)

real_rename = async_path.rename

async def rename(src, dst):
  key = f"{dst.parent.name}/{dst.name}"
  if kind == "before_commit" and key == target:
    die(f"before the rename {src.name} -> {key}")
  out = await real_rename(src, dst)
  if kind == "after_commit" and key == target:
    die(f"after the rename {src.name} -> {key}")
  return out

async_path.rename = rename
real_delete = deleter.PathDeleter.delete

def delete(self, path, **kwargs):
  if kind == "mid_delete" and path.parent.name == target:
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(str(path)) for f in fs)
    for f in files[: len(files) // 2]:
      os.remove(f)
    die(f"after deleting {len(files) // 2} of {len(files)} files of {target}/{path.name}")
  return real_delete(self, path, **kwargs)

deleter.PathDeleter.delete = delete
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
'''


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
  """One uninterrupted in-process run: (workdir, result, {step: snapshot leaves})."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = training.train_and_evaluate(tiny_config(tiny_data), workdir)
  return workdir, result, snapshot_arrays(workdir)


def _assert_bitwise_equal(got, want):
  assert sorted(got) == sorted(want)
  for step in want:
    leaves_g, tree_g = jax.tree.flatten(got[step])
    leaves_w, tree_w = jax.tree.flatten(want[step])
    assert tree_g == tree_w
    for g, w in zip(leaves_g, leaves_w):
      assert g.dtype == w.dtype and g.shape == w.shape
      assert g.tobytes() == w.tobytes(), f"snapshot {step} differs from the uninterrupted run"


def _listing(workdir, sub):
  path = os.path.join(workdir, sub)
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _assert_clean_snapshots(workdir, steps):
  """Exactly these snapshot directories, no leftovers, each with its own metadata."""
  assert _listing(workdir, "snapshots") == sorted(str(s) for s in steps)
  for i, s in enumerate(sorted(steps)):
    meta = json.load(open(os.path.join(workdir, "snapshots", str(s), "meta", "metadata")))
    assert meta["step"] == s and meta["cycle"] == i + 1


def _committed_states(workdir):
  return sorted(int(n) for n in _listing(workdir, "state") if n.isdigit())


class _Run:
  """train.py in a subprocess; its merged output is read by a thread so the test can react to lines."""

  def __init__(self, data_dir, workdir, *, fault=None, runner=None):
    env = helpers.subprocess_env(4)
    if fault:
      env["SNAPJAX_FAULT"] = fault
    program = [runner] if fault else ["train.py"]
    self.cmd = [sys.executable, *program, "--config", "tests/configs/tiny.py",
                f"--config.fashion_mnist_dir={data_dir}", "--config.log_every_steps=1", "--workdir", workdir]
    self.t0 = time.time()
    self.proc = helpers.spawn_reading(self.cmd[1:], env, cwd=REPO)  # Forked from a preloaded Python.
    self.lines, self._reader = self.proc.lines, self.proc.reader

  def steps_logged(self):
    return [int(m.group(1)) for l in self.lines for m in [re.search(r"\] step (\d+)/64 ", l)] if m]

  def wait_until(self, predicate, what):
    """Poll until predicate() is true; fail (with the log) if the process ends first or takes too long."""
    while not predicate():
      if self.proc.poll() is not None or time.time() - self.t0 > RUN_TIMEOUT:
        self.kill()
        pytest.fail(f"{what} never happened (exit code {self.proc.returncode}); log:\n" + self.log())
      time.sleep(0.002)

  def wait(self):
    try:
      rc = self.proc.wait(timeout=max(RUN_TIMEOUT - (time.time() - self.t0), 1.0))
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail("train.py timed out; log:\n" + self.log())
    self._reader.join(timeout=10)
    return rc

  def kill(self):
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGKILL)
    self.proc.wait(timeout=30)

  def log(self):
    return "\n".join(self.lines[-40:])


@pytest.fixture
def runs():
  """Every subprocess a test starts is killed at the end, whatever happened."""
  started = []
  yield started
  for r in started:
    if r.proc.poll() is None:
      r.kill()


def _start(runs, *args, **kwargs):
  r = _Run(*args, **kwargs)
  runs.append(r)
  return r


@pytest.mark.slow
def test_sigkill_mid_cycle_and_at_snapshot_save_resumes_to_identical_snapshots(reference, tiny_data, tmp_path, runs):
  workdir = str(tmp_path / "run")
  kill_at = random.Random(FAULT_SEED).randint(2, 29)
  print(f"kill -9 after progress line 'step {kill_at}/64' (SNAPJAX_FAULT_SEED={FAULT_SEED})")

  # 1. SIGKILL at a random point of the first cycle.
  r = _start(runs, tiny_data, workdir)
  r.wait_until(lambda: kill_at in r.steps_logged(), f"step {kill_at}")
  r.kill()
  assert r.proc.returncode == -signal.SIGKILL
  print("after kill 1: state", _listing(workdir, "state"), "snapshots", _listing(workdir, "snapshots"))
  assert _listing(workdir, "snapshots") == []

  # 2. Same command: resumes, and is SIGKILLed as soon as the first snapshot's save has started.
  r = _start(runs, tiny_data, workdir)
  r.wait_until(lambda: any(n.startswith("32") for n in _listing(workdir, "snapshots")), "the snapshot save")
  r.kill()
  left = _listing(workdir, "snapshots")
  print("after kill 2: state", _listing(workdir, "state"), "snapshots", left)
  assert left in (["32" + TMP], ["32"]), left  # Uncommitted (the usual case) or, if the kill was late, committed.
  resumed_from = max(_committed_states(workdir), default=0)
  assert resumed_from <= 32

  # Meanwhile eval.py sees only committed snapshots: none yet (a one-line error), or the first.
  if left == ["32"]:
    assert [s["step"] for s in evaluation.evaluate_runs([workdir], plot=False)["snapshots"]] == [32]
  else:
    with pytest.raises(CheckpointError, match="no snapshots in workdir"):
      evaluation.evaluate_runs([workdir], plot=False)

  # 3. Same command again: runs to the end.
  r = _start(runs, tiny_data, workdir)
  assert r.wait() == 0, r.log()
  assert min(r.steps_logged()) == resumed_from + 1  # It resumed; it did not start again.
  _assert_clean_snapshots(workdir, SNAPS)
  assert not [n for n in _listing(workdir, "state") if not n.isdigit()]
  _assert_bitwise_equal(snapshot_arrays(workdir), reference[2])


@pytest.mark.slow
def test_sigkill_at_orbax_commit_points_resumes_to_identical_snapshots(reference, tiny_data, tmp_path, runs):
  workdir = str(tmp_path / "run")
  runner = str(tmp_path / "fault_runner.py")
  with open(runner, "w") as f:
    f.write(_RUNNER)

  def run_until_fault(fault):
    r = _start(runs, tiny_data, workdir, fault=fault, runner=runner)
    rc = r.wait()
    assert rc == -signal.SIGKILL and "FAULT: SIGKILL" in r.log(), r.log()
    print(f"{fault}: killed after {len(r.steps_logged())} steps; state {_listing(workdir, 'state')}, "
          f"snapshots {_listing(workdir, 'snapshots')}")
    return r

  # 1. Killed between the first snapshot's commit and the commit of the train state at the same step.
  run_until_fault("after_commit:snapshots/32")
  assert _listing(workdir, "snapshots") == ["32"]
  assert _committed_states(workdir) == [20, 30]

  # 2. Resumes at 30, keeps snapshot 32 as it is, commits state 32, then dies while max_to_keep deletes state 20.
  snap32 = snapshot_arrays(workdir)
  r = run_until_fault("mid_delete:state")
  assert min(r.steps_logged()) == 31
  assert _committed_states(workdir) == [20, 30, 32]  # 20 is half deleted; orbax still lists it.
  assert not os.path.exists(os.path.join(workdir, "state", "20", "_CHECKPOINT_METADATA"))
  _assert_bitwise_equal(snapshot_arrays(workdir), snap32)

  # 3. Resumes at 32 (not at the half-deleted 20) and dies with the last snapshot fully written but uncommitted.
  r = run_until_fault("before_commit:snapshots/64")
  assert min(r.steps_logged()) == 33
  assert _listing(workdir, "snapshots") == ["32", "64" + TMP]
  assert 20 not in _committed_states(workdir)  # The next state save finished the deletion.
  # eval.py ignores the uncommitted snapshot and ensembles the one that exists.
  report = evaluation.evaluate_runs([workdir], out_dir=str(tmp_path / "eval"), plot=False)
  assert [s["step"] for s in report["snapshots"]] == [32] and report["ensemble"]["m"] == 1
  np.testing.assert_allclose(report["snapshots"][0]["error"], reference[1]["snapshot_scores"][0]["error"], atol=1e-9)

  # 4. The plain command finishes the run: same snapshots as the uninterrupted run, nothing left over.
  last = _committed_states(workdir)[-1]
  r = _start(runs, tiny_data, workdir)
  assert r.wait() == 0, r.log()
  assert min(r.steps_logged()) == last + 1
  _assert_clean_snapshots(workdir, SNAPS)
  assert _listing(workdir, "state") == ["60", "64"]
  _assert_bitwise_equal(snapshot_arrays(workdir), reference[2])


@pytest.mark.slow
def test_sigterm_saves_finishes_snapshot_and_exits_cleanly_then_resumes(reference, tiny_data, tmp_path, runs):
  workdir = str(tmp_path / "run")
  term_at = random.Random(FAULT_SEED + 1).randint(2, 29)
  print(f"SIGTERM after progress line 'step {term_at}/64' (SNAPJAX_FAULT_SEED={FAULT_SEED})")

  def preempt(r, when, what):
    r.wait_until(when, what)
    t = time.time()
    r.proc.send_signal(signal.SIGTERM)
    rc = r.wait()
    seconds = time.time() - t
    m = [re.search(r"Preempted: state saved at step (\d+) of 64; re-run the same command to resume", l)
         for l in r.lines]
    m = [x for x in m if x]
    print(f"SIGTERM {what}: exit code {rc} after {seconds:.1f} s; {m[0].group(0) if m else 'no preemption line'}; "
          f"state {_listing(workdir, 'state')}, snapshots {_listing(workdir, 'snapshots')}")
    assert rc == 0, r.log()
    assert len(m) == 1, r.log()
    assert seconds < 60
    stopped = int(m[0].group(1))
    assert stopped == max(r.steps_logged())  # Nothing ran after the state it saved.
    assert _committed_states(workdir)[-1] == stopped
    assert not [n for n in _listing(workdir, "state") + _listing(workdir, "snapshots") if TMP in n]
    return stopped

  # 0. During set-up or compilation (config.json is written just before): the run stops after its first step.
  r = _start(runs, tiny_data, workdir)
  assert preempt(r, lambda: os.path.exists(os.path.join(workdir, "config.json")), "during set-up") == 1

  # 1. Mid-cycle: the state of the step in flight is saved.
  r = _start(runs, tiny_data, workdir)
  stopped = preempt(r, lambda: term_at in r.steps_logged(), f"at step >= {term_at}")
  assert term_at <= stopped < 32 and _listing(workdir, "snapshots") == []

  # 2. While the first snapshot is being written: the save is finished, not cut.
  r = _start(runs, tiny_data, workdir)
  preempt(r, lambda: any(n.startswith("32") for n in _listing(workdir, "snapshots")), "during the snapshot save")
  assert min(r.steps_logged()) == stopped + 1
  _assert_clean_snapshots(workdir, SNAPS[:1])
  _assert_bitwise_equal(snapshot_arrays(workdir), {32: reference[2][32]})

  # 3. The same command finishes the run: same snapshots as the uninterrupted run.
  r = _start(runs, tiny_data, workdir)
  assert r.wait() == 0, r.log()
  _assert_clean_snapshots(workdir, SNAPS)
  _assert_bitwise_equal(snapshot_arrays(workdir), reference[2])


def _cosine_lr(init_lr, t, total, cycles):
  """Paper Eq. 2, restated: alpha0 / 2 * (cos(pi * mod(t, ceil(T / M)) / ceil(T / M)) + 1)."""
  period = -(-total // cycles)
  return init_lr / 2 * (np.cos(np.pi * (t % period) / period) + 1)


@pytest.mark.slow
@pytest.mark.parametrize("bad_step, states", [(50, [32, 40]), (64, [50, 60])])
def test_nonfinite_loss_stops_with_message_keeps_snapshots_and_resumes(
    reference, tiny_data, tmp_path, bad_step, states):
  """Inputs become NaN from update bad_step on (1-based, as logged): a real NaN loss in the real step."""
  workdir = str(tmp_path / "run")
  config = tiny_config(tiny_data, eval_snapshots=False)
  def poison(step_fn):

    def poisoned(state, x, labels):
      x = jnp.where(state["step"] >= bad_step - 1, x * jnp.nan, x)
      return step_fn(state, x, labels)

    return poisoned

  with pytest.raises(SystemExit) as exc:  # train.py's path: training.main.
    training.main(config, workdir, hooks=training.Hooks(wrap_step=poison))
  message = exc.value.code
  assert isinstance(message, str) and "\n" not in message  # A string exit code: printed, exit status 1.
  assert isinstance(exc.value.__context__, training.TrainingDiverged)
  print(message)
  m = re.fullmatch(r"error: non-finite loss or gradient at step (\d+) \(loss=(\S+), grad_norm=(\S+), lr=(\S+)\); "
                   r"last good snapshot: step 32 \((\S+)\); train state kept at step (\d+)", message)
  assert m, message
  assert int(m.group(1)) == bad_step
  # XLA's CPU max(NaN, 0) is 0, so a ReLU net may keep a finite loss while the gradient is NaN.
  assert not np.isfinite(float(m.group(2))) or not np.isfinite(float(m.group(3)))
  np.testing.assert_allclose(float(m.group(4)), _cosine_lr(0.1, bad_step - 1, TOTAL, 2), rtol=1e-5)
  assert m.group(5) == os.path.join(os.path.abspath(workdir), "snapshots", "32")
  assert int(m.group(6)) == states[-1]

  # Nothing at or after the bad step was saved; what was saved is intact.
  assert _committed_states(workdir) == states  # 50: a state step; 64: the last snapshot's and the final state's.
  _assert_clean_snapshots(workdir, [32])
  assert not [n for n in _listing(workdir, "state") if not n.isdigit()]
  _assert_bitwise_equal(snapshot_arrays(workdir), {32: reference[2][32]})
  # eval.py ensembles the snapshots that exist.
  report = evaluation.evaluate_runs([workdir], out_dir=str(tmp_path / "eval"), plot=False)
  assert [s["step"] for s in report["snapshots"]] == [32] and report["ensemble"]["m"] == 1
  np.testing.assert_allclose(report["snapshots"][0]["error"], reference[1]["snapshot_scores"][0]["error"], atol=1e-9)

  # With the cause gone, the same command resumes from the last good state and ends as the reference run.
  restored = []
  result = training.main(config, workdir, hooks=training.Hooks(on_state_restored=lambda step, _: restored.append(step)))
  assert restored == [states[-1]] and not result["preempted"]
  _assert_clean_snapshots(workdir, SNAPS)
  _assert_bitwise_equal(snapshot_arrays(workdir), reference[2])


@pytest.mark.slow
def test_same_seed_is_bitwise_identical_and_another_seed_differs(reference, tiny_data, tmp_path):
  again = str(tmp_path / "again")
  training.train_and_evaluate(tiny_config(tiny_data, eval_snapshots=False), again)
  _assert_bitwise_equal(snapshot_arrays(again), reference[2])

  other = str(tmp_path / "other")
  assert training.train_and_evaluate(tiny_config(tiny_data, seed=1, eval_snapshots=False), other,
                                     hooks=training.Hooks(stop_at=lambda step: step == 32))["preempted"]
  got, want = snapshot_arrays(other)[32], reference[2][32]
  kernels = [(p, g) for p, g in jax.tree_util.tree_flatten_with_path(got["params"])[0] if "kernel" in str(p)]
  assert kernels
  for path, g in kernels:
    w = jax.tree_util.tree_flatten_with_path(want["params"])[0]
    w = dict((jax.tree_util.keystr(k), v) for k, v in w)[jax.tree_util.keystr(path)]
    assert not np.array_equal(g, w), f"{jax.tree_util.keystr(path)} is the same under seed 1 and seed 0"


def test_leftover_tmp_dirs_are_removed_by_training_and_left_to_readers(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  planted = [os.path.join(workdir, "state", "7" + TMP), os.path.join(workdir, "snapshots", "48" + TMP)]
  for p in planted:
    os.makedirs(p)
    open(os.path.join(p, "partial"), "w").close()
  ckpt = checkpoints.RunCheckpoints(workdir, read_only=True)  # eval.py: a run may still be writing these.
  assert ckpt.snapshot_steps() == [32, 64]
  ckpt.close()
  assert all(os.path.isdir(p) for p in planted)
  ckpt = checkpoints.RunCheckpoints(workdir)  # A training run: they are the remains of killed saves.
  assert ckpt.snapshot_steps() == [32, 64] and ckpt.latest_state_step() == 64
  ckpt.close()
  deadline = time.time() + 30  # Orbax removes them in the background (a save waits for it).
  while any(os.path.exists(p) for p in planted) and time.time() < deadline:
    time.sleep(0.01)
  assert not any(os.path.exists(p) for p in planted)
  assert _listing(workdir, "snapshots") == ["32", "64"]
