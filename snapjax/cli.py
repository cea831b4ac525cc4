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


# What loading a config file or applying a --config.<field> override can raise.
_CONFIG_ERRORS = (OSError, AttributeError, KeyError, TypeError, ValueError, SyntaxError, ImportError, NameError)


def _one_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).strip("'\"").splitlines() if l.strip()]
  reason = lines[-1] if lines else type(e).__name__
  if isinstance(e, KeyError) or (isinstance(e, AttributeError) and "get_config" not in reason):
    reason = f"unknown config field {reason}"
  elif isinstance(e, AttributeError):
    reason = "the config file does not define get_config()"
  return reason


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags parser for app.run: a bad flag or config file is a one-line error and exit code 2."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  except _CONFIG_ERRORS as e:
    fail(f"bad --config: {_one_line(e)}")


def config_from_flag(name: str = "config"):
  """The ConfigDict of a config_flags flag (loaded lazily): load errors become one line and exit code 2."""
  from absl import flags
  try:
    config = getattr(flags.FLAGS, name)
    if config is not None:
      config.keys()  # The file is loaded, and overrides applied, on first use.
  except (*_CONFIG_ERRORS, flags.Error) as e:
    fail(f"--{name}={flags.FLAGS[name].config_filename!r}: {_one_line(e)}")
  if config is None:
    fail(f"--{name} is required: a config file such as configs/quickstart.py")
  return config


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
