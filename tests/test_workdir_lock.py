"""The workdir lock: a live run's lock is refused, a dead one's taken over (same host at once, other hosts by age)."""
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing
import pytest

from snapjax import workdir as workdir_lib, workdir_lock
from snapjax.errors import UserError, WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Another run: takes the lock of argv[1] through the public API, says so, and keeps it until it is killed.
_HOLDER = r'''
import sys, time
from snapjax import workdir_lock
workdir_lock.acquire(sys.argv[1], heartbeat_s=0.2, stale_after_s=5.0)
print("locked", flush=True)
time.sleep(300)
'''


def _lock_path(workdir):
  return os.path.join(workdir, "run.lock")


def _read_lock(workdir):
  with open(_lock_path(workdir)) as f:
    return json.load(f)


def _write_lock(workdir, info):
  os.makedirs(workdir, exist_ok=True)
  with open(_lock_path(workdir), "w") as f:
    json.dump(info, f)


def _foreign_lock(heartbeat_age_s):
  """A lock as written by a run on another host, whose last heartbeat is heartbeat_age_s old."""
  now = time.time()
  return {"host": "tpu-worker-7.example", "boot_id": "0f" * 16, "pid_ns": "pid:[1]", "pid": 4242,
          "pid_start": 1234, "token": "another-run", "created": now - 3600, "heartbeat": now - heartbeat_age_s,
          "heartbeat_s": 10.0, "command": "python train.py"}


def _refusal(workdir, **kwargs):
  with pytest.raises(WorkdirLockedError) as e:
    workdir_lock.acquire(workdir, **kwargs)
  message = str(e.value)
  assert isinstance(e.value, UserError) and "\n" not in message and repr(workdir) in message, message
  assert "wait for it" in message and "another --workdir" in message, message
  return message


def _wait_for(predicate, timeout_s=10.0):
  """Poll predicate until it holds (True) or timeout_s passes (False): thread timing on a loaded machine varies."""
  deadline = time.time() + timeout_s
  while not predicate():
    if time.time() > deadline:
      return False
    time.sleep(0.05)
  return True


def _takeover_warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "Took over" in r.getMessage()]


@pytest.fixture
def workdir(tmp_path):
  return str(tmp_path / "run")


def test_live_run_in_another_process_is_refused_and_taken_over_at_once_after_kill_9(workdir, caplog):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    line = proc.stdout.readline()
    assert line.strip() == "locked", line + proc.stdout.read()
    held = workdir_lock.holder(workdir)
    assert held["pid"] == proc.pid and held["host"] == socket.gethostname()
    assert workdir_lock.is_live(held)
    message = _refusal(workdir)
    assert f"host {socket.gethostname()}, pid {proc.pid}, running since " in message, message
    assert "stale after" not in message  # Same host: no waiting on heartbeats, the pid decides.
    assert _read_lock(workdir)["token"] == held["token"]  # The refused attempt left the holder's lock alone.
    proc.send_signal(signal.SIGKILL)
    # Wait for it to die without reaping it: a zombie still answers os.kill(pid, 0), yet is dead.
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    assert not workdir_lock.is_live(held)
    caplog.set_level(logging.WARNING)
    t0 = time.time()
    with workdir_lock.acquire(workdir) as lock:
      assert time.time() - t0 < 5.0  # At once, not after stale_after_s (60 s).
      mine = _read_lock(workdir)
      assert mine["pid"] == os.getpid() and mine["token"] == lock.token != held["token"]
  finally:
    proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()
  warnings = _takeover_warnings(caplog)
  assert len(warnings) == 1 and f"pid {proc.pid}" in warnings[0] and "dead" in warnings[0], warnings
  assert not os.path.exists(_lock_path(workdir))


def test_second_acquire_in_the_same_process_is_refused_until_released(workdir):
  assert workdir_lock.holder(workdir) is None
  lock = workdir_lock.acquire(workdir)
  assert os.path.isdir(workdir)  # Created on the way.
  info = _read_lock(workdir)
  assert info["pid"] == os.getpid() and info["token"] == lock.token and info["created"] == info["heartbeat"]
  assert {"host", "boot_id", "pid_ns", "pid_start", "command", "heartbeat_s"} <= set(info)
  assert f"pid {os.getpid()}," in _refusal(workdir)
  lock.release()
  lock.release()  # Idempotent.
  assert not os.path.exists(_lock_path(workdir))
  workdir_lock.acquire(workdir).release()


