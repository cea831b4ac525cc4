"""The study's records: what a finished step leaves behind, kept in a directory that outlives the machine.

A study of many hours may not finish on one machine or in one sitting, and a workdir under runs/ is gone with its
machine. `--records DIR` (scripts/study.py) copies each step's outputs into DIR as soon as the step is done, in the
same layout as --out: a training run's workdir without its train state (state/, needed only to resume an
unfinished run) and, except for the arms in KEEP_ARRAYS, the run the serving measurement reads and the teachers of
distilled students, with only the metadata of its snapshots (not their arrays);
an evaluation's report (with the figures only where the results page shows them); the serving measurement; and the
state file (each step's wall time). At the start of an invocation whatever --out lacks is copied back from DIR, so
every recorded step counts as done (plan.status reads the same files) and the study goes on from there, on this
machine or another. --out must be the same path there (the reports name their workdirs by absolute path: a checkout
at the same place, such as /work/main/runs/study).

A recorded run without its arrays can still be reported, not evaluated again or taught from: a step that needs one
fails at once, in one line, naming it (`missing_arrays`). The single runs keep theirs (the true and deep ensembles
are evaluated over the single runs of several seeds, which can be trained in different sittings), and so do the
run the serving measurement reads (the study's last step) and each distilled student's teacher (a sitting may end
between the two).
"""
import json
import os
import shutil
from typing import Any

from snapjax import workdir as workdir_lib
from snapjax.study import plan
from snapjax.workdir_lock import LOCK_FILE

KEEP_ARRAYS = ("single",)  # Arms whose recorded runs keep their snapshots' arrays (evaluated again, pooled).
META_ITEM = "meta"  # The item of a snapshot's checkpoint that holds its metadata (snapjax.checkpoints).
# The figures of an evaluation that the results page shows, by arm (the others are left out of the records).
FIGURE_ARMS = {"snapshot": ("error_vs_m.png", "diversity.png")}
MARKER = "RECORD.json"  # In a recorded workdir: {"arrays": bool}.
SKIP_NAMES = {LOCK_FILE, ".jax_cache"}


def _copy_run(src: str, dst: str, keep_arrays: bool) -> None:
  """A workdir src -> dst (created or updated), without the train state, its eval/ (its evaluation's: _copy_report)
  and lock files and, unless keep_arrays, with only the metadata item of each snapshot (no arrays, no SWAG moments)."""

  def ignore(directory: str, names: list[str]) -> set[str]:
    rel = os.path.relpath(directory, src).split(os.sep)
    skip = {n for n in names if n in SKIP_NAMES or n.endswith(".tmp") or "orbax-checkpoint-tmp" in n}
    if rel == ["."]:
      skip |= {workdir_lib.STATE_DIR, workdir_lib.EVAL_DIR}
    if not keep_arrays and len(rel) == 2 and rel[0] == workdir_lib.SNAPSHOT_DIR:
      skip |= {n for n in names if n != META_ITEM and os.path.isdir(os.path.join(directory, n))}
    return skip

  shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)


def _copy_report(src: str, dst: str, arm: str) -> None:
  """An eval report directory src -> dst: the report itself, and only the figures the results page shows (those of
  the Snapshot Ensemble's evaluations: snapjax.study.results' figure run)."""
  figures = FIGURE_ARMS.get(arm, ())

  def ignore(directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n.endswith(".png") and n not in figures}

  shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)


def _relative(out: str, path: str) -> str:
  rel = os.path.relpath(path, out)
  if rel.startswith(os.pardir):
    raise ValueError(f"{path} is not under the study's --out {out}")
  return rel


