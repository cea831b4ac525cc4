"""A run's workdir: its path (local or bucket URL), its layout and config.json, the live run's lock, moving it aside."""
import json
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax

from snapjax import config as config_lib
from snapjax.errors import CheckpointError

CONFIG_FILE = "config.json"
STATE_DIR = "state"  # The train state for resuming (snapjax.checkpoints).
SNAPSHOT_DIR = "snapshots"  # One orbax checkpoint per snapshot (snapjax.checkpoints).
EVAL_DIR = "eval"  # eval.py's report of the run, unless given --out_dir (snapjax.report).
# What a run writes into its workdir (and --fresh moves aside): config, checkpoints, reports, TensorBoard events.
RUN_ENTRIES = (CONFIG_FILE, STATE_DIR, SNAPSHOT_DIR, EVAL_DIR)
_ALLOWED = "allowed: a directory (created if missing) or a bucket URL such as gs://bucket/run"


def run_path(path: str | os.PathLike) -> epath.Path:
  """A workdir path: local (made absolute) or a bucket URL such as gs://bucket/run (Cloud TPU)."""
  path = os.fspath(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def eval_dir(workdir: str) -> str:
  """Where eval.py writes a run's report when not given --out_dir: WORKDIR/eval."""
  return os.path.join(workdir, EVAL_DIR)


def check_path(workdir: str | None, flag: str = "--workdir") -> None:
  """A CheckpointError (one line) for a workdir that is empty or blank, or names an existing file."""
  if workdir is None or not str(workdir).strip():
    raise CheckpointError(f"{flag} is empty ({workdir!r}); {_ALLOWED}")
  path = run_path(workdir)
  if path.exists() and not path.is_dir():
    raise CheckpointError(f"{flag}={workdir!r} is an existing file, not a directory; {_ALLOWED}")


def read_config(workdir: str) -> dict[str, Any] | None:
  """The config a workdir was trained with (fields added since take their defaults), or None if it has none."""
  path = run_path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    saved = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is unreadable ({e}); it records the run's config") from e
  if not isinstance(saved, dict):
    raise CheckpointError(f"{path} does not hold a config (a JSON object); it records the run's config")
  return config_lib.with_defaults(saved)


def write_config(workdir: str, config: dict[str, Any]) -> None:
  """Write config.json atomically (main process only)."""
  if jax.process_index() != 0:
    return
  root = run_path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  tmp = root / (CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
  tmp.replace(root / CONFIG_FILE)


def check_same_run(workdir: str, config: dict[str, Any]) -> None:
  """A CheckpointError if workdir holds a run of a config this one cannot resume."""
  saved = read_config(workdir)
  if saved is None:
    return
  diff = config_lib.resume_differences(saved, config)
  if diff:
    shown = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in diff)
    raise CheckpointError(
        f"workdir {workdir!r} holds a run with a different config ({shown}); use another --workdir, "
        f"or pass --fresh to move the old run aside and start again")


def move_run_aside(workdir: str) -> str | None:
  """Rename an existing run's files into WORKDIR/previous-<time>/ (nothing is deleted); return that path."""
  root = run_path(workdir)
  if not root.is_dir() or jax.process_index() != 0:
    return None
  names = [p.name for p in root.iterdir() if p.name in RUN_ENTRIES or p.name.startswith("events.out.tfevents")]
  if not names:
    return None
  dest = root / time.strftime("previous-%Y%m%d-%H%M%S")
  dest.mkdir()
  for n in sorted(names):
    (root / n).rename(dest / n)
  return str(dest)


def start_fresh(workdir: str) -> None:
  """Move an existing run aside (process 0) and wait for every process, for --fresh. Call with the lock held."""
  moved = move_run_aside(workdir)
  if moved:
    logging.warning("Moved the previous run in %s to %s", workdir, moved)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("snapjax_fresh")
