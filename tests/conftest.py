"""Test set-up: 4 fake CPU devices and strict rank promotion, set before JAX starts."""
import os

from helpers import DEVICE_COUNT_FLAG, xla_flags

NUM_DEVICES = 4
# The tests' programs are tiny (milliseconds to run) and XLA:CPU's LLVM optimisation is most of their compile time:
# the suite compiles at backend optimisation level 1 instead of XLA's default 2. One default tiny run in a fresh
# process (tests/helpers.py tiny_config, 4 fake devices, beside a 2-process load): 25.4 s of CPU with a cold
# compilation cache at the default level, 19.7 s at level 1, 18.4 s at level 0; warm, 6.7 s at the default and at
# level 1, 8.4 s at level 0 (slower code). Each test compares programs built the same way, so what it checks is
# unchanged; SNAPJAX_TEST_FULL_OPT=1 compiles at XLA's default level, as users' runs do.
FAST_COMPILE_FLAGS = () if os.environ.get("SNAPJAX_TEST_FULL_OPT") == "1" else ("--xla_backend_optimization_level=1",)
# Added to whatever XLA_FLAGS already holds (a device-count flag there is replaced), so a user's own XLA flags
# (--xla_cpu_enable_fast_math=false, --xla_cpu_max_isa=AVX2, an optimisation level of their own...) still apply.
os.environ["XLA_FLAGS"] = xla_flags(NUM_DEVICES, extra=[
    f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import gc  # noqa: E402

import jax  # noqa: E402

# Tracing allocates many short-lived objects; with the default thresholds a test process with a large heap (hundreds
# of tests' programs) spends seconds in full collections. Collect young objects less often.
gc.set_threshold(50_000, 20, 20)

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_platforms", "cpu")
# Many tests train the same tiny programs: a persistent compilation cache shared by the xdist workers and the
# subprocesses (helpers.subprocess_env) turns the repeated compilations into cache hits. Every program is cached,
# however fast it compiled: a fresh process's tiny run compiles ~80 programs, most in 0.1-1 s, which cost it ~4 s
# of its ~15 s when only programs over 1 s were kept.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("SNAPJAX_TEST_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                                        "snapjax-test-jax-cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


import pytest  # noqa: E402


# Seconds each file took in one `pytest -n 2 --dist loadfile` run from a cold compilation cache (the sum of its
# --durations, on the 2-core machine). xdist hands whole files to the workers in collection order; longest first, so
# that the last file a worker starts is a short one and the two workers end together. Files not listed (new ones)
# count as FILE_SECONDS_DEFAULT. Re-measure with --durations=0 when the order drifts.
FILE_SECONDS = {
    "test_study.py": 257, "test_members.py": 214, "test_distill.py": 206, "test_faults.py": 163,
    "test_multihost.py": 126, "test_methods_cli.py": 119, "test_averaging.py": 119,
    "test_accelerator_benchmark.py": 112, "test_eval_uncertainty.py": 94, "test_cli.py": 86, "test_conv.py": 79,
    "test_training.py": 78, "test_members_multihost.py": 77, "test_compilation.py": 64, "test_cli_workdir.py": 60,
    "test_utilisation.py": 52, "test_smoothout.py": 48, "test_eval_analyses.py": 46, "test_dispatch.py": 43,
    "test_export.py": 41, "test_models.py": 39, "test_single_cycle.py": 34, "test_ensemble.py": 32,
    "test_serving_benchmark.py": 27, "test_weight_space.py": 22, "test_examples.py": 20, "test_configs.py": 20,
    "test_lowering.py": 17, "test_analysis.py": 15, "test_data.py": 14, "test_docstrings.py": 10, "test_swag.py": 8,
    "test_workdir_lock.py": 5, "test_checkpoints.py": 5,
}
FILE_SECONDS_DEFAULT = 5


def pytest_configure(config):
  config.addinivalue_line("markers", "devices(n): the test needs n CPU devices in this process (conftest sets 4)")
  if hasattr(config.option, "loadscopereorder"):  # xdist would reorder files by test count: keep the order below.
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  """Files longest first (FILE_SECONDS); the tests of a file keep their order."""
  order = {}
  for i, item in enumerate(items):
    order.setdefault(item.path.name, i)
  items.sort(key=lambda item: (-FILE_SECONDS.get(item.path.name, FILE_SECONDS_DEFAULT), order[item.path.name]))


def pytest_runtest_setup(item):
  """A test marked devices(n) fails at once, saying why, where this process has fewer devices."""
  marker = item.get_closest_marker("devices")
  if marker is None:
    return
  need, have = marker.args[0], jax.device_count()
  if have < need:
    pytest.fail(f"this test needs {need} CPU devices but JAX has {have}: conftest sets "
                f"{DEVICE_COUNT_FLAG}={NUM_DEVICES} in XLA_FLAGS before JAX starts, so JAX was started earlier "
                f"or by another flag (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})", pytrace=False)


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory):
  """A directory shared by every process of this test session (all xdist workers), for what is made once."""
  base = tmp_path_factory.getbasetemp()
  root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
  root.mkdir(exist_ok=True)
  return root


def once(root, name: str, build) -> str:
  """root/name, made by build(path) by the first process of the session that asks; the others wait for it.

  An exclusive file lock serialises the makers; a marker file says the build finished (a failed build leaves none,
  so the next process to ask builds again and fails the same way, in its own test).
  """
  import fcntl
  import shutil
  path, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)
      build(str(path))
      done.touch()
  return str(path)


@pytest.fixture(scope="session")
def tiny_data(shared_tmp):
  """A tiny learnable Fashion-MNIST in raw IDX files (tests/helpers.py), made once per test session. Read-only."""
  from helpers import make_tiny_fashion_mnist
  return once(shared_tmp, "fmnist", make_tiny_fashion_mnist)


@pytest.fixture(scope="session")
def tiny_run(shared_tmp, tiny_data):
  """tiny_run(**overrides): (workdir, TrainResult as a dict) of training.train_and_evaluate on
  tiny_config(tiny_data, **overrides), trained once per test session whichever test file asks first. Read-only:
  copy the workdir to change it (or to evaluate it into its own eval/ directory)."""
  import hashlib
  import json

  def get(**overrides):
    from helpers import tiny_config
    from snapjax import training
    key = json.dumps(overrides, sort_keys=True)
    name = "run-" + hashlib.sha256(key.encode()).hexdigest()[:12]

    def build(path):
      result = training.train_and_evaluate(tiny_config(tiny_data, **overrides), os.path.join(path, "run"))
      with open(os.path.join(path, "result.json"), "w") as f:
        json.dump(result.to_dict(), f)

    path = once(shared_tmp, name, build)
    with open(os.path.join(path, "result.json")) as f:
      return os.path.join(path, "run"), json.load(f)

  return get