def save_step(step: dict[str, Any], out: str, records: str, state_file: str) -> None:
  """Copies a finished step's outputs (and the state file) from `out` into `records`."""
  if step["kind"] == "train":
    dst = os.path.join(records, _relative(out, step["workdir"]))
    keep = step["arm"] in KEEP_ARRAYS or bool(step.get("serve_source")) or bool(step.get("distill_teacher"))
    _copy_run(step["workdir"], dst, keep)
    with open(os.path.join(dst, MARKER), "w") as f:
      json.dump({"arrays": keep}, f)
  elif step["kind"] == "eval":
    _copy_report(step["out_dir"], os.path.join(records, _relative(out, step["out_dir"])), step["arm"])
  else:
    dst = os.path.join(records, _relative(out, step["out_file"]))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy2(step["out_file"], dst)
  save_state(out, records, state_file)


def _path(step: dict[str, Any]) -> str:
  return step["workdir"] if step["kind"] == "train" else step["out_dir"] if step["kind"] == "eval" else \
      step["out_file"]


def record_done(out: str, records: str, steps: list[dict[str, Any]], state_file: str) -> list[str]:
  """save_step for every step that is done in `out` and not yet recorded (a study run without --records, or one
  stopped between a step's end and its copy); returns their keys."""
  saved = []
  for step in steps:
    if not os.path.exists(os.path.join(records, _relative(out, _path(step)))) and plan.status(step) == "done":
      save_step(step, out, records, state_file)
      saved.append(step["key"])
  return saved


def save_state(out: str, records: str, state_file: str) -> None:
  src = os.path.join(out, state_file)
  if os.path.exists(src):
    os.makedirs(records, exist_ok=True)
    shutil.copy2(src, os.path.join(records, state_file))


def restore(records: str, out: str, steps: list[dict[str, Any]], state_file: str) -> list[str]:
  """Copies into `out` every recorded step's outputs that `out` lacks; returns the keys restored.

  A path already in `out` (a run this machine has, finished or not) is left as it is. The state file is taken from
  the records when `out` has none, or when the records' has steps that `out`'s lacks (merged: `out`'s entries win).
  """
  restored = []
  for step in steps:
    path = _path(step)
    src = os.path.join(records, _relative(out, path))
    if os.path.exists(path) or not os.path.exists(src):
      continue
    if os.path.isdir(src):
      shutil.copytree(src, path)
    else:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      shutil.copy2(src, path)
    restored.append(step["key"])
  _merge_state(os.path.join(records, state_file), os.path.join(out, state_file))
  return restored


def _merge_state(src: str, dst: str) -> None:
  if not os.path.exists(src):
    return
  with open(src) as f:
    recorded = json.load(f)
  if not os.path.exists(dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy2(src, dst)
    return
  with open(dst) as f:
    here = json.load(f)
  new_steps = {k: v for k, v in recorded["steps"].items() if k not in here["steps"]}
  if not new_steps:
    return
  here["steps"] = {**new_steps, **here["steps"]}
  started = {i["started"] for i in here["invocations"]}
  here["invocations"] = sorted(here["invocations"] + [i for i in recorded["invocations"] if i["started"] not in
                                                      started], key=lambda i: i["started"])
  tmp = dst + ".tmp"
  with open(tmp, "w") as f:
    json.dump(here, f, indent=2)
  os.replace(tmp, dst)


def has_arrays(workdir: str) -> bool:
  """False for a recorded run whose snapshots' arrays were not kept."""
  marker = os.path.join(workdir, MARKER)
  if not os.path.exists(marker):
    return True
  with open(marker) as f:
    return bool(json.load(f).get("arrays"))


def missing_arrays(step: dict[str, Any]) -> str | None:
  """The one-line reason a step cannot run here (a run it reads was recorded without its arrays), or None."""
  reads = [step.get("workdir")] if step["kind"] == "serve" else [n.get("workdir") for n in step.get("needs", [])
                                                                   if n["kind"] == "train"]
  gone = [w for w in reads if w and not has_arrays(w)]
  if not gone:
    return None
  return (f"{step['key']} reads {', '.join(gone)}, finished in an earlier sitting and recorded without its snapshots' "
          f"arrays (snapjax.study.records keeps those of {', '.join(KEEP_ARRAYS)}, the served run and the teachers "
          f"only); delete its recorded workdir to train it again")
