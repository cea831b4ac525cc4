"""A lock on a workdir, so that two train.py runs never write one workdir at once.

`acquire(workdir)` creates WORKDIR/run.lock (JSON, see `acquire`) or raises WorkdirLockedError (a UserError:
one line, exit code 2) naming the live run that holds it. Call it on process 0 only: the hosts of one multi-host
run are one run. It must be acquired before `--fresh` (training.move_run_aside) moves anything: the lock is what
tells a live run from a dead one. move_run_aside only moves config.json, state, snapshots, eval and
events.out.tfevents*, so the lock file (and the run.lock.*.tmp / run.lock.*.old names used while writing it)
stays in place. eval.py never takes the lock: reading the committed snapshots of a live run is allowed.

A killed run never locks its workdir forever:
- Same host (host name, boot id and pid namespace equal): the holder is live while its pid exists, is not a
  zombie, and has the start time recorded in the lock (a reused pid has another one). A dead holder's lock
  (kill -9, crash) is taken over at once, with a warning.
- Another host: the holder rewrites `heartbeat` every heartbeat_s seconds from a daemon thread; a lock whose
  heartbeat is older than stale_after_s (by this host's clock: hosts are assumed NTP-synchronised to well within
  that) is taken over, with a warning.
- An unparsable lock file (a crash mid-write) older than stale_after_s (by its mtime) is stale; a fresher one is
  held (someone is writing it).

Local workdirs are locked atomically: the lock file appears complete through a hard link of a temporary file
(O_CREAT|O_EXCL where hard links are not supported), and a stale or released lock is removed by renaming it
aside and checking what was moved. Bucket workdirs (gs://..., through etils.epath) have no atomic create: see
`_claim_shared` for the race that remains there.
"""
import atexit
import errno
import json
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import numpy as np

from snapjax.workdir import run_path
from snapjax.errors import WorkdirLockedError

LOCK_FILE = "run.lock"
SETTLE_S = 2.0  # Bucket workdirs: how long a written lock must survive before it is ours (see _claim_shared).
_ATTEMPTS = 5  # Takeovers or creations lost to other runs before giving up.


class RunLock:
  """The lock of one workdir, held by this process; release() or leaving a `with` block gives it back.

  `lost` becomes True if the heartbeat thread finds that another run has replaced the lock (only possible after
  this run looked dead: its heartbeat stopped for stale_after_s); the lock file is then left to that run.
  """

  def __init__(self, workdir: str, path: epath.Path, info: dict[str, Any], *, local: bool, heartbeat_s: float):
    self.workdir = workdir
    self.path = path
    self.info = info
    self.lost = False
    self._local = local
    self._heartbeat_s = heartbeat_s
    self._mutex = threading.Lock()  # Orders release() after an in-flight heartbeat write.
    self._released = False
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._heartbeats, name="snapjax-workdir-lock", daemon=True)
    self._thread.start()
    atexit.register(self.release)

  @property
  def token(self) -> str:
    return self.info["token"]

  def _heartbeats(self) -> None:
    while not self._stop.wait(self._heartbeat_s) and not self.lost:
      try:
        self._beat()
      except Exception as e:  # A transient storage error must not end the heartbeats.
        logging.warning("Could not refresh the lock %s: %s: %s", self.path, type(e).__name__, e)

  def _beat(self) -> None:
    with self._mutex:
      if self._released:
        return
      data, _ = _read(self.path, self._local)
      current = _parse(data) if data is not None else None
      if data is not None and current is None:
        return  # Being written by another run's takeover (or corrupt): look again at the next beat.
      if current is not None and current.get("token") != self.token:
        self.lost = True
        logging.error("The lock of workdir %r was taken over by another run (%s): this run no longer keeps "
                      "other runs out of it.", self.workdir, _describe(current))
        return
      self.info = {**self.info, "heartbeat": time.time()}
      if current is None:  # Removed by hand: put it back unless another run has made one meanwhile.
        _create(self.path, self._local, _encode(self.info))
      else:
        _overwrite(self.path, self._local, _encode(self.info))

  def release(self) -> None:
    """Stop the heartbeats and remove the lock file if it still holds this run's token (idempotent)."""
    with self._mutex:
      if self._released:
        return
      self._released = True
    self._stop.set()
    if self._thread is not threading.current_thread():
      self._thread.join()
    atexit.unregister(self.release)
    try:
      _remove_if(self.path, self._local, lambda data: (_parse(data) or {}).get("token") == self.token)
    except Exception as e:  # Storage backends raise many types; a failed removal must not mask another error.
      logging.warning("Could not remove the lock %s: %s: %s", self.path, type(e).__name__, e)

  def __enter__(self) -> "RunLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def acquire(workdir: str, *, heartbeat_s: float = 10.0, stale_after_s: float = 60.0) -> RunLock:
  """Take the lock of workdir (created if needed) for this process, or raise WorkdirLockedError.

  The lock file WORKDIR/run.lock is a JSON object: host, boot_id, pid_ns (the host's identity), pid, pid_start
  (the process's start time in clock ticks after boot, /proc/<pid>/stat; null where unknown), token (random),
  created and heartbeat (Unix times), heartbeat_s, command (the command line).
  """
  if not 0 < heartbeat_s < stale_after_s:
    raise ValueError(f"need 0 < heartbeat_s < stale_after_s, got {heartbeat_s} and {stale_after_s}")
  root = run_path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  path = root / LOCK_FILE
  local = _is_local(workdir)
  for _ in range(_ATTEMPTS):
    data, mtime = _read(path, local)
    if data is not None:
      stale_reason = _check_stale(workdir, path, data, mtime, stale_after_s)  # Raises if live.
      if not _remove_if(path, local, lambda now_data: now_data == data):
        continue  # Changed since it was read (a heartbeat, another run's takeover): judge it again.
      logging.warning("Took over the lock of workdir %r: %s", workdir, stale_reason)
    now = time.time()
    info = {**_host_identity(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
            "token": secrets.token_hex(16), "created": now, "heartbeat": now, "heartbeat_s": heartbeat_s,
            "command": shlex.join([sys.executable, *sys.argv])}
    if _create(path, local, _encode(info)):
      return RunLock(workdir, path, info, local=local, heartbeat_s=heartbeat_s)
  raise WorkdirLockedError(f"could not take the lock {path} of workdir {workdir!r}: other runs took it or "
                           f"changed it {_ATTEMPTS} times in a row; wait for them, or use another --workdir")


def claim(workdir: str):
  """Take the workdir's lock for this run (process 0 for every host), or refuse it if a live run holds it.

  Every host gets the same answer: on several hosts, process 0 decides and tells the others. Returns the lock
  (release it when the run ends; None on the other hosts).
  """
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir)
    except WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    refused = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if refused and error is None:
      error = WorkdirLockedError(f"workdir {workdir!r} is in use by another run (process 0 names it); "
                                 f"wait for it to end, or use another --workdir")
  if error is not None:
    raise error
  return lock


