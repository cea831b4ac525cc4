"""Utilisation: FLOPs per update from XLA's cost analysis against independent counts, the peak table, MFU, the line."""
import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from snapjax import config as config_lib, evaluation, experiment, members, progress, train_step, training, utilisation
from snapjax.errors import ConfigError

from helpers import tiny_config, train_parts

M, K, N = 64, 96, 40  # A dense layer (M, K) @ (K, N): 2 * M * N * K FLOPs.


def test_a_dense_layer_counts_two_flops_per_multiply_add():
  x, w = jnp.ones((M, K)), jnp.ones((K, N))
  assert utilisation.update_flops(jax.jit(jnp.matmul).lower(x, w).compile(), 1) == 2 * M * N * K


@pytest.mark.devices(4)
def test_a_sharded_program_counts_one_device_and_update_flops_sums_the_devices():
  mesh = experiment.make_mesh(jax.devices()[:4])
  x = jax.device_put(jnp.ones((M, K)), NamedSharding(mesh, P("data")))
  w = jax.device_put(jnp.ones((K, N)), NamedSharding(mesh, P()))
  compiled = jax.jit(jnp.matmul).lower(x, w).compile()
  assert utilisation.cost_flops(compiled) == 2 * M * N * K / 4  # One device's quarter of the batch.
  assert utilisation.update_flops(compiled, 4) == 2 * M * N * K


def test_a_fori_loop_counts_its_body_once_whatever_the_trip_count():
  """XLA does not multiply a while loop's body by its trip count: a dispatch of K updates counts one update."""
  x, w = jnp.ones((M, K)), jnp.ones((K, K))
  body = lambda w: w + 1e-3 * jnp.tanh(x @ w).mean(0, keepdims=True)  # 2 M K K for the product, plus a few.
  one = utilisation.cost_flops(jax.jit(body).lower(w).compile())
  for trips in (1, 4, 16):
    looped = jax.jit(lambda w, n: jax.lax.fori_loop(0, n, lambda i, w: body(w), w))
    assert utilisation.cost_flops(looped.lower(w, jnp.int32(trips)).compile()) == pytest.approx(one, rel=1e-4)
  assert one >= 2 * M * K * K


def _flops_of_update(source, step_fn, state):
  update = source.compile(step_fn)
  assert update.flops_per_step is None  # Read when the first call compiles the program.
  update(state, 0, 1)
  return update.flops_per_step


@pytest.mark.slow
@pytest.mark.devices(4)
def test_flops_of_a_dispatch_of_updates_equal_the_single_step_programs(tiny_data):
  """The K-step program (a fori_loop over the update) against the one-step program, an independent code path."""
  exp, arrays, plan, schedule, tx = train_parts(tiny_config(tiny_data))
  key = jax.random.key(0)
  step_fn = train_step.make_train_step(exp.model, tx, schedule, key, num_shards=4)
  init = jax.jit(lambda k: train_step.init_state(exp, tx, k), out_shardings=exp.replicated)
  flops = {k: _flops_of_update(train_step.InMemoryBatches(exp, arrays, plan, key, key, k), step_fn, init(key))
           for k in (1, 4)}
  assert flops[1] > 1e6 and flops[4] == pytest.approx(flops[1], rel=0.01), flops


@pytest.mark.slow
@pytest.mark.devices(4)
def test_member_flops_count_every_member_under_each_strategy(tiny_data):
  """K = 2 members in one device group: lax.map's loop is counted once by XLA and multiplied back (repeats)."""
  flops = {}
  for strategy in ("loop", "map"):
    c = tiny_config(tiny_data, num_members=2, member_groups=1, member_strategy=strategy, steps_per_dispatch=1)
    exp, arrays, plan, schedule, tx = train_parts(c)
    mp = members.make_member_plan(c, plan, 4)
    mesh = members.member_mesh(mp.groups)
    keys = members.member_keys(mp)
    source = members.MemberBatches(exp, mesh, arrays, plan, mp, keys, 1)
    make_step = lambda k: train_step.make_train_step(exp.model, tx, schedule, k, num_shards=4)
    flops[strategy] = _flops_of_update(source, make_step, members.make_init(exp, tx, mp, mesh)(keys["init"]))
  assert flops["map"] == pytest.approx(flops["loop"], rel=0.05), flops


def test_mfu_is_achieved_over_peak_times_devices():
  used = utilisation.measure(flops_per_step=2e12, steps_per_s=5.0, peak_per_device=100e12, num_devices=4)
  assert used.flops_per_s == 10e12 and used.mfu == pytest.approx(0.025)
  assert used.text() == "10 TFLOP/s MFU 2.5%"
  assert used.scalars() == {"train/tflops_per_sec": 10.0, "train/mfu": pytest.approx(0.025)}
  unknown_peak = utilisation.measure(2e9, 1.5, None, 4)
  assert unknown_peak.text() == "0.003 TFLOP/s MFU n/a (peak unknown: set --config.peak_flops)"
  assert unknown_peak.scalars() == {"train/tflops_per_sec": 0.003}
  assert utilisation.measure(None, 1.0, 1e12, 1).scalars() == {}


