"""Running the study's plan: one step at a time, or up to --jobs N side by side, and the state file.

A step runs as its own command (`python train.py ...` / `python eval.py ...` / `python -m snapjax.study.serving ...`
in a subprocess, its output appended to train.log / eval.log / serve.log in its workdir or report directory) or, with --in_process, as the same library call in this
process. OUT/study_state.json keeps each finished step's wall time and each invocation's, across invocations.
SIGTERM/SIGINT stop after the running steps (a train.py run saves its state); re-running resumes.
"""
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np

from snapjax.study import plan, records as records_lib, serving
from snapjax.study.stats import duration

STATE_FILE = "study_state.json"


def log(message: str) -> None:
  """A progress line: [study HH:MM:SS] message."""
  print(f"[study {datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def now() -> str:
  """The local time, ISO 8601 to the second."""
  return datetime.datetime.now().isoformat(timespec="seconds")


def _load() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def read_state(out: str) -> dict[str, Any]:
  """OUT/study_state.json: {"steps": {key: {"seconds", "finished", "command"}}, "invocations": [...]} (empty
  when the study has not run yet)."""
  path = os.path.join(out, STATE_FILE)
  if not os.path.exists(path):
    return {"steps": {}, "invocations": []}
  with open(path) as f:
    return json.load(f)


class State:
  """OUT/study_state.json: each finished step's wall time and each invocation's, kept across invocations."""

  def __init__(self, out: str):
    self.path = os.path.join(out, STATE_FILE)
    self.data = read_state(out)
    self.invocation = {"started": now(), "seconds": 0.0, "ran": [], "load_average": _load()}
    self.data["invocations"].append(self.invocation)
    self._t0 = time.monotonic()

  def finished(self, key: str, seconds: float, argv: list[str]) -> None:
    self.data["steps"][key] = {"seconds": seconds, "finished": now(), "command": shlex.join(argv)}
    self.invocation["ran"].append(key)
    self.save()

  def save(self) -> None:
    self.invocation["seconds"] = time.monotonic() - self._t0
    self.invocation["ended"] = now()
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=2)
    os.replace(tmp, self.path)

  def wall_seconds(self) -> float:
    return sum(i["seconds"] for i in self.data["invocations"])