def holder(workdir: str) -> dict[str, Any] | None:
  """The lock file's content (see acquire), None if there is none, {"corrupt": True, "mtime": t} if unparsable."""
  path = run_path(workdir) / LOCK_FILE
  data, mtime = _read(path, _is_local(workdir))
  if data is None:
    return None
  return _parse(data) or {"corrupt": True, "mtime": mtime}


def is_live(info: dict[str, Any], *, stale_after_s: float = 60.0) -> bool:
  """Whether a lock (holder's dict) belongs to a live run; see the module docstring for the rules."""
  if info.get("corrupt"):
    return time.time() - info["mtime"] < stale_after_s
  if _same_host(info):
    return _process_alive(info["pid"], info.get("pid_start"))
  return time.time() - info["heartbeat"] < stale_after_s


def _check_stale(workdir: str, path: epath.Path, data: bytes, mtime: float, stale_after_s: float) -> str:
  """Why the lock in data is stale (for the takeover warning); raise WorkdirLockedError if its run is live."""
  info = _parse(data)
  age = time.time() - (mtime if info is None else info["heartbeat"])
  stated = f"it is considered stale after {stale_after_s:g} s without a heartbeat"
  if info is None:
    if age < stale_after_s:
      raise WorkdirLockedError(
          f"workdir {workdir!r} is being locked by another training run just now (its lock file {path} is "
          f"unparsable and {age:.0f} s old); wait for it to finish, or use another --workdir; {stated}")
    return f"its lock file was unparsable and {age:.0f} s old (stale after {stale_after_s:g} s)"
  same_host = _same_host(info)
  if is_live(info, stale_after_s=stale_after_s):
    message = (f"workdir {workdir!r} is in use by a live training run ({_describe(info)}; lock file {path}); "
               f"wait for it to finish, or use another --workdir")
    if not same_host:
      message += f"; {stated} (last heartbeat {age:.0f} s ago)"
    raise WorkdirLockedError(message)
  if same_host:
    return f"its run ({_describe(info)}) is dead: it was killed or crashed"
  return f"its run ({_describe(info)}) sent no heartbeat for {age:.0f} s (stale after {stale_after_s:g} s)"


def _describe(info: dict[str, Any]) -> str:
  created = info.get("created")
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if isinstance(created, (int, float)) else "?"
  return f"host {info['host']}, pid {info['pid']}, running since {since}"


# The lock file.
def _is_local(workdir: str) -> bool:
  return "://" not in os.fspath(workdir)


def _encode(info: dict[str, Any]) -> bytes:
  return json.dumps(info, indent=1, sort_keys=True).encode()


def _parse(data: bytes) -> dict[str, Any] | None:
  """The lock's info, or None if data is not a complete lock (empty, cut by a crash, or not ours)."""
  try:
    info = json.loads(data.decode())
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None
  ok = (isinstance(info, dict) and isinstance(info.get("token"), str) and isinstance(info.get("host"), str)
        and type(info.get("pid")) is int and type(info.get("heartbeat")) in (int, float))
  return info if ok else None


