"""Orbax persistence of a run: the train state (for resuming) and every snapshot, with checksums."""
import os
import zlib
from typing import Any, Callable

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from snapjax.errors import CheckpointError
from snapjax.workdir import SNAPSHOT_DIR, STATE_DIR, run_path


def _manager(path: epath.Path, *, max_to_keep: int | None, read_only: bool = False) -> ocp.CheckpointManager:
  # A writer removes the <step>.orbax-checkpoint-tmp directories of saves cut by a kill (a reader leaves
  # them: they may be the in-flight saves of a run still training).
  # Each manager gets its own barrier-key prefix: without one, the state and snapshot managers of a multi-host
  # run share orbax's "ThreadSaveMultiHostValueHolder:set_value_start" barrier, and a snapshot's finalising
  # thread meeting the next state save on it failed a run with "Barrier ... is already ongoing" (2 of ~10
  # 2-process runs saving every step, tests/measure_drift.py).
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=not read_only, cleanup_tmp_directories=not read_only,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"snapjax_{path.name}"))
  return ocp.CheckpointManager(path, options=options)


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
  """ShapeDtypeStructs of a pytree (with its own or the given sharding), as a restore target."""
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding or getattr(a, "sharding", None)),
      tree)


class RunCheckpoints:
  """The train state (latest two kept) and every snapshot of one workdir, saved asynchronously."""

  def __init__(self, workdir: str, *, read_only: bool = False):
    self.workdir = workdir
    self.read_only = read_only
    self._state = None if read_only else _manager(run_path(workdir) / STATE_DIR, max_to_keep=2)
    snap_dir = run_path(workdir) / SNAPSHOT_DIR
    if read_only and not snap_dir.is_dir():
      raise CheckpointError(f"no snapshots in workdir {workdir!r}: {snap_dir} does not exist (train first)")
    self._snaps = _manager(snap_dir, max_to_keep=None, read_only=read_only)

  # Train state.
  def latest_state_step(self) -> int | None:
    return self._state.latest_step()

  def save_state(self, step: int, state: Any) -> None:
    # A later state must never be committed before an earlier snapshot: the snapshot is the product.
    self._snaps.wait_until_finished()
    self._state.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    try:
      return self._state.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # orbax raises many types for unreadable data.
      raise CheckpointError(
          f"train state at step {step} in {self._state.directory} cannot be restored "
          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e

  # Snapshots.
  def snapshot_steps(self) -> list[int]:
    return sorted(self._snaps.all_steps())

  def save_snapshot(self, step: int, variables: Any, meta: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> None:
    """Save a snapshot's variables (replicated arrays) and metadata, adding the arrays' checksums.

    extra: more array pytrees saved beside the variables as items of their own (SWAG's moments: "swag"), read
    back with `restore_extra`.

    The variables are saved as host (NumPy) arrays, the same values: orbax then records no sharding for them, so
    plain orbax (`ocp.StandardCheckpointer().restore(".../variables")`, README) restores them on any device
    count. A jax.Array is saved with its sharding's device mesh, and restoring one without a target fails with
    "Topology mismatch" on fewer devices than it was saved on. restore_snapshot passes its target's sharding.
    """
    variables = jax.tree.map(_host_or_self, variables)
    meta = {**meta, "checksums": array_checksums(variables)}
    items = {name: ocp.args.StandardSave(jax.tree.map(_host_or_self, tree)) for name, tree in (extra or {}).items()}
    if extra:
      meta["extra_checksums"] = {name: array_checksums(tree) for name, tree in extra.items()}
    self._snaps.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta), **items), force=True)

  def restore_extra(self, step: int, name: str, abstract: Any) -> Any:
    """The extra item `name` of the snapshot at `step` (`save_snapshot`), checked against its checksums."""
    out = self._restore_snapshot_items(step, {name: abstract}, lambda reason: f"has no readable {name!r} item "
                                                                             f"({reason})")
    tree, meta = out[name], out.meta
    saved = ((meta or {}).get("extra_checksums") or {}).get(name)
    if saved and saved != array_checksums(tree):
      raise CheckpointError(f"snapshot at step {step} ({self.snapshot_path(step)}) is corrupt: its {name!r} arrays "
                            f"differ from the checksums recorded when it was saved")
    return tree

  def _restore_snapshot_items(self, step: int, abstract: dict[str, Any], problem: Callable[[str], str]) -> Any:
    """The snapshot's items named in `abstract` (restored to those targets) and its meta, on the devices; an
    unreadable snapshot is a CheckpointError saying `problem('<exception type>: <its first line>')`."""
    try:
      out = self._snaps.restore(step, args=ocp.args.Composite(
          **{k: ocp.args.StandardRestore(v) for k, v in abstract.items()}, meta=ocp.args.JsonRestore()))
      jax.block_until_ready([out[k] for k in abstract])
      return out
    except Exception as e:  # orbax and TensorStore raise many types for unreadable data.
      lines = str(e).split("See full TensorStore details")[0].strip().splitlines()
      reason = f"{type(e).__name__}: {lines[0] if lines else ''}"
      raise CheckpointError(f"snapshot at step {step} ({self.snapshot_path(step)}) {problem(reason)}") from e

  def snapshot_path(self, step: int) -> str:
    return os.path.join(str(self._snaps.directory), str(step))

  def restore_snapshot(self, step: int, abstract_variables: Any) -> tuple[Any, dict[str, Any]]:
    out = self._restore_snapshot_items(step, {"variables": abstract_variables}, lambda reason: (
        f"is corrupt or truncated ({reason}); retrain, or evaluate without this run"))
    variables, meta = out.variables, out.meta
    saved = (meta or {}).get("checksums")
    if saved:  # Snapshots saved before checksums were recorded are taken as they are.
      now = array_checksums(variables)
      bad = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
      if bad:
        raise CheckpointError(
            f"snapshot at step {step} ({self.snapshot_path(step)}) is corrupt: {len(bad)} array(s) differ from "
            f"the checksums recorded when it was saved (first: {bad[0]}); retrain, or evaluate without this run")
    return variables, meta

  def wait(self) -> None:
    self._snaps.wait_until_finished()
    if self._state is not None:
      self._state.wait_until_finished()

  def close(self) -> None:
    self._snaps.close()
    if self._state is not None:
      self._state.close()


