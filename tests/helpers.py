"""Shared test data and configs: a tiny generated Fashion-MNIST in raw IDX files, and a tiny run config."""
import gzip
import os
import struct

import numpy as np

NUM_TRAIN, NUM_TEST = 512, 203  # 203: the last evaluation batch is partial and padded.
MEAN, STD = 72.94, 90.02  # Fashion-MNIST statistics, restated here as the reference normalisation.


def _write_idx(path, array):
  """Independent IDX writer: magic (0, 0, type 0x08, ndim), big-endian dims, raw bytes, gzipped."""
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_tiny_fashion_mnist(directory, seed=0):
  """Learnable 10-class 28x28 data, invariant to crops and flips: class k has brightness 20k plus noise."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for prefix, n in (("train", NUM_TRAIN), ("t10k", NUM_TEST)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = (rng.integers(0, 50, (n, 28, 28)) + 20 * labels[:, None, None]).astype(np.uint8)
    _write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images)
    _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels)
  return directory


def tiny_config(data_dir, **overrides):
  """resnet8 on the tiny data: 16 steps/epoch at batch 32, 4 epochs, 2 cycles (snapshots at 32 and 64)."""
  from snapjax import config as config_lib  # Not at the top: conftest imports this module before JAX starts.
  c = config_lib.base_config()
  c.model = "resnet8"
  c.dataset = "fashion_mnist"
  c.fashion_mnist_dir = str(data_dir)
  c.num_epochs = 4.0
  c.num_cycles = 2
  c.init_lr = 0.1
  c.batch_size = 32
  c.eval_batch_size = 64
  c.log_every_steps = 8
  c.checkpoint_every_steps = 10
  for k, v in overrides.items():
    c[k] = v
  return c


def train_parts(config):
  """(experiment, training arrays, plan, schedule, optimiser) of a config, as a run's set-up makes them (no workdir)."""
  from snapjax import experiment, train_step
  exp = experiment.build(config)
  arrays = exp.load_split(exp.spec.train_split)
  plan = train_step.make_plan(config, len(arrays[1]))
  schedule = train_step.make_schedule(config, plan.total_steps, plan.steps_per_epoch)
  return exp, arrays, plan, schedule, train_step.make_optimizer(config, schedule)


