"""Holes found by using train.py / eval.py as a new user would, each through the real command line.

Blank workdirs, a workdir that is a file, two runs on one workdir, --fresh next to a live run, eval.py during a
live run, a killed run's lock, and the plot's ticks.
"""
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import helpers
from helpers import ROOT, TINY_CONFIG

pytestmark = pytest.mark.devices(4)
TIMEOUT = 240


def _run(*args: str, env_extra=None) -> subprocess.CompletedProcess:
  return helpers.run_python(list(args), env=helpers.subprocess_env(4, **(env_extra or {})), timeout=TIMEOUT)


def _usage_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  print(f"exit code {proc.returncode}: {lines[-1] if lines else '<no stderr>'}")  # pytest -rP shows it.
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines[-1].startswith("error: "), proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[-1], (needle, lines[-1])
  return lines[-1]


def _root_listing():
  return sorted(os.listdir(ROOT))


@pytest.mark.parametrize("workdir", ["", "   "])
def test_blank_workdir_is_refused_and_nothing_is_written(workdir, tiny_data):
  before = _root_listing()
  proc = _run("train.py", "--config", TINY_CONFIG, f"--config.fashion_mnist_dir={tiny_data}", "--workdir", workdir)
  _usage_error(proc, "--workdir is empty", "allowed:")
  assert _root_listing() == before  # No config.json, state/ or TensorBoard file in the repository root.
  _usage_error(_run("eval.py", "--workdir", workdir), "--workdir is empty")


def test_workdir_that_is_a_file_is_refused_and_the_file_untouched(tiny_data, tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("keep me")
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  proc = _run("train.py", "--config", TINY_CONFIG, f"--config.fashion_mnist_dir={tiny_data}", "--workdir", str(path))
  _usage_error(proc, str(path), "existing file", "allowed:")
  _usage_error(_run("eval.py", "--workdir", str(path)), str(path), "existing file")
  _usage_error(_run("eval.py", "--workdir", str(tmp_path / "missing"), "--out_dir", str(path)), "--out_dir",
               "existing file")
  assert hashlib.sha256(path.read_bytes()).hexdigest() == digest and sorted(os.listdir(tmp_path)) == ["notes.txt"]


# Long enough to outlive the checks below (6,400 steps; a snapshot every 32), cheap per step.
LONG_RUN = ("--config.num_epochs=400", "--config.num_cycles=200", "--config.eval_snapshots=false",
            "--config.log_every_steps=50")


class _LiveRun:
  """train.py in the background, its output collected line by line."""

  def __init__(self, args):
    self.proc = helpers.spawn_reading(list(args), helpers.subprocess_env(4))  # Forked from a preloaded Python.
    self.lines = self.proc.lines

  def wait_for(self, done, what: str):
    deadline = time.monotonic() + TIMEOUT
    while not done():
      assert self.proc.poll() is None and time.monotonic() < deadline, f"{what}:\n" + "\n".join(self.lines[-40:])
      time.sleep(0.05)

  def logged(self, pattern: str) -> bool:
    return any(re.search(pattern, l) for l in self.lines)


@pytest.mark.slow
def test_a_workdir_in_use_by_a_live_run_is_refused_until_that_run_dies(tiny_data, tmp_path):
  workdir = str(tmp_path / "run")
  args = ["train.py", "--config", TINY_CONFIG, f"--config.fashion_mnist_dir={tiny_data}", "--workdir", workdir,
          *LONG_RUN]
  live = _LiveRun(args)
  try:
    # Past set-up and compilation, with a committed snapshot (renamed from its tmp directory).
    live.wait_for(lambda: os.path.isdir(os.path.join(workdir, "snapshots", "32")), "snapshot 32")
    line = _usage_error(_run(*args), workdir, "in use by a live training run", f"host {socket.gethostname()}",
                        f"pid {live.proc.pid}")
    listing = set(os.listdir(workdir))
    _usage_error(_run(*args, "--fresh"), f"pid {live.proc.pid}")  # --fresh never moves a live run's files.
    assert not [n for n in os.listdir(workdir) if n.startswith("previous-")]
    assert listing <= set(os.listdir(workdir))
    # eval.py reads the committed snapshots of the live run.
    proc = _run("eval.py", "--workdir", workdir, "--out_dir", str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(tmp_path / "eval" / "report.json"))
    assert 32 in [s["step"] for s in report["snapshots"]]
    print(line)
    assert live.proc.poll() is None  # Still training: the refusals above were against a live run.
  finally:
    live.proc.send_signal(signal.SIGKILL)  # A crash: no clean-up, its lock file stays behind.
    live.proc.wait()
  assert os.path.exists(os.path.join(workdir, "run.lock"))
  # The same command again resumes at once (a dead run's lock on this host is taken over); SIGTERM stops it.
  start = time.monotonic()
  again = _LiveRun(args)
  try:
    again.wait_for(lambda: again.logged(r"Resumed from step \d+ of 6400"), "resume")
    print(f"resumed {time.monotonic() - start:.1f} s after the kill")
    again.proc.send_signal(signal.SIGTERM)
    assert again.proc.wait(timeout=TIMEOUT) == 0, "\n".join(again.lines[-40:])
  finally:
    if again.proc.poll() is None:
      again.proc.kill()
  assert again.logged(r"Took over the lock of workdir .*pid %d" % live.proc.pid), "\n".join(again.lines[-40:])
  assert again.logged(r"Preempted: state saved at step")
  assert not os.path.exists(os.path.join(workdir, "run.lock"))  # Released when the run stopped.


_PLOT_SPY = r'''
import json, runpy, sys
import matplotlib
matplotlib.use("Agg")
from matplotlib.figure import Figure
real_savefig, out = Figure.savefig, sys.argv[1]

def savefig(self, *args, **kwargs):
  if not str(getattr(args[0], "name", args[0])).endswith("error_vs_m.png"):  # eval.py writes other figures too.
    return real_savefig(self, *args, **kwargs)
  self.canvas.draw()
  ax = self.axes[0]
  lo, hi = ax.get_xlim()
  with open(out, "w") as f:
    json.dump([float(t) for t in ax.get_xticks() if lo <= t <= hi], f)
  return real_savefig(self, *args, **kwargs)

Figure.savefig = savefig
sys.argv = ["eval.py", *sys.argv[2:]]
runpy.run_path("eval.py", run_name="__main__")
'''


@pytest.mark.slow
def test_eval_plot_has_integer_ticks_only(tiny_data, tmp_path):
  """Two snapshots: matplotlib's default locator put ticks at 1.2, 1.4, 1.6, 1.8 on the snapshot-index axis."""
  workdir = str(tmp_path / "run")
  proc = _run("train.py", "--config", TINY_CONFIG, f"--config.fashion_mnist_dir={tiny_data}", "--workdir", workdir,
              "--config.num_epochs=0.5", "--config.eval_snapshots=false")
  assert proc.returncode == 0, proc.stderr[-3000:]
  ticks = tmp_path / "ticks.json"
  proc = _run("-c", _PLOT_SPY, str(ticks), "--workdir", workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.getsize(os.path.join(workdir, "eval", "error_vs_m.png")) > 0
  values = json.load(open(ticks))
  assert values and all(v == int(v) for v in values), values
  assert {1.0, 2.0} <= set(values), values
