"""Test set-up: 4 fake CPU devices and strict rank promotion, set before JAX starts."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_platforms", "cpu")
# Many tests train the same tiny programs: a persistent compilation cache shared by the xdist workers
# turns the repeated compilations into cache hits.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("SNAPJAX_TEST_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                                        "snapjax-test-jax-cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
  """A tiny learnable Fashion-MNIST in raw IDX files (tests/helpers.py), made once per test process."""
  from helpers import make_tiny_fashion_mnist
  return make_tiny_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))