def _host_value(leaf: Any) -> np.ndarray | None:
  """The whole value of an array on this host, or None for one sharded across hosts (no host holds it all)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if not leaf.is_fully_replicated:
      return None
    leaf = leaf.addressable_data(0)  # Every host holds a copy of a replicated array.
  return np.asarray(leaf)


def _host_or_self(leaf: Any) -> Any:
  value = _host_value(leaf)
  return leaf if value is None else value


def saved_snapshot_steps(workdir: str) -> list[int]:
  """The steps of a workdir's committed snapshots, ascending ([] if it has none), read from the directory listing
  without opening orbax: cheap enough to poll. A save still in flight or cut by a kill (a <step>.orbax-checkpoint-tmp
  directory) is not one of them."""
  snap_dir = run_path(workdir) / SNAPSHOT_DIR
  if not snap_dir.is_dir():
    return []
  return sorted(int(p.name) for p in snap_dir.iterdir() if p.name.isdigit())


def array_checksums(tree: Any) -> dict[str, str]:
  """CRC32 of every array's bytes, keyed by its path (orbax/TensorStore do not checksum array data)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = _host_value(leaf)
    if array is None:
      continue  # Only arrays with a whole copy on every host can be checked.
    array = np.ascontiguousarray(array)
    out[jax.tree_util.keystr(path)] = f"{zlib.crc32(array.view(np.uint8).reshape(-1)):08x}"
  return out