def _read(path: epath.Path, local: bool) -> tuple[bytes | None, float | None]:
  """The lock file's bytes and modification time, or (None, None) if there is none."""
  if local:
    try:
      with open(path, "rb") as f:
        return f.read(), os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
      return None, None
  if not path.exists():
    return None, None
  # A backend without modification times gives 0, so an unparsable bucket lock counts as stale at once: bucket
  # objects appear whole when their upload completes, so a crash cannot leave one half written there.
  return path.read_bytes(), float(path.stat().mtime or 0)


def _create(path: epath.Path, local: bool, data: bytes) -> bool:
  """Create the lock file holding data unless one exists; True if this call created it."""
  if not local:
    return _claim_shared(path, data)
  path = os.fspath(path)
  tmp = f"{path}.{secrets.token_hex(8)}.tmp"
  _write_file(tmp, data, exclusive=False)
  try:
    os.link(tmp, path)  # Atomic, and the lock appears with its full content.
    return True
  except FileExistsError:
    return False
  except OSError as e:
    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
      raise
    try:  # A filesystem without hard links: exclusive create, briefly empty (read as "being written").
      _write_file(path, data, exclusive=True)
      return True
    except FileExistsError:
      return False
  finally:
    os.unlink(tmp)


def _claim_shared(path: epath.Path, data: bytes) -> bool:
  """Write the lock to a bucket (no atomic create there), wait SETTLE_S, and own it if it still holds data.

  Best effort: of two runs writing within SETTLE_S of each other, the later write wins and the earlier run sees
  it on reading back. A run that saw no lock and then takes more than SETTLE_S to write its own still overwrites
  a lock that another run has meanwhile read back and owns; that run's heartbeat then finds another token and
  sets RunLock.lost. Closing this window needs a conditional create (GCS ifGenerationMatch=0), which
  etils.epath does not offer.
  """
  path.write_bytes(data)
  _settle()
  now_data, _ = _read(path, local=False)
  return now_data == data


def _settle() -> None:
  time.sleep(SETTLE_S)


def _overwrite(path: epath.Path, local: bool, data: bytes) -> None:
  """Replace the lock's content; readers see the old or the new content, never a mix."""
  if not local:
    path.write_bytes(data)
    return
  tmp = f"{os.fspath(path)}.{secrets.token_hex(8)}.tmp"
  _write_file(tmp, data, exclusive=False)
  os.replace(tmp, path)


def _remove_if(path: epath.Path, local: bool, matches: Callable[[bytes], bool]) -> bool:
  """Remove the lock file if its content matches; True if this call removed it.

  Locally the file is first renamed aside (atomic: of several runs removing it, one gets it) and put back if it is
  not the expected one. In a bucket it is read and then deleted: a lock written in between is deleted too.
  """
  if not local:
    data, _ = _read(path, local=False)
    if data is None or not matches(data):
      return False
    path.unlink(missing_ok=True)
    return True
  path = os.fspath(path)
  aside = f"{path}.{secrets.token_hex(8)}.old"
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False
  try:
    with open(aside, "rb") as f:
      data = f.read()
    if matches(data):
      return True
    _create(path, local=True, data=data)  # Not the one expected: put it back unless a new lock took its place.
    return False
  finally:
    os.unlink(aside)


def _write_file(path: str, data: bytes, *, exclusive: bool) -> None:
  flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
  fd = os.open(path, flags, 0o644)
  try:
    os.write(fd, data)
    os.fsync(fd)
  finally:
    os.close(fd)


# Who holds it: host identity and process liveness.
def _read_text(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return None


def _host_identity() -> dict[str, str | None]:
  """Host name, boot id and pid namespace: pids can only be checked where all three are ours."""
  try:
    pid_ns = os.readlink("/proc/self/ns/pid")
  except OSError:
    pid_ns = None
  return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_ns}


def _same_host(info: dict[str, Any]) -> bool:
  return all(info.get(k) == v for k, v in _host_identity().items())


def _proc_stat(pid: int) -> tuple[str, int] | None:
  """(state, start time in clock ticks after boot) from /proc/<pid>/stat, or None if it cannot be read."""
  text = _read_text(f"/proc/{pid}/stat")
  if text is None:
    return None
  fields = text[text.rfind(")") + 2:].split()  # After "pid (comm) ": field 3 (state) is fields[0].
  try:
    return fields[0], int(fields[19])  # Field 22: starttime.
  except (IndexError, ValueError):
    return None


def _proc_start(pid: int) -> int | None:
  stat = _proc_stat(pid)
  return stat[1] if stat else None


def _process_alive(pid: int, start: int | None) -> bool:
  """Whether pid is a running process of this host that started at start (when known)."""
  if pid <= 0:
    return False  # os.kill would signal process groups.
  foreign = False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    foreign = True  # Alive, but another user's.
  stat = _proc_stat(pid)
  if stat is None:  # Gone meanwhile, or no /proc (not Linux), or hidden (hidepid): trust os.kill.
    return foreign or not os.path.exists("/proc/self/stat")
  state, now_start = stat
  if state in ("Z", "X", "x"):
    return False  # Killed, not yet reaped by its parent.
  return start is None or now_start == start