def test_simultaneous_acquires_give_one_lock(workdir):
  # Threads of one process: once one holds the lock, the others see a live pid (this one) and are refused.
  barrier, outcomes = threading.Barrier(8), []

  def attempt():
    barrier.wait()
    try:
      outcomes.append(workdir_lock.acquire(workdir))
    except WorkdirLockedError as e:
      outcomes.append(e)

  threads = [threading.Thread(target=attempt) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  locks = [o for o in outcomes if isinstance(o, workdir_lock.RunLock)]
  assert len(outcomes) == 8 and len(locks) == 1, outcomes
  assert _read_lock(workdir)["token"] == locks[0].token
  locks[0].release()
  assert os.listdir(workdir) == []


def test_other_host_with_a_fresh_heartbeat_is_refused_and_with_an_old_one_taken_over(workdir, caplog):
  _write_lock(workdir, _foreign_lock(heartbeat_age_s=20))
  message = _refusal(workdir, stale_after_s=30.0)
  assert "host tpu-worker-7.example, pid 4242" in message, message
  assert "it is considered stale after 30 s without a heartbeat" in message, message
  assert _read_lock(workdir)["token"] == "another-run"

  _write_lock(workdir, _foreign_lock(heartbeat_age_s=31))
  caplog.set_level(logging.WARNING)
  with workdir_lock.acquire(workdir, stale_after_s=30.0) as lock:
    assert _read_lock(workdir)["token"] == lock.token
  warnings = _takeover_warnings(caplog)
  assert len(warnings) == 1 and "pid 4242" in warnings[0] and "no heartbeat for 31 s" in warnings[0], warnings


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times need /proc")
def test_a_reused_pid_counts_as_dead(workdir, caplog):
  with workdir_lock.acquire(workdir):
    ours = _read_lock(workdir)
  assert isinstance(ours["pid_start"], int)
  # The recorded pid is alive (it is this process) but started at another time: the pid was reused.
  reused = {**ours, "token": "old-run", "pid_start": ours["pid_start"] - 1}
  assert workdir_lock.is_live(ours) and not workdir_lock.is_live(reused)
  _write_lock(workdir, reused)
  caplog.set_level(logging.WARNING)
  workdir_lock.acquire(workdir).release()
  assert len(_takeover_warnings(caplog)) == 1
  _write_lock(workdir, {**ours, "token": "old-run"})  # The same pid and start time: live, refused.
  _refusal(workdir)


def test_release_leaves_a_lock_that_another_run_put_in_place(workdir):
  lock = workdir_lock.acquire(workdir, heartbeat_s=30.0, stale_after_s=60.0)
  _write_lock(workdir, _foreign_lock(heartbeat_age_s=0))
  lock.release()
  assert _read_lock(workdir)["token"] == "another-run"
  assert sorted(os.listdir(workdir)) == ["run.lock"]  # No temporary or set-aside files left behind.


def test_heartbeat_thread_refreshes_the_lock_and_notices_a_takeover(workdir):
  lock = workdir_lock.acquire(workdir, heartbeat_s=0.2, stale_after_s=5.0)
  try:
    first = _read_lock(workdir)
    assert _wait_for(lambda: _read_lock(workdir)["heartbeat"] > first["heartbeat"] + 0.3)  # At least 2 beats.
    later = _read_lock(workdir)
    assert later["created"] == first["created"] and later["token"] == first["token"] and not lock.lost
    _write_lock(workdir, _foreign_lock(heartbeat_age_s=0))  # Another run took it over.
    assert _wait_for(lambda: lock.lost)
    time.sleep(0.5)
    assert _read_lock(workdir)["token"] == "another-run"  # The heartbeats did not write over it.
  finally:
    lock.release()
  assert _read_lock(workdir)["token"] == "another-run"


@pytest.mark.parametrize("content", [b"", b'{"host": "tpu-worker-7", "pid": 42, "tok'], ids=["empty", "cut"])
def test_unparsable_lock_is_held_while_fresh_and_stale_when_old(workdir, content, caplog):
  os.makedirs(workdir)
  with open(_lock_path(workdir), "wb") as f:
    f.write(content)
  assert workdir_lock.holder(workdir)["corrupt"]
  message = _refusal(workdir, stale_after_s=30.0)
  assert "unparsable" in message and "stale after 30 s" in message, message
  old = time.time() - 31
  os.utime(_lock_path(workdir), (old, old))
  caplog.set_level(logging.WARNING)
  with workdir_lock.acquire(workdir, stale_after_s=30.0) as lock:
    assert _read_lock(workdir)["token"] == lock.token
  warnings = _takeover_warnings(caplog)
  assert len(warnings) == 1 and "unparsable" in warnings[0], warnings


def test_fresh_does_not_move_the_lock(workdir):
  with workdir_lock.acquire(workdir) as lock:
    for d in ("state", "snapshots", "eval"):
      os.makedirs(os.path.join(workdir, d))
    for f in ("config.json", "events.out.tfevents.1.host"):
      open(os.path.join(workdir, f), "w").close()
    moved = workdir_lib.move_run_aside(workdir)
    assert sorted(os.listdir(moved)) == ["config.json", "eval", "events.out.tfevents.1.host", "snapshots", "state"]
    assert sorted(os.listdir(workdir)) == [os.path.basename(moved), "run.lock"]
    assert _read_lock(workdir)["token"] == lock.token


class _Upload(io.BytesIO):
  """A file written as a bucket object is: readers see the old object until close() completes the upload."""

  def __init__(self, path):
    super().__init__()
    self.path = path

  def close(self):
    if not self.closed:
      with open(self.path + ".upload", "wb") as f:
        f.write(self.getvalue())
      os.replace(self.path + ".upload", self.path)
    super().close()


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://bucket/... paths served from tmp_path/gs/bucket/... through etils.epath's own mock backend, offline.

  etils has no in-memory backend; its testing.mock_epath swaps the backends of every scheme, but gs:// goes to
  TensorFlow's gfile whenever TensorFlow is installed, so that check (private to etils) is turned off here.
  Only the lock module's own calls go through epath here; the test reads and writes the files directly.
  """
  root = str(tmp_path / "gs")
  local = lambda p: os.fspath(p).replace("gs://", root + "/", 1)
  one = lambda fn, p, *args, **kwargs: fn(local(p), *args, **kwargs)
  two = lambda fn, p, dst, *args, **kwargs: fn(local(p), local(dst), *args, **kwargs)
  open_ = lambda fn, p, mode: _Upload(local(p)) if mode == "wb" else fn(local(p), mode)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(workdir_lock, "SETTLE_S", 0.05)
  with epath_testing.mock_epath(open=open_, exists=one, isdir=one, listdir=one, glob=one, makedirs=one, mkdir=one,
                                remove=one, rmtree=one, stat=one, walk=one, rename=two, replace=two, copy=two):
    yield root


def test_bucket_workdir_is_locked_through_epath(bucket):
  assert os.fspath(epath.Path("gs://bucket/run") / "run.lock") == "gs://bucket/run/run.lock"
  file = os.path.join(bucket, "bucket", "run", "run.lock")
  lock = workdir_lock.acquire("gs://bucket/run", heartbeat_s=0.2, stale_after_s=5.0)
  try:
    with open(file) as f:
      first = json.load(f)
    assert first["token"] == lock.token == workdir_lock.holder("gs://bucket/run")["token"]
    assert f"pid {os.getpid()}," in _refusal("gs://bucket/run")
    assert _wait_for(lambda: _read_lock(os.path.dirname(file))["heartbeat"] > first["heartbeat"])
  finally:
    lock.release()
  assert not os.path.exists(file)
  # A dead holder on another host: stale after stale_after_s, then taken over.
  os.makedirs(os.path.dirname(file), exist_ok=True)
  with open(file, "w") as f:
    json.dump(_foreign_lock(heartbeat_age_s=20), f)
  assert "stale after 30 s" in _refusal("gs://bucket/run", stale_after_s=30.0)
  with workdir_lock.acquire("gs://bucket/run", heartbeat_s=1.0, stale_after_s=10.0) as lock:
    assert workdir_lock.holder("gs://bucket/run")["token"] == lock.token


def test_bucket_write_overwritten_while_settling_is_not_ours(bucket, monkeypatch):
  # Another run wrote its lock between our write and our read-back: the later write wins, we are refused.
  file = os.path.join(bucket, "bucket", "run", "run.lock")
  monkeypatch.setattr(workdir_lock, "_settle", lambda: _write_lock(os.path.dirname(file), _foreign_lock(0)))
  message = _refusal("gs://bucket/run")
  assert "host tpu-worker-7.example, pid 4242" in message, message
  with open(file) as f:
    assert json.load(f)["token"] == "another-run"


def test_heartbeat_must_be_shorter_than_the_stale_age(workdir):
  with pytest.raises(ValueError):
    workdir_lock.acquire(workdir, heartbeat_s=60.0, stale_after_s=60.0)
  assert not os.path.exists(workdir)
