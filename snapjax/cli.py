"""Shared command-line plumbing: one-line errors with exit code 2, optional multi-host start-up."""
import logging as py_logging
import os
import sys
from typing import Callable

from absl import logging

from snapjax.errors import UserError

EXIT_USAGE = 2
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")


class _QuietLibraries(py_logging.Filter):
  """Drops the INFO chatter of orbax and TensorFlow from the progress log; their warnings still show."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    noisy = any(p in record.pathname for p in ("/orbax/", "/tensorflow_datasets/", "/tensorflow/", "/clu/"))
    return record.levelno >= py_logging.WARNING or not noisy


def setup_logging() -> None:
  """INFO progress lines from snapjax only; quiet TensorFlow's C++ start-up messages."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())


def fail(message: str) -> None:
  """Print a one-line error and exit with code 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def run_guarded(fn: Callable[[], object]) -> object:
  """Call fn; a UserError becomes a one-line message and exit code 2."""
  try:
    return fn()
  except UserError as e:
    fail(str(e))


def maybe_initialize_distributed(coordinator: str | None, num_processes: int | None,
                                 process_id: int | None, cpu_collectives: str | None = None) -> None:
  """jax.distributed.initialize() when several hosts run this command (flags or cluster environment)."""
  import jax
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  explicit = coordinator is not None
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  auto = any(os.environ.get(k) for k in _CLUSTER_ENV[:2]) or "," in tpu_hosts or (
      int(os.environ.get("SLURM_NTASKS", "1")) > 1)
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  elif auto:
    jax.distributed.initialize()
  else:
    return
  logging.info("Process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
