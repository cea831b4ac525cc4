"""Compilation: each program of a run compiles once however often it runs; the persistent cache is opt-in."""
import ast
import glob
import os

import pytest

from snapjax import evaluation, training

import helpers
from helpers import tiny_config
from test_dispatch import _Compiles

pytestmark = pytest.mark.devices(4)  # In-process runs use conftest's 4 CPU devices.


def _snapjax_programs(compiles) -> dict[str, int]:
  """The compilations of functions defined in snapjax's sources (not JAX's eager per-shape ops: jit(slice), ...)."""
  ours = set()
  for path in glob.glob(os.path.join(helpers.ROOT, "snapjax", "**", "*.py"), recursive=True):
    ours.update(n.name for n in ast.walk(ast.parse(open(path).read())) if isinstance(n, ast.FunctionDef))
  return {name: n for name, n in compiles.count.items() if name.removeprefix("jit(").removesuffix(")") in ours}


def _compiled_twice(compiles) -> dict[str, int]:
  programs = _snapjax_programs(compiles)
  assert len(programs) >= 2, compiles.count  # The run's own programs are seen (the check is not vacuous).
  return {name: n for name, n in programs.items() if n > 1}


def test_train_step_and_evaluator_compile_once_per_run(tiny_data, tmp_path):
  """Two snapshots scored while training, then eval.py's logic: no program compiles twice, however often it runs.

  The step (one program for every dispatch length), its data order, the initialiser and the evaluator run many
  times; each is one XLA compilation. A resumed run (here: a finished one) compiles no initialiser.
  """
  workdir = str(tmp_path / "run")
  with _Compiles() as compiles:
    result = training.train_and_evaluate(tiny_config(tiny_data), workdir)
  assert len(result.snapshot_scores) == 2 and not _compiled_twice(compiles), compiles.count
  # The step: one program for every dispatch (train_steps: K > 1, the default; train_step: K = 1).
  assert compiles.count["jit(train_steps)"] + compiles.count["jit(train_step)"] == 1, compiles.count
  assert compiles.count["jit(init_state)"] == 1, compiles.count  # snapjax.train_step.init_state.
  with _Compiles() as compiles:  # Resuming (here: a finished run) compiles no initialiser.
    assert training.train_and_evaluate(tiny_config(tiny_data), workdir).step == 64
  assert not compiles.count["jit(init_state)"], compiles.count
  with _Compiles() as compiles:
    report = evaluation.evaluate_runs([workdir], plot=False)
  assert len(report["snapshots"]) == 2 and not _compiled_twice(compiles), compiles.count


@pytest.mark.slow
def test_member_run_compiles_its_update_once_and_resumes_without_the_initialiser(tiny_data, tmp_path):
  """A K = 2 member run, several loop steps per dispatch (the one-member default): its update is one program for
  every dispatch length, and its resume (an interrupted run, then the rest) compiles no initialiser."""
  workdir = str(tmp_path / "k2")
  config = tiny_config(tiny_data, num_members=2, member_groups=2, eval_snapshots=False)
  with _Compiles() as compiles:
    first = training.train_and_evaluate(config, workdir, hooks=training.Hooks(stop_at=lambda step: step >= 30))
  assert first.preempted and first.step == 30 and not _compiled_twice(compiles), compiles.count
  assert compiles.count["jit(fused)"] == 1 and compiles.count["jit(init)"] == 1, compiles.count
  with _Compiles() as compiles:
    rest = training.train_and_evaluate(config, workdir)
  assert not rest.preempted and rest.step == 64 and not _compiled_twice(compiles), compiles.count
  assert compiles.count["jit(fused)"] == 1 and not compiles.count["jit(init)"], compiles.count


def _train_py(tiny_data, workdir, *flags):
  """train.py on 2 steps of the tiny config, compile logging on, with no cache unless a flag asks for one."""
  env = {k: v for k, v in helpers.subprocess_env(4, JAX_LOG_COMPILES="1").items()
         if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # Cache every program, however fast this machine is.
  argv = helpers.train_argv("train.py", tiny_data, workdir, {"num_epochs": 0.125, "eval_snapshots": False}, *flags)
  proc = helpers.run_python(argv, env, 300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


@pytest.mark.slow
def test_compilation_cache_dir_is_opt_in_and_a_second_run_loads_the_step(tiny_data, tmp_path):
  cache = tmp_path / "cache" / "jax"
  first = _train_py(tiny_data, str(tmp_path / "a"), f"--compilation_cache_dir={cache}")
  assert "Persistent compilation cache hit for 'jit_train_steps'" not in first
  assert any("train_steps" in name for name in os.listdir(cache)), os.listdir(cache)
  second = _train_py(tiny_data, str(tmp_path / "b"), f"--compilation_cache_dir={cache}")
  assert "Persistent compilation cache hit for 'jit_train_steps'" in second, second[-3000:]
  # Without the flag (and without JAX_COMPILATION_CACHE_DIR) nothing is read or written.
  third = _train_py(tiny_data, str(tmp_path / "c"))
  assert "Persistent compilation cache" not in third and "Finished XLA compilation of jit(train_steps)" in third


def test_compilation_cache_dir_that_cannot_be_made_is_one_line(tiny_data, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  argv = helpers.train_argv("train.py", tiny_data, str(tmp_path / "run"), None,
                            f"--compilation_cache_dir={blocker}/cache")
  proc = helpers.run_python(argv, helpers.subprocess_env(4), 300)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and lines[-1].startswith(f"error: --compilation_cache_dir={blocker}/cache: cannot create"), \
      proc.stderr[-2000:]
  assert not (tmp_path / "run").exists()
