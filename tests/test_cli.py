"""Bad input to train.py and eval.py: one `error:` line, exit code 2, no compilation, nothing in the workdir changed."""
import glob
import hashlib
import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

import helpers

pytestmark = pytest.mark.devices(4)  # In-process runs and references use conftest's 4 CPU devices.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join("tests", "configs", "tiny.py")
# What JAX 0.10.2 logs for every program it compiles (or fetches from the cache) under JAX_LOG_COMPILES=1.
COMPILE_MARKERS = ("Compiling ", "Finished XLA compilation")
TIMEOUT = 180  # Seconds; a run that hangs (e.g. on a network call) fails the test instead of blocking CI.


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
  """Run train.py / eval.py in a subprocess (killed at TIMEOUT), with compile logging on."""
  return helpers.run_python([script, *args], env=helpers.subprocess_env(4, JAX_LOG_COMPILES="1"), timeout=TIMEOUT)


def _assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
  """Exit code 2, a last stderr line `error: ...` naming every needle, no traceback, nothing compiled."""
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  print(f"exit code {proc.returncode}: {lines[-1] if lines else '<no stderr>'}")  # Shown by pytest -rP.
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[-1], (needle, lines[-1])
  compiled = [l for l in lines if any(m in l for m in COMPILE_MARKERS)]
  assert not compiled, compiled[:3]
  return lines[-1]


def _tree_hashes(directory: str) -> dict[str, str]:
  """sha256 of every file under directory, keyed by relative path."""
  out = {}
  for dirpath, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _array_file(workdir: str, step: int) -> str:
  """The largest array-data file orbax (OCDBT over zarr) wrote for a snapshot: variables/**/d/<hash>."""
  files = [p for p in glob.glob(os.path.join(workdir, "snapshots", str(step), "variables", "**", "d", "*"),
                                recursive=True) if os.path.isfile(p)]
  assert files, f"no OCDBT data files under {workdir}/snapshots/{step}/variables"
  return max(files, key=os.path.getsize)


