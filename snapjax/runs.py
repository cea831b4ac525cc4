"""The snapshots of finished runs read back: each run's config, its members and every snapshot, checksums checked.

eval.py (snapjax/evaluation.py) scores them; method="distill" (snapjax/distill.py) makes its teacher of them.
"""
import dataclasses
import os
from typing import Any

import jax
import ml_collections

from snapjax import checkpoints, experiment
from snapjax import config as config_lib, workdir as workdir_lib
from snapjax.errors import CheckpointError


@dataclasses.dataclass
class Member:
  """One snapshot: its run, step, ensemble member (k of a K-member run, seed = the run's seed + k) and variables."""
  workdir: str
  step: int
  variables: Any
  member: int = 0
  seed: int | None = None


def num_members(workdir: str) -> int:
  """K of a run: its snapshots hold K members stacked on a leading axis when K > 1 (1 for older runs)."""
  saved = workdir_lib.read_config(workdir) or {}
  return int(saved.get("num_members", 1))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with; CheckpointError if it is not a snapjax run."""
  workdir_lib.check_path(workdir)
  saved = workdir_lib.read_config(workdir)
  if saved is None:
    raise CheckpointError(f"{workdir!r} is not a snapjax run: {os.path.join(workdir, workdir_lib.CONFIG_FILE)} "
                          f"does not exist; pass the --workdir of a train.py run")
  return ml_collections.ConfigDict(saved)


def check_compatible(configs: list[ml_collections.ConfigDict], workdirs: list[str]) -> None:
  """All runs share the architecture and the dataset (class count), or a one-line CheckpointError."""
  from snapjax import data
  for cfg, wd in zip(configs[1:], workdirs[1:]):
    diff = config_lib.ensemble_differences(configs[0], cfg)
    if diff:
      shown = ", ".join(f"{k}: {configs[0].get(k)!r} vs {cfg.get(k)!r}" for k in diff)
      if "dataset" in diff:
        classes = [data.DATASETS[c.dataset].num_classes if c.dataset in data.DATASETS else "?"
                   for c in (configs[0], cfg)]
        shown += f" ({classes[0]} vs {classes[1]} classes)"
      raise CheckpointError(f"runs {workdirs[0]!r} and {wd!r} cannot be ensembled together ({shown})")


def stacked_abstract(abstract: Any, k: int) -> Any:
  """Restore targets of K members stacked on a leading axis (a K-member run's snapshot)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct((k, *a.shape), a.dtype, sharding=a.sharding), abstract)


def restore_members(workdirs: list[str], exp: experiment.Experiment) -> list[Member]:
  """Every snapshot of every run, in the order given and, within a run, in training order (members of one step
  in member order): a K-member run's snapshot at a step gives K Members."""
  abstract = exp.abstract_variables()
  members = []
  for wd in workdirs:
    k = num_members(wd)
    seed = (workdir_lib.read_config(wd) or {}).get("seed")
    ckpt = checkpoints.RunCheckpoints(wd, read_only=True)
    try:
      steps = ckpt.snapshot_steps()
      if not steps:
        raise CheckpointError(f"no snapshots in workdir {wd!r} ({os.path.join(wd, checkpoints.SNAPSHOT_DIR)} "
                              f"is empty): train first")
      for step in steps:
        if k == 1:
          variables, _ = ckpt.restore_snapshot(step, abstract)
          members.append(Member(wd, step, variables, 0, seed))
          continue
        stacked, _ = ckpt.restore_snapshot(step, stacked_abstract(abstract, k))
        for i in range(k):
          members.append(Member(wd, step, jax.tree.map(lambda a, i=i: a[i], stacked), i,
                                None if seed is None else seed + i))
    finally:
      ckpt.close()
  return members


def member_groups(members: list[Member]) -> tuple[list[tuple[str, int, int | None]], list[list[int]], list[int]]:
  """((workdir, member, seed) of each ensemble member, its snapshots' indices, the final snapshot of each)."""
  keys, groups = [], {}
  for i, m in enumerate(members):
    key = (m.workdir, m.member, m.seed)
    if key not in groups:
      keys.append(key)
      groups[key] = []
    groups[key].append(i)
  return keys, [groups[k] for k in keys], [groups[k][-1] for k in keys]
