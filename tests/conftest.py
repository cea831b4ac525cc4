"""Test set-up: 4 fake CPU devices and strict rank promotion, set before JAX starts."""
import os

from helpers import DEVICE_COUNT_FLAG, xla_flags

NUM_DEVICES = 4
# Added to whatever XLA_FLAGS already holds (a device-count flag there is replaced), so a user's own XLA flags
# (--xla_cpu_enable_fast_math=false, --xla_cpu_max_isa=AVX2, ...) still apply.
os.environ["XLA_FLAGS"] = xla_flags(NUM_DEVICES)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

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


def pytest_configure(config):
  config.addinivalue_line("markers", "devices(n): the test needs n CPU devices in this process (conftest sets 4)")


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
def tiny_data(tmp_path_factory):
  """A tiny learnable Fashion-MNIST in raw IDX files (tests/helpers.py), made once per test process."""
  from helpers import make_tiny_fashion_mnist
  return make_tiny_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))