def _overwrite_one_value(workdir: str, step: int) -> None:
  """Rewrite the snapshot's array files with one value changed, through orbax: readable, only checksums differ."""
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "snapshots", str(step), "variables")
  with ocp.StandardCheckpointer() as ckptr:
    tree = jax.tree.map(np.array, ckptr.restore(path))
    leaf = max(jax.tree.leaves(tree), key=np.size)
    leaf.reshape(-1)[leaf.size // 2] += 1.0
    shutil.rmtree(path)
    ckptr.save(path, tree)
    ckptr.wait_until_finished()


@pytest.fixture(scope="module")
def trained(tiny_run):
  """The default tiny run, shared by the session: read-only (run_copy gives a private copy)."""
  return tiny_run()[0]


@pytest.fixture
def run_copy(trained, tmp_path):
  """A private copy of the trained run and the hashes of its files."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir, _tree_hashes(workdir)


# ---------------------------------------------------------------------------------------------- config

_CONFIG_CASES = [
    (["--config.model=foo"], ["model='foo'", "allowed:", "resnet8", "resnet110", "densenet40"]),
    (["--config.dataset=foo"], ["dataset='foo'", "allowed:", "cifar10", "fashion_mnist", "tiny_imagenet"]),
    (["--config.num_cycles=0"], ["num_cycles", ">= 1", "got 0"]),
    # 512 examples / batch 32 = 16 steps per epoch, 4 epochs: 64 updates.
    (["--config.num_cycles=65"], ["num_cycles=65", "64 updates", "allowed: 1..64"]),
    (["--config.init_lr=0"], ["init_lr", "> 0", "got 0.0"]),
    (["--config.init_lr=-0.1"], ["init_lr", "> 0", "got -0.1"]),
    (["--config.num_epochs=0"], ["num_epochs", "> 0", "got 0.0"]),
    (["--config.num_epochs=-1"], ["num_epochs", "> 0", "got -1.0"]),
    (["--config.batch_size=0"], ["batch_size", ">= 1", "got 0"]),
    (["--config.batch_size=-32"], ["batch_size", ">= 1", "got -32"]),
    (["--config.batch_size=30"], ["batch_size=30", "device count 4", "multiple of 4"]),
    (["--config.foo=1"], ["--config.foo", "unknown config field 'foo'", "known fields:", "num_cycles"]),
    (["--config.num_cycles=abc"], ["--config.num_cycles=abc", "expected an integer"]),
    (["--config.init_lr=fast"], ["--config.init_lr=fast", "expected a number"]),
    (["--config.nesterov=maybe"], ["--config.nesterov=maybe", "expected true or false"]),
    (["--config.schedule=linear"], ["schedule='linear'", "cosine_cycles", "step"]),
    (["--config.smoothout_a=-0.01"], ["smoothout_a", ">= 0", "got -0.01"]),
    (["--config.smoothout_noise=gauss"], ["smoothout_noise='gauss'", "allowed:", "uniform, weight, filter"]),
    (["--config.smoothout_schedule=cos"], ["smoothout_schedule='cos'", "allowed:", "constant, anneal, tanh"]),
    (["--config.smoothout_chunks=0"], ["smoothout_chunks", ">= 1", "got 0"]),
    # Batch 32 over 4 devices: 8 examples per device, which 3 chunks do not divide (checked only while a > 0).
    (["--config.smoothout_chunks=3", "--config.smoothout_a=0.01"],
     ["smoothout_chunks=3", "per-device batch 8", "divisor of 8"]),
    (["--config.smoothout_anneal_index=-1"], ["smoothout_anneal_index", ">= 0", "got -1.0"]),
    (["--config.smoothout_tanh_scale=inf"], ["smoothout_tanh_scale", "finite", "got inf"]),
    (["unexpected"], ["unexpected arguments", "--config.<field>=<value>"]),
]


@pytest.mark.parametrize("overrides,needles", _CONFIG_CASES, ids=[c[0][0] for c in _CONFIG_CASES])
def test_bad_config_field(overrides, needles, tiny_data, tmp_path):
  workdir = tmp_path / "new_run"
  proc = _run("train.py", "--config", TINY, f"--config.fashion_mnist_dir={tiny_data}", "--workdir", str(workdir),
              *overrides)
  _assert_usage_error(proc, *needles)
  assert not workdir.exists()  # Nothing was written.


def _config_file(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("case", ["missing", "no_get_config", "syntax_error", "raises", "no_config", "no_workdir"])
def test_bad_config_file_or_missing_flag(case, tmp_path):
  workdir = str(tmp_path / "new_run")
  args, needles = {
      "missing": (["--config", str(tmp_path / "nope.py"), "--workdir", workdir],
                  [f"--config={tmp_path / 'nope.py'}", "no such config file", "configs/quickstart.py"]),
      "no_get_config": (["--config", _config_file(tmp_path, "c.py", "x = 1\n"), "--workdir", workdir],
                        ["c.py", "does not define get_config()", "ml_collections.ConfigDict"]),
      "syntax_error": (["--config", _config_file(tmp_path, "s.py", "def get_config(:\n"), "--workdir", workdir],
                       ["s.py", "syntax error at line 1"]),
      "raises": (["--config", _config_file(tmp_path, "r.py", "def get_config():\n  return 1 / 0\n"),
                  "--workdir", workdir], ["r.py", "ZeroDivisionError"]),
      "no_config": (["--workdir", workdir], ["--config is required"]),
      "no_workdir": (["--config", TINY], ["--workdir is required"]),
  }[case]
  _assert_usage_error(_run("train.py", *args), *needles)
  assert not os.path.exists(workdir)


# ---------------------------------------------------------------------------------------------- workdir

def test_workdir_of_another_config_is_refused(run_copy, tiny_data):
  workdir, before = run_copy
  proc = _run("train.py", "--config", TINY, f"--config.fashion_mnist_dir={tiny_data}", "--workdir", workdir,
              "--config.init_lr=0.05")
  _assert_usage_error(proc, "different config", "init_lr: 0.1 -> 0.05", "--fresh", workdir)
  assert _tree_hashes(workdir) == before


def test_fresh_with_bad_data_moves_nothing(run_copy, tmp_path):
  workdir, before = run_copy
  missing = str(tmp_path / "no_data")
  proc = _run("train.py", "--config", TINY, f"--config.fashion_mnist_dir={missing}", "--workdir", workdir,
              "--config.init_lr=0.05", "--fresh")
  _assert_usage_error(proc, "Fashion-MNIST", missing)
  assert _tree_hashes(workdir) == before  # The old run was not moved aside for a run that cannot start.


@pytest.mark.slow
def test_fresh_moves_the_old_run_aside_and_trains(run_copy, tiny_data):
  workdir, before = run_copy
  proc = _run("train.py", "--config", TINY, f"--config.fashion_mnist_dir={tiny_data}", "--workdir", workdir,
              "--config.num_epochs=1", "--fresh")
  assert proc.returncode == 0, proc.stderr[-3000:]
  moved = glob.glob(os.path.join(workdir, "previous-*"))
  assert len(moved) == 1
  # Every file of the old run, byte for byte, now under previous-<time>/.
  assert _tree_hashes(moved[0]) == before
  assert os.path.isdir(os.path.join(moved[0], "snapshots", "32")) and os.path.isdir(
      os.path.join(moved[0], "snapshots", "64"))
  # The new run: 1 epoch = 16 steps, 2 cycles, snapshots at 8 and 16, and its own config.json.
  assert sorted(os.listdir(os.path.join(workdir, "snapshots"))) == ["16", "8"]
  assert json.load(open(os.path.join(workdir, "config.json")))["num_epochs"] == 1.0


# ---------------------------------------------------------------------------------------------- data

def test_missing_fashion_mnist_dir(run_copy, tmp_path):
  workdir, before = run_copy
  missing = str(tmp_path / "no_data")
  proc = _run("train.py", "--config", TINY, f"--config.fashion_mnist_dir={missing}", "--workdir", workdir)
  _assert_usage_error(proc, missing, "train-images-idx3-ubyte", "apt-get install dataset-fashion-mnist",
                      "--config.fashion_mnist_dir=DIR")
  assert _tree_hashes(workdir) == before
  proc = _run("eval.py", "--workdir", workdir, f"--fashion_mnist_dir={missing}")
  _assert_usage_error(proc, missing, "t10k-images-idx3-ubyte", "--fashion_mnist_dir=DIR")
  assert _tree_hashes(workdir) == before


@pytest.mark.parametrize("damage", ["truncated", "removed"])
def test_damaged_fashion_mnist_file(damage, run_copy, tiny_data, tmp_path):
  workdir, before = run_copy
  data_dir = str(tmp_path / "data")
  shutil.copytree(tiny_data, data_dir)
  path = os.path.join(data_dir, "train-images-idx3-ubyte.gz")
  if damage == "truncated":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  else:
    os.remove(path)
  proc = _run("train.py", "--config", TINY, f"--config.fashion_mnist_dir={data_dir}", "--workdir", workdir)
  needles = {"truncated": [path, "truncated"], "removed": ["not found", path, "apt-get install"]}[damage]
  _assert_usage_error(proc, *needles)
  assert _tree_hashes(workdir) == before


@pytest.mark.parametrize("dataset,model", [("cifar10", "resnet8"), ("imagenet2012", "resnet50")])
def test_tfds_dataset_not_prepared_offline(dataset, model, tmp_path):
  empty = tmp_path / "tfds"
  empty.mkdir()
  workdir = tmp_path / "new_run"
  proc = _run("train.py", "--config", TINY, f"--config.dataset={dataset}", f"--config.model={model}",
              f"--config.data_dir={empty}", "--workdir", str(workdir))
  _assert_usage_error(proc, dataset, "not prepared", str(empty), f"tfds build {dataset}")
  assert not workdir.exists()
  assert os.listdir(empty) == []


# ---------------------------------------------------------------------------------------------- eval.py

def test_eval_compiles_on_good_input(run_copy):
  """Control for the no-compilation checks: the compile log shows up when eval.py does run."""
  workdir, _ = run_copy
  proc = _run("eval.py", "--workdir", workdir, "--last_m=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert any(m in proc.stderr for m in COMPILE_MARKERS)
  assert os.path.exists(os.path.join(workdir, "eval", "report.json"))


def test_eval_not_a_run(tmp_path):
  missing = str(tmp_path / "nowhere")
  _assert_usage_error(_run("eval.py", "--workdir", missing), "not a snapjax run", f"{missing}/config.json",
                      "train.py")
  (tmp_path / "empty").mkdir()
  _assert_usage_error(_run("eval.py", "--workdir", str(tmp_path / "empty")), "not a snapjax run")
  assert os.listdir(tmp_path / "empty") == []


@pytest.mark.parametrize("layout", ["no_snapshot_dir", "empty_snapshot_dir"])
def test_eval_run_without_snapshots(layout, trained, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  shutil.copy(os.path.join(trained, "config.json"), workdir)
  if layout == "empty_snapshot_dir":
    (workdir / "snapshots").mkdir()
  before = _tree_hashes(str(workdir))
  _assert_usage_error(_run("eval.py", "--workdir", str(workdir)), "no snapshots", str(workdir), "train first")
  assert _tree_hashes(str(workdir)) == before


@pytest.mark.parametrize("damage,step,reason", [
    ("truncated", 32, "is corrupt or truncated"),  # TensorStore cannot read it.
    ("overwritten", 64, "differ from the checksums recorded when it was saved"),  # Readable: only checksums tell.
])
def test_eval_corrupt_snapshot(damage, step, reason, run_copy):
  workdir, _ = run_copy
  if damage == "truncated":
    path = _array_file(workdir, step)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)
  else:  # Flipping raw bytes of the zstd-compressed files sometimes made them unreadable instead.
    _overwrite_one_value(workdir, step)
  before = _tree_hashes(workdir)
  line = _assert_usage_error(_run("eval.py", "--workdir", workdir), f"snapshot at step {step}",
                             os.path.join(workdir, "snapshots", str(step)), reason)
  assert len(line) < 600
  assert _tree_hashes(workdir) == before  # No eval/ report written.


@pytest.mark.parametrize("field,value,shown", [("model", "resnet20", "model: 'resnet8' vs 'resnet20'"),
                                               ("dataset", "cifar100",
                                                "dataset: 'fashion_mnist' vs 'cifar100' (10 vs 100 classes)")])
def test_eval_incompatible_runs(field, value, shown, run_copy, trained, tmp_path):
  workdir, before = run_copy
  other = str(tmp_path / "other")
  shutil.copytree(trained, other)
  path = os.path.join(other, "config.json")
  saved = json.load(open(path))
  saved[field] = value
  json.dump(saved, open(path, "w"))
  proc = _run("eval.py", "--workdir", workdir, "--workdir", other)
  _assert_usage_error(proc, "cannot be ensembled", workdir, other, shown)
  assert _tree_hashes(workdir) == before


@pytest.mark.parametrize("flags,needles", [
    (["--last_m=0"], ["last_m=0", "allowed: 1..2"]),
    (["--last_m=3"], ["last_m=3", "allowed: 1..2"]),
    (["--last_m=x"], ["--last_m=x", "expected an integer"]),
    (["--eval_batch_size=0"], ["eval_batch_size=0", ">= 1"]),
    (["extra"], ["unexpected arguments"]),
], ids=["last_m=0", "last_m=3", "last_m=x", "eval_batch_size=0", "extra"])
def test_eval_bad_flags(flags, needles, run_copy):
  workdir, before = run_copy
  _assert_usage_error(_run("eval.py", "--workdir", workdir, *flags), *needles)
  assert _tree_hashes(workdir) == before


def test_eval_last_m_counts_snapshots_of_every_run(run_copy, trained, tmp_path):
  workdir, before = run_copy
  other = str(tmp_path / "other")
  shutil.copytree(trained, other)
  # Two runs of two snapshots each: 4 snapshots, so 5 is one too many.
  proc = _run("eval.py", "--workdir", workdir, "--workdir", other, "--last_m=5")
  _assert_usage_error(proc, "last_m=5", "allowed: 1..4")
  assert _tree_hashes(workdir) == before


@pytest.mark.parametrize("flags,needles", [
    (["--analyses=foo"], ["--analyses", "unknown analysis 'foo'", "allowed: weight_average, interpolation"]),
    (["--analyses=interpolation,calibration"], ["unknown analysis 'calibration'", "always in the report"]),
    (["--analyses=weight_average", "--bn_batches=-1"], ["--bn_batches=-1", "integer >= 0", "one epoch"]),
    (["--analyses=interpolation", "--interpolation_points=1"], ["--interpolation_points=1", "integer >= 2"]),
    (["--bn_batches=few"], ["--bn_batches=few", "expected an integer"]),
], ids=["unknown", "calibration", "bn_batches=-1", "interpolation_points=1", "bn_batches=few"])
def test_eval_bad_analyses(flags, needles, run_copy):
  workdir, before = run_copy
  _assert_usage_error(_run("eval.py", "--workdir", workdir, *flags), *needles)
  assert _tree_hashes(workdir) == before


def test_eval_analyses_write_their_figures_and_log_progress(run_copy):
  workdir, _ = run_copy
  proc = _run("eval.py", "--workdir", workdir, "--analyses=weight_average,interpolation", "--bn_batches=2",
              "--interpolation_points=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout.splitlines()
  assert out[0].startswith("best single snapshot error")  # report.summary's line stays first.
  assert out[1].startswith("weight average of the last 2 snapshots error")
  assert out[2].startswith("interpolation to the last snapshot")
  assert "2/2 batches (100%)" in proc.stderr and "ETA" in proc.stderr
  for name in ("reliability.png", "diversity.png", "interpolation.png"):
    assert os.path.getsize(os.path.join(workdir, "eval", name)) > 0
  report = json.load(open(os.path.join(workdir, "eval", "report.json")))
  assert len(report["interpolation"][0]["lambdas"]) == 3 and report["bn_recompute"]["batches"] == 2