# Subprocess runs (train.py, eval.py, tests/multihost_worker.py) for the CLI, fault and multi-host tests.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
TINY_CONFIG = os.path.join("tests", "configs", "tiny.py")
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(num_devices: int, base: str | None = None, extra: list[str] | tuple[str, ...] = ()) -> str:
  """XLA_FLAGS holding `base`'s flags (default: this environment's) with num_devices fake CPU devices.

  Any device-count flag already in `base` is replaced, the others (--xla_cpu_max_isa=AVX2, fast-math...) kept.
  """
  base = os.environ.get("XLA_FLAGS", "") if base is None else base
  kept = [f for f in base.split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return " ".join([*kept, *extra, f"{DEVICE_COUNT_FLAG}={num_devices}"])


def subprocess_env(num_devices: int = 4, extra_xla_flags=(), **extra: str) -> dict[str, str]:
  """This environment for a child JAX process with num_devices CPU devices and the tests' compile cache."""
  import jax
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SNAPJAX_WORKER_", "SNAPJAX_FAULT", "JAX_")) and k != "XLA_FLAGS"}
  env.update(XLA_FLAGS=xla_flags(num_devices, extra=extra_xla_flags), JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", NO_GCE_CHECK="true")
  if jax.config.jax_compilation_cache_dir:  # Set by conftest; unset when a script outside pytest calls this.
    env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # As conftest: every program.
  env.update(extra)
  return env


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_argv(script: str, data_dir: str, workdir: str, overrides: dict | None = None, *extra: str) -> list[str]:
  """Arguments of train.py (or the worker) on the tiny config with --config.<field> overrides."""
  return [script, "--config", TINY_CONFIG, f"--config.fashion_mnist_dir={data_dir}", "--workdir", workdir,
          *[f"--config.{k}={v}" for k, v in (overrides or {}).items()], *extra]


def launch(argvs: list[list[str]], env: dict[str, str], log_dir: str, timeout: float = 240):
  """Run the Python commands together; kill them all (whole process groups) on the first failure or on timeout.

  Returns (pids, outputs); fails with the failing process's log tail unless every one exits 0.
  """
  import time
  procs, logs, killed = [], [], set()
  try:
    for i, argv in enumerate(argvs):
      logs.append(os.path.join(log_dir, f"proc{i}.log"))
      procs.append(spawn(argv, env, logs[-1]))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
    timed_out = time.monotonic() > deadline
  finally:
    for i, p in enumerate(procs):
      if p.poll() is None:
        p.kill()
        killed.add(i)
      p.wait()
  outputs = []
  for log in logs:
    with open(log, errors="replace") as f:
      outputs.append(f.read())
  failed = [i for i, p in enumerate(procs) if p.returncode != 0]
  # The processes that failed by themselves first (the others were killed because of them), then the killed.
  failed.sort(key=lambda i: i in killed)
  assert not failed, "\n".join(
      f"process {i} of {len(procs)} " + (f"killed after {timeout} s" if i in killed and timed_out else
                                         "killed after another failed" if i in killed else
                                         f"exited with {procs[i].returncode}") + ":\n" + outputs[i][-3000:]
      for i in failed)
  return [p.pid for p in procs], outputs


def snapshot_arrays(workdir: str) -> dict:
  """{step: variables as NumPy} of every committed snapshot of a workdir, read back from disk as eval.py does."""
  import jax
  from snapjax import evaluation, experiment
  exp = experiment.build(evaluation.load_run_config(workdir))
  return {m.step: jax.tree.map(np.asarray, m.variables) for m in evaluation.restore_members([workdir], exp)}


# A fresh `python train.py ...` spends ~3 s of CPU (and ~10 s of wall time on a loaded 2-core machine) importing JAX,
# Flax, optax and orbax before it reads its flags; the tests start well over a hundred such processes. `spawn` forks
# each command from one process per environment that has imported those already (and never started a JAX backend,
# so each child starts its own with the environment's XLA_FLAGS): the same script, flags, environment, working
# directory and exit code as `python ARGV`, several at once (the multi-host and fault tests), each in its own session
# (its pid is its process group: os.killpg(pid, ...) reaches it and its children).
_SERVER = r"""
import json, os, runpy, select, sys
import jax, flax.linen, optax, orbax.checkpoint, ml_collections, absl.app, absl.flags, absl.logging, matplotlib
import snapjax, snapjax.cli, snapjax.config
out = os.fdopen(os.dup(1), "w", buffering=1)
inp, buf, children = sys.stdin.buffer.raw, b"", set()
while True:
  if children:  # Reap the finished children; each exit code is one reply line.
    while True:
      try:
        pid, status = os.waitpid(-1, os.WNOHANG)
      except ChildProcessError:
        break
      if pid == 0:
        break
      children.discard(pid)
      out.write(json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status)}) + "\n")
  if not select.select([inp], [], [], 0.02 if children else None)[0]:
    continue
  chunk = os.read(inp.fileno(), 65536)
  if not chunk:
    break  # The tests' process is gone: so is this one (its children live on in their own sessions).
  buf += chunk
  while b"\n" in buf:
    line, buf = buf.split(b"\n", 1)
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # The child: this request's command, then a normal interpreter exit (atexit, threads joined).
      os.setsid()
      os.close(inp.fileno())
      os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
      for fd, path in ((1, req["stdout"]), (2, req["stderr"])):  # The same path twice: one file, both streams.
        if fd == 2 and path == req["stdout"]:
          os.dup2(1, 2)
        else:  # O_TRUNC is ignored on a named pipe (spawn_reading's).
          os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
      os.chdir(req["cwd"])
      os.environ.clear()
      os.environ.update(req["env"])
      argv = list(req["argv"])
      if argv[0] == "-c":  # python -c CODE ARGS: sys.argv is ["-c", *ARGS], as Python makes it.
        sys.argv, sys.path[0] = ["-c", *argv[2:]], ""
        main = lambda: exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
      else:
        sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
        main = lambda: runpy.run_path(argv[0], run_name="__main__")
      del line, req, out, buf, children
      main()
      sys.exit(0)  # Out of the request loop: the interpreter exits as `python script` would.
    children.add(pid)
    out.write(json.dumps({"pid": pid}) + "\n")
"""
_servers: dict = {}
# Variables a child reads only after it starts (the workers' and fault runners' own): not part of a server's key.
_CHILD_ONLY_ENV = ("PYTEST_", "SNAPJAX_WORKER_", "SNAPJAX_FAULT")


class _Server:
  """One preloaded Python, its replies (read from the raw pipe, so select() sees them all) and its children's codes."""

  def __init__(self, env: dict[str, str]):
    import subprocess
    import sys
    self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, bufsize=0)
    self.buffer, self.codes = b"", {}

  def reply(self, timeout: float | None = None) -> dict | None:
    """The next reply line as a dict, or None past the timeout (seconds; None waits for ever)."""
    import json
    import select
    import time
    deadline = None if timeout is None else time.monotonic() + timeout
    while b"\n" not in self.buffer:
      left = None if deadline is None else max(0.0, deadline - time.monotonic())
      if not select.select([self.proc.stdout], [], [], left)[0]:
        return None
      chunk = os.read(self.proc.stdout.fileno(), 65536)
      if not chunk:
        raise RuntimeError(f"the preloaded Python exited with {self.proc.wait()}")
      self.buffer += chunk
    line, self.buffer = self.buffer.split(b"\n", 1)
    return json.loads(line)

  def start(self, request: dict) -> int:
    import json
    self.proc.stdin.write((json.dumps(request) + "\n").encode())
    self.proc.stdin.flush()
    while True:
      r = self.reply()
      if "code" in r:
        self.codes[r["pid"]] = r["code"]
      else:
        return r["pid"]

  def code(self, pid: int, timeout: float | None) -> int | None:
    """pid's exit code, waiting up to timeout seconds (0: just look), or None if it is still running."""
    import time
    deadline = None if timeout is None else time.monotonic() + timeout
    while pid not in self.codes:
      left = None if deadline is None else max(0.0, deadline - time.monotonic())
      r = self.reply(left)
      if r is None:
        return None
      self.codes[r["pid"]] = r["code"]
    return self.codes[pid]


def _server(env: dict[str, str]) -> "_Server":
  key = tuple(sorted((k, v) for k, v in env.items() if not k.startswith(_CHILD_ONLY_ENV)))
  server = _servers.get(key)
  if server is None or server.proc.poll() is not None:
    server = _servers[key] = _Server({k: v for k, v in env.items() if not k.startswith(_CHILD_ONLY_ENV)})
  return server


class Spawned:
  """`python ARGV` forked from the preloaded Python of its environment: the subprocess.Popen methods the tests use
  (pid, args, returncode, poll, wait, send_signal, kill). Its stdout and stderr go to files (one file when both paths
  are the same), or a named pipe the caller reads (spawn_reading)."""

  def __init__(self, argv: list[str], env: dict[str, str], stdout: str, stderr: str, cwd: str = ROOT):
    import sys
    self.args = [sys.executable, *argv]
    self._server = _server(env)
    self.pid = self._server.start({"argv": list(argv), "cwd": cwd, "env": env, "stdout": stdout, "stderr": stderr})
    self.returncode = None

  def poll(self) -> int | None:
    if self.returncode is None:
      self.returncode = self._server.code(self.pid, 0)
    return self.returncode

  def wait(self, timeout: float | None = None) -> int:
    import subprocess
    if self.returncode is None:
      self.returncode = self._server.code(self.pid, timeout)
      if self.returncode is None:
        raise subprocess.TimeoutExpired(self.args, timeout)
    return self.returncode

  def send_signal(self, sig: int) -> None:
    if self.poll() is None:
      try:
        os.kill(self.pid, sig)
      except ProcessLookupError:
        pass

  def kill(self) -> None:
    """SIGKILL to its whole process group (it and whatever it started)."""
    import signal
    if self.poll() is None:
      try:
        os.killpg(self.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass


def spawn(argv: list[str], env: dict[str, str], log: str, cwd: str = ROOT) -> Spawned:
  """Starts `python ARGV` (Spawned), its stdout and stderr together in the file `log`."""
  return Spawned(argv, env, log, log, cwd)


def spawn_reading(argv: list[str], env: dict[str, str], cwd: str = ROOT) -> Spawned:
  """spawn with stdout and stderr through a named pipe that a thread reads: `.lines` grows as the child prints
  (each line without its newline), and the `.reader` thread ends when the child and its children have closed it."""
  import shutil
  import tempfile
  import threading
  tmp = tempfile.mkdtemp()
  fifo = os.path.join(tmp, "out.fifo")
  os.mkfifo(fifo)
  child = Spawned(argv, env, fifo, fifo, cwd)
  stream = open(fifo, errors="replace")  # Returns once the child has opened its end.
  child.lines = []

  def read():
    with stream:
      for line in stream:
        child.lines.append(line.rstrip("\n"))
    shutil.rmtree(tmp, ignore_errors=True)

  child.reader = threading.Thread(target=read, daemon=True)
  child.reader.start()
  return child


def run_python(argv: list[str], env: dict[str, str], timeout: float, cwd: str = ROOT):
  """subprocess.run([python, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout), forked from
  a preloaded Python for this env (started on first use; later calls with the same env reuse it)."""
  import subprocess
  import sys
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    paths = {"stdout": os.path.join(tmp, "out"), "stderr": os.path.join(tmp, "err")}
    child = Spawned(argv, env, paths["stdout"], paths["stderr"], cwd)
    try:
      code = child.wait(timeout)
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()
      raise
    texts = {}
    for name, path in paths.items():
      with open(path, errors="replace") as f:
        texts[name] = f.read()
  return subprocess.CompletedProcess([sys.executable, *argv], code, texts["stdout"], texts["stderr"])