@pytest.mark.parametrize("kind, bf16, f32", [
    ("NVIDIA H100 80GB HBM3", 989e12, 495e12), ("NVIDIA H100 PCIe", 756e12, 378e12), ("NVIDIA H200", 989e12, 495e12),
    ("NVIDIA A100-SXM4-40GB", 312e12, 156e12), ("NVIDIA A100 80GB PCIe", 312e12, 156e12),
    ("Tesla V100-SXM2-16GB", 15.7e12, 15.7e12), ("Tesla V100-PCIE-32GB", 14e12, 14e12), ("NVIDIA L4", 121e12, 60e12),
    ("TPU v4", 275e12, 275e12), ("TPU v5 lite", 197e12, 197e12), ("TPU v5e", 197e12, 197e12),
    ("TPU v5", 459e12, 459e12), ("TPU v5p", 459e12, 459e12), ("TPU v6 lite", 918e12, 918e12)])
def test_the_peak_table_by_device_kind(kind, bf16, f32):
  assert utilisation.device_peak(kind, "bfloat16") == bf16 and utilisation.device_peak(kind, "float32") == f32


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA L40S", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "TPU v3", "TPU v7x"])
def test_devices_not_in_the_table_have_no_peak_unless_configured(kind):
  assert utilisation.find_peak(kind) is None and utilisation.device_peak(kind, "float32") is None
  assert utilisation.device_peak(kind, "float32", configured=123e12) == 123e12


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True, "989e12"])
def test_peak_flops_is_validated(tiny_data, value):
  c = tiny_config(tiny_data, peak_flops=989e12)
  config_lib.validate(c, 4)
  c = ml_collections.ConfigDict({**c.to_dict(), "peak_flops": value})  # Any type, as a hand-edited config holds.
  with pytest.raises(ConfigError, match=r"^peak_flops must be a finite number >= 0") as e:
    config_lib.validate(c, 4)
  assert "\n" not in str(e.value)
  assert "peak_flops" in config_lib.MUTABLE_ON_RESUME  # It changes no result: a resumed run may set it.


def test_throughput_leaves_out_the_first_batch():
  batches = progress.Throughput([np.zeros((5, 2)), np.zeros((5, 2)), np.zeros((3, 2))], size=len)
  assert [len(b) for b in batches] == [5, 5, 3] and (batches.batches, batches.items) == (3, 13)
  rate, with_first = batches.rate()
  assert rate > 0 and not with_first
  one = progress.Throughput([np.zeros((5, 2))], size=len)
  list(one)
  assert one.rate()[1]  # A pass of one batch includes it.


@pytest.mark.slow
@pytest.mark.devices(4)
def test_progress_lines_show_tflops_and_mfu_and_eval_its_images_per_s(tiny_data, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  training.train_and_evaluate(tiny_config(tiny_data, num_epochs=1.0, num_cycles=1, eval_snapshots=False),
                              str(tmp_path / "a"))
  lines = [r.getMessage() for r in caplog.records if re.match(r"step \d+/16 ", r.getMessage())]
  assert len(lines) == 2, lines  # Steps 8 and 16.
  for line in lines:
    assert re.search(r" img/s [0-9.e+-]+ TFLOP/s MFU n/a \(peak unknown: set --config\.peak_flops\) ETA ", line), line
  assert any(r.getMessage().startswith("Utilisation: ") and "GFLOP per step" in r.getMessage() for r in caplog.records)
  caplog.clear()
  evaluation.evaluate_runs([str(tmp_path / "a")], plot=False)  # eval.py's test pass: 203 images, batches of 64.
  passes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Test pass: ")]
  assert len(passes) == 1 and re.match(r"Test pass: 1 snapshots x 256 images in 4 batches: \d+ images/s, \d+ snapshot "
                                       r"evaluations/s \(after the first batch, which compiles\)$", passes[0]), passes
  caplog.clear()
  training.train_and_evaluate(tiny_config(tiny_data, num_epochs=1.0, num_cycles=1, eval_snapshots=False,
                                          peak_flops=1e9), str(tmp_path / "b"))
  lines = [r.getMessage() for r in caplog.records if re.match(r"step \d+/16 ", r.getMessage())]
  assert lines and all(re.search(r" TFLOP/s MFU [0-9.]+% ETA ", line) for line in lines), lines
