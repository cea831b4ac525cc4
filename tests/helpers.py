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
  import signal
  import subprocess
  import sys
  import time
  procs, logs, killed = [], [], set()
  try:
    for i, argv in enumerate(argvs):
      log = open(os.path.join(log_dir, f"proc{i}.log"), "w+")
      logs.append(log)
      procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
    timed_out = time.monotonic() > deadline
  finally:
    for i, p in enumerate(procs):
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        killed.add(i)
      p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
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
