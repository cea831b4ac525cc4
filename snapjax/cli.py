"""Shared command-line plumbing: one-line errors with exit code 2, optional multi-host start-up."""
import logging as py_logging
import os
import re
import sys
from typing import Callable

from absl import logging

from snapjax.errors import UserError

EXIT_USAGE = 2
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")


class _QuietLibraries(py_logging.Filter):
  """Drops the INFO chatter of orbax and TensorFlow from the progress log; their warnings still show, as one line.

  snapjax turns the errors that matter into its own one-line messages (a corrupt snapshot, a failed save);
  the libraries' multi-line dumps of the same error (tracebacks, TensorStore specs) would bury them.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    noisy = any(p in record.pathname for p in ("/orbax/", "/tensorflow_datasets/", "/tensorflow/", "/clu/"))
    if not noisy:
      return True
    if record.levelno < py_logging.WARNING:
      return False
    record.msg, record.args = record.getMessage().splitlines()[0] if record.getMessage() else "", None
    record.exc_info, record.exc_text = None, None
    return True


def _unraisable_as_one_line(unraisable) -> None:
  """An exception Python cannot raise (e.g. in an orbax coroutine collected after a failed restore) as one line.

  Python prints those with a traceback at garbage collection, after snapjax's own one-line error; the cause is
  already in that error.
  """
  text = str(unraisable.exc_value).splitlines()
  logging.warning("Ignored %s in %s: %s", type(unraisable.exc_value).__name__,
                  getattr(unraisable.object, "__qualname__", type(unraisable.object).__name__),
                  text[0][:300] if text else "")


def setup_logging() -> None:
  """INFO progress lines from snapjax only; quiet TensorFlow's C++ start-up messages."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.unraisablehook = _unraisable_as_one_line


def fail(message: str) -> None:
  """Print a one-line error and exit with code 2; the error stays the last line printed."""
  import gc
  gc.collect()  # Library objects left over from the failure (orbax coroutines) report before the error line...
  sys.unraisablehook = lambda unraisable: None  # ...and nothing prints after it while the interpreter exits.
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


_REQUIRED = re.compile(r"Flag --(\w+) must have a value other than None")
_BAD_VALUE = re.compile(r"^flag (--[\w.]+=.*?): (.*)$", re.S)
_MISSING = re.compile(r"^Missing value for flag (--[\w.]+)$")
# ml_collections re-raises a TypeError or ValueError of get_config() with the whole traceback in its message.
_GET_CONFIG_RAISED = re.compile(r"^flag (--[\w.]+=.*?): Error whilst parsing config file:")
_EXPECTED = (("invalid literal for int()", "expected an integer"),
             ("could not convert string to float", "expected a number"),
             ("Non-boolean argument", "expected true or false"))


def _flag_in_argv(argv: list[str], name: str) -> str | None:
  """The value of --name in argv (either --name=V or --name V), for messages."""
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _flag_error(e: Exception) -> str:
  """One line for an absl flag error: a missing required flag, or an override of the wrong type."""
  from absl import flags
  if m := _GET_CONFIG_RAISED.match(str(e)):  # Its last line is the exception: "module.Type: message".
    last = [l.strip() for l in str(e).splitlines() if l.strip()][-1]
    kind, _, message = last.partition(": ")
    if kind.startswith("snapjax.errors."):  # A config file's own one-line error (configs/*.py:METHOD).
      return f"{m.group(1)}: {message}"
    if "get_config() takes 0 positional arguments" in message:
      return f"{m.group(1)}: this config file takes no ':ARGUMENT' (its get_config() has no parameter)"
    return f"{m.group(1)}: loading it raised {last}"
  text = " ".join(str(e).split())
  if m := _REQUIRED.search(text):
    name = m.group(1)
    return f"--{name} is required: {flags.FLAGS[name].help.split(';')[0].rstrip('.')}"
  if m := _MISSING.match(text):
    return f"{m.group(1)}: missing value; write {m.group(1)}=VALUE"
  if m := _BAD_VALUE.match(text):
    reason = next((want for cue, want in _EXPECTED if cue in m.group(2)), m.group(2))
    return f"{m.group(1)}: {reason}"
  return text


def _config_error(e: BaseException, filename: str | None) -> str:
  """One line for an error raised while loading a config file or applying a --config.<field> override."""
  from snapjax import config as config_lib
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  cause = e.args[0] if isinstance(e, AttributeError) and e.args and isinstance(e.args[0], KeyError) else e
  if isinstance(cause, KeyError):
    field = str(cause.args[0] if cause.args else cause).strip("'\"")
    known = ", ".join(sorted(config_lib.base_config().keys()))
    return f"--config.{field}: unknown config field {field!r}; known fields: {known}"
  if isinstance(e, OSError) and "No such file" in str(e):
    return (f"--config={filename}: no such config file; pass a file that defines get_config(), "
            f"such as configs/quickstart.py")
  if isinstance(e, AttributeError) and "get_config" in str(e):
    return (f"--config={filename} does not define get_config(); a config file defines get_config() "
            f"returning an ml_collections.ConfigDict (see configs/quickstart.py)")
  if isinstance(e, SyntaxError):
    return f"--config={filename}: syntax error at line {e.lineno}: {e.msg}"
  reason = lines[-1] if lines else ""
  return f"--config={filename}: loading it raised {type(e).__name__}: {reason}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags parser for app.run: a bad flag or config file is a one-line error and exit code 2."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(_flag_error(e))
  except Exception as e:  # pylint: disable=broad-except  # The config file is user code: any error is the user's.
    fail(_config_error(e, _flag_in_argv(argv, "config")))


def config_from_flag(name: str = "config"):
  """The ConfigDict of a config_flags flag (loaded lazily): load errors become one line and exit code 2."""
  from absl import flags
  try:
    config = getattr(flags.FLAGS, name)
    if config is not None:
      config.keys()  # The file is loaded, and overrides applied, on first use.
  except flags.Error as e:
    fail(_flag_error(e))
  except Exception as e:  # pylint: disable=broad-except
    fail(_config_error(e, flags.FLAGS[name].config_filename))
  if config is None:
    fail(f"--{name} is required: a config file such as configs/quickstart.py")
  return config


def run_guarded(fn: Callable[[], object]) -> object:
  """Call fn; a UserError becomes a one-line message and exit code 2."""
  try:
    return fn()
  except UserError as e:
    fail(str(e))


def enable_compilation_cache(directory: str | None) -> None:
  """Opt-in persistent compilation cache: programs that take >= 1 s to compile are written to `directory` and loaded
  from it by later runs of the same programs (JAX's cache; the key covers the program, devices, flags and versions).

  Nothing is cached unless this is called with a directory (or JAX_COMPILATION_CACHE_DIR is set). A local
  directory that cannot be created is a one-line error.
  """
  if not directory:
    return
  import jax
  from etils import epath
  try:
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    fail(f"--compilation_cache_dir={directory}: cannot create it ({e.strerror or e})")
  jax.config.update("jax_compilation_cache_dir", directory)
  logging.info("Persistent compilation cache: %s", directory)


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