class Runner:
  """Runs one step: a subprocess of train.py / eval.py (default) or the same call in this process."""

  def __init__(self, in_process: bool, out: str, records: str | None = None):
    self.in_process, self.out, self.records = in_process, out, records
    self.children: list[subprocess.Popen] = []  # Running subprocesses (several with --jobs).
    self.stop_requested = False

  def run(self, step: dict[str, Any]) -> str:
    """'ok', 'preempted' or 'failed: ...'."""
    return self._in_process(step) if self.in_process else self._subprocess(step)

  def _subprocess(self, step: dict[str, Any]) -> str:
    child = self.start(step)
    child.wait()
    return self.outcome(step, child)

  def start(self, step: dict[str, Any]) -> subprocess.Popen:
    """Starts the step's train.py / eval.py subprocess, its output appended to the workdir's (or out_dir's) log."""
    log_dir = step["workdir"] if step["kind"] == "train" else step["out_dir"]
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{step['kind']}.log")
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(os.path.join(self.out, ".jax_cache")))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = [sys.executable, *step["argv"][1:]]
    with open(log_path, "a") as f:
      f.write(f"\n# {now()} {shlex.join(step['argv'])}\n")
      f.flush()
      child = subprocess.Popen(argv, cwd=plan.ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    child.log_path = log_path
    self.children.append(child)
    return child

  def outcome(self, step: dict[str, Any], child: subprocess.Popen) -> str:
    """'ok', 'preempted' or 'failed: ...' of a finished subprocess."""
    self.children.remove(child)
    if child.returncode != 0:
      with open(child.log_path) as f:
        tail = [l for l in f.read().splitlines() if l.strip()][-1:]
      return f"failed: exit code {child.returncode} ({tail[0] if tail else ''}); log {child.log_path}"
    if step["kind"] == "train" and plan.status(step) != "done":
      return "preempted"
    return "ok"

  def _in_process(self, step: dict[str, Any]) -> str:
    from snapjax import evaluation, training
    from snapjax.errors import UserError
    cwd = os.getcwd()
    try:
      os.chdir(plan.ROOT)  # Where the subprocesses run: a relative teacher workdir is relative to it.
      if step["kind"] == "train":
        result = training.train_and_evaluate(step["config"], step["workdir"])
        return "preempted" if result.preempted else "ok"
      if step["kind"] == "serve":
        serving.measure(step["workdir"], step["out_file"])
        return "ok"
      evaluation.evaluate_runs(step["workdirs"], out_dir=step["out_dir"], analyses=step["analyses"] or None,
                               **step["options"])
      return "ok"
    except (UserError, training.TrainingDiverged) as e:
      return f"failed: {' '.join(str(e).split())}"
    finally:
      os.chdir(cwd)

  def terminate(self, signum, frame) -> None:
    """SIGTERM/SIGINT: pass it to the running train.py processes (which save their state) and stop after them."""
    del frame
    self.stop_requested = True
    for child in self.children:
      if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    log(f"signal {signum}: stopping after the current run(s); re-run the same command to resume")


def run_study(out: str, steps: list[dict[str, Any]], *, jobs: int = 1, in_process: bool = False,
              records: str | None = None) -> int:
  """Runs every step not done yet, in order; returns the exit code (0: all done, 1: failures, 3: stopped).

  records: a directory of snapjax.study.records (restored into `out` beforehand): each finished step's outputs are
  copied into it, and a step that needs a recorded run's missing arrays fails."""
  os.makedirs(out, exist_ok=True)
  state, runner = State(out), Runner(in_process, out, records)
  state.invocation["jobs"] = jobs
  if not in_process:  # In-process training handles SIGTERM itself (it saves and returns preempted).
    signal.signal(signal.SIGTERM, runner.terminate)
  todo = [s for s in steps if plan.status(s) != "done"]
  log(f"{len(steps)} steps, {len(steps) - len(todo)} done already, {len(todo)} to run "
      f"({sum(s['kind'] == 'train' for s in todo)} training runs)")
  durations = {"train": [], "eval": [], "serve": []}
  for s in steps:
    durations[s["kind"]] += [v["seconds"] for k, v in state.data["steps"].items() if k == s["key"]]
  if jobs > 1:
    return run_parallel(jobs, steps, state, runner, durations)
  return run_sequential(steps, state, runner, durations)


def run_sequential(steps: list[dict[str, Any]], state: State, runner: Runner,
                   durations: dict[str, list[float]]) -> int:
  """run_study one step after the other, in plan order; an evaluation whose runs are not done is skipped."""
  code, failed = 0, []
  for i, step in enumerate(steps):
    st = plan.status(step)
    if st == "done":
      log(f"skip {step['key']}: done")
      continue
    if st == "waiting":
      log(f"skip {step['key']}: its runs are not finished")
      failed.append(step["key"])
      continue
    if _refused(step, failed):
      code = 1
      continue
    remaining = [s for s in steps[i:] if s["kind"] == "train"], [s for s in steps[i:] if s["kind"] == "eval"]
    log(f"run {step['key']} ({'resuming' if st == 'resume' else 'starting'}): {shlex.join(step['argv'])}; "
        f"ETA of the rest {_eta(durations, remaining)}")
    t0 = time.monotonic()
    outcome = runner.run(step)
    result = record(step, time.monotonic() - t0, outcome, runner, state, durations, failed)
    if result == "stopped":
      return 3
    if result == "failed":
      code = 1
  state.save()
  if failed:
    log(f"{len(failed)} step(s) not done: {', '.join(failed)}")
  return code or (1 if failed else 0)


def _refused(step: dict[str, Any], failed: list[str]) -> bool:
  """A step that would read a recorded run's dropped arrays (snapjax.study.records) fails before it starts."""
  gone = records_lib.missing_arrays(step)
  if gone:
    log(f"FAILED {step['key']}: {gone}")
    failed.append(step["key"])
  return bool(gone)


def record(step: dict[str, Any], seconds: float, outcome: str, runner: Runner, state: State,
           durations: dict[str, list[float]], failed: list[str]) -> str:
  """Logs and records a finished step: 'done', 'stopped' (preempted or asked to stop) or 'failed'."""
  if outcome == "ok":
    state.finished(step["key"], seconds, step["argv"])
    if runner.records:
      records_lib.save_step(step, runner.out, runner.records, STATE_FILE)
    durations.setdefault(step["kind"], []).append(seconds)
    log(f"done {step['key']} in {duration(seconds)}")
    return "done"
  state.save()
  if outcome == "preempted" or runner.stop_requested:
    log(f"stopped during {step['key']}: its state is saved; re-run the same command to resume")
    return "stopped"
  failed.append(step["key"])
  log(f"FAILED {step['key']}: {outcome}")
  return "failed"


def run_parallel(jobs: int, steps: list[dict[str, Any]], state: State, runner: Runner,
                 durations: dict[str, list[float]]) -> int:
  """run_study with up to `jobs` subprocesses at once: steps start in plan order as soon as their runs are done.

  On a CPU whose cores one run does not keep busy (a small model: XLA's intra-op threads idle part of each step),
  two runs side by side finish sooner than one after the other; each run's own wall time is then longer.
  """
  started, running, failed = set(), {}, []  # running: Popen -> (step, t0)
  done: set[str] = set()  # Keys known to be done: their reports are not read again at every poll.

  def status(step):
    st = plan.status(step, done)
    if st == "done":
      done.add(step["key"])
    return st

  while True:
    if not runner.stop_requested:
      for step in steps:
        if len(running) >= jobs:
          break
        if step["key"] in started or status(step) in ("done", "waiting"):
          continue
        busy = {s["key"] for s, _ in running.values()}
        if any(n["key"] in busy for n in step.get("needs", [])):
          continue  # A step it needs is still running (its report or last snapshot may already be written).
        if _refused(step, failed):
          started.add(step["key"])
          continue
        remaining = ([s for s in steps if s["kind"] == "train" and s["key"] not in started],
                     [s for s in steps if s["kind"] == "eval" and s["key"] not in started])
        started.add(step["key"])
        log(f"run {step['key']} ({'resuming' if status(step) == 'resume' else 'starting'}; "
            f"{len(running) + 1} running): {shlex.join(step['argv'])}; ETA of the rest "
            f"{_eta(durations, remaining, jobs)}")
        running[runner.start(step)] = (step, time.monotonic())
    if not running:
      break
    time.sleep(1.0)
    for child in [c for c in running if c.poll() is not None]:
      step, t0 = running.pop(child)
      outcome = runner.outcome(step, child)
      if record(step, time.monotonic() - t0, outcome, runner, state, durations, failed) == "done":
        done.add(step["key"])
  state.save()
  if runner.stop_requested:
    return 3
  failed += [s["key"] for s in steps if plan.status(s) != "done" and s["key"] not in failed]
  if failed:
    log(f"{len(failed)} step(s) not done: {', '.join(failed)}")
  return 1 if failed else 0


def _eta(durations: dict[str, list[float]], remaining: tuple[list, list], jobs: int = 1) -> str:
  if not durations["train"]:
    return "known after the first run"
  train = np.mean(durations["train"]) * len(remaining[0])
  evals = (np.mean(durations["eval"]) if durations["eval"] else 0.0) * len(remaining[1])
  return duration((train + evals) / jobs)
