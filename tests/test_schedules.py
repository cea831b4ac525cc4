"""Schedules against the paper's formulas written out in float64 NumPy, and snapshot steps by naive loops."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from snapjax import schedules

INT32_MAX = 2**31 - 1
PAIRS = [(100, 5), (101, 5), (1000, 6), (7, 7), (10, 4), (1, 1), (13, 1)]


def ref_cosine(alpha0: float, total: int, cycles: int, count) -> np.ndarray:
  """Paper Eq. 2 with 1-based iteration t = count + 1, in float64."""
  t = np.asarray(count, np.int64) + 1
  length = np.ceil(total / cycles)
  return alpha0 / 2 * (np.cos(np.pi * np.mod(t - 1, length) / length) + 1)


def ref_step(alpha0: float, total: int, count) -> np.ndarray:
  """Single-model baseline: the rate drops once 50% / 75% of the updates are done."""
  done = np.asarray(count, np.float64) / total
  return alpha0 * np.where(done < 0.5, 1.0, np.where(done < 0.75, 0.1, 0.01))


def cycle_probe_counts(total: int, cycles: int) -> list[int]:
  """Start, middle and end counts of every cycle (the end being the last count before a restart)."""
  length = math.ceil(total / cycles)
  counts = []
  for k in range(cycles):
    start, end = k * length, min((k + 1) * length, total) - 1
    counts += [start, (start + end) // 2, end]
  return counts


@pytest.mark.parametrize("total,cycles", PAIRS)
@pytest.mark.parametrize("alpha0", [0.1, 0.2])
def test_snapshot_schedule_matches_eq2_at_cycle_starts_middles_ends(alpha0, total, cycles):
  sched = jax.jit(schedules.snapshot_schedule(alpha0, total, cycles))
  counts = cycle_probe_counts(total, cycles) + [total, total + 1]  # the formula keeps cycling after T
  got = np.array([sched(jnp.int32(c)) for c in counts])
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref_cosine(alpha0, total, cycles, counts), rtol=1e-6, atol=0)


@pytest.mark.parametrize("total,cycles", PAIRS)
def test_snapshot_schedule_matches_eq2_at_every_count(total, cycles):
  sched = jax.jit(schedules.snapshot_schedule(0.2, total, cycles))
  counts = np.arange(2 * total, dtype=np.int32)
  got = np.asarray(sched(jnp.asarray(counts)))
  chex.assert_shape(got, counts.shape)
  np.testing.assert_allclose(got, ref_cosine(0.2, total, cycles, counts), rtol=1e-6, atol=0)


def test_snapshot_schedule_restarts_and_bottoms_out():
  sched = schedules.snapshot_schedule(0.1, 100, 5)
  assert float(sched(0)) == pytest.approx(0.1, rel=1e-7)
  assert float(sched(20)) == pytest.approx(0.1, rel=1e-7)
  assert float(sched(10)) == pytest.approx(0.05, rel=1e-6)
  # The last update of a cycle runs at alpha0 * sin(pi / (2L))**2, tiny but positive.
  assert float(sched(19)) == pytest.approx(0.1 * math.sin(math.pi / 40) ** 2, rel=1e-6)


@pytest.mark.parametrize("total,cycles", [(100, 5), (1000, 6), (101, 5), (INT32_MAX, 1), (INT32_MAX, 7)])
def test_snapshot_schedule_exact_for_huge_traced_int32_counts(total, cycles):
  length = math.ceil(total / cycles)
  top = INT32_MAX
  counts = [top, top - 1, top - 2, top - top % length, top - top % length - 1, top - length // 2,
            2**30 + 3, 2**24 + 1]
  sched = jax.jit(schedules.snapshot_schedule(0.2, total, cycles))
  got = np.array([sched(jnp.asarray(c, jnp.int32)) for c in counts])
  # The reference's cos(.) + 1 loses absolute ~1e-16 to cancellation; tiny atol covers only that.
  np.testing.assert_allclose(got, ref_cosine(0.2, total, cycles, counts), rtol=1e-6, atol=1e-14)


def test_snapshot_schedule_distinguishes_neighbouring_huge_counts():
  # float32 cannot represent 2**31 - 1 vs 2**31 - 2; an exact schedule must still tell them apart.
  sched = jax.jit(schedules.snapshot_schedule(0.1, 1000, 6))
  a, b = sched(jnp.int32(INT32_MAX)), sched(jnp.int32(INT32_MAX - 1))
  assert float(a) != float(b)


def test_snapshot_schedule_accepts_host_integers():
  sched = schedules.snapshot_schedule(0.2, 101, 5)
  for c in [0, 7, 20, 21, 100]:
    want = ref_cosine(0.2, 101, 5, c)
    for count in (c, np.int32(c), np.int64(c), np.uint8(c)):
      got = sched(count)
      assert jnp.asarray(got).dtype == jnp.float32
      np.testing.assert_allclose(got, want, rtol=1e-6)
  # A Python int beyond int32 stays exact too.
  np.testing.assert_allclose(sched(2**40 + 5), ref_cosine(0.2, 101, 5, 2**40 + 5), rtol=1e-6)


def test_snapshot_schedule_rejects_float_counts():
  with pytest.raises(TypeError, match="count"):
    schedules.snapshot_schedule(0.1, 100, 5)(jnp.float32(3.0))


def test_snapshot_schedule_jit_traces_once():
  sched = schedules.snapshot_schedule(0.1, 100, 5)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def lr(count):
    return sched(count)

  for c in [0, 1, 19, 20, 99, 12345, INT32_MAX]:
    np.testing.assert_allclose(lr(jnp.int32(c)), ref_cosine(0.1, 100, 5, c), rtol=1e-6)


@pytest.mark.parametrize("total,cycles", PAIRS + [(9, 2), (51, 26)])
def test_snapshot_steps_match_naive_loop(total, cycles):
  lrs = ref_cosine(0.1, total, cycles, np.arange(total + 1))
  naive = []
  for c in range(total - 1):
    # Update number c + 1 used lr(c); if lr(c + 1) does not decrease, a new cycle starts after it.
    if lrs[c + 1] >= lrs[c]:
      naive.append(c + 1)
  naive.append(total)
  steps = schedules.snapshot_steps(total, cycles)
  assert steps == naive
  assert len(steps) == cycles and steps[-1] == total


def test_snapshot_steps_paper_budget():
  # DenseNet-40 on CIFAR: 300 epochs of 782 batches, 6 cycles of 50 epochs.
  steps_per_epoch = 782
  total = schedules.steps_for_epochs(300, steps_per_epoch)
  assert schedules.snapshot_steps(total, 6) == [50 * steps_per_epoch * k for k in range(1, 7)]


@pytest.mark.parametrize("total,cycles", [(12, 3), (10, 4)])
def test_snapshot_schedule_drives_optax_sgd(total, cycles):
  sched = schedules.snapshot_schedule(0.2, total, cycles)
  opt = optax.sgd(learning_rate=sched)
  grad_3 = jnp.array([1.0, -2.0, 0.5], jnp.float32)
  params_3 = jnp.zeros((3,), jnp.float32)
  state = opt.init(params_3)
  update = jax.jit(opt.update)
  for c in range(total + 3):
    updates_3, state = update(grad_3, state, params_3)
    want_3 = -ref_cosine(0.2, total, cycles, c) * np.asarray(grad_3, np.float64)
    np.testing.assert_allclose(updates_3, want_3, rtol=1e-6, atol=0, err_msg=f"count {c}")


@pytest.mark.parametrize("total", [4, 5, 6, 7, 100, 101, 1003])
def test_step_schedule_matches_closed_form(total):
  sched = jax.jit(schedules.step_schedule(0.1, total))
  counts = np.arange(total + 2, dtype=np.int32)
  got = np.asarray(sched(jnp.asarray(counts)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref_step(0.1, total, counts), rtol=1e-6, atol=0)
  # All three rates are used during training.
  assert len(set(got[:total].tolist())) == 3


def test_step_schedule_documented_boundaries():
  sched = schedules.step_schedule(1.0, 101)
  # First count at 0.1x is ceil(101/2) = 51; first at 0.01x is ceil(303/4) = 76.
  assert [float(sched(c)) for c in (50, 51, 75, 76)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
  assert float(sched(jnp.int32(INT32_MAX))) == pytest.approx(0.01)


@pytest.mark.parametrize("total,num", [(300, 6), (10, 3), (7, 7), (1, 1), (1001, 6)])
def test_nocycle_snapshot_steps_equally_spaced(total, num):
  steps = schedules.nocycle_snapshot_steps(total, num)
  assert len(steps) == num and steps[-1] == total
  gaps = np.diff([0] + steps)
  assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1
  # Each snapshot lies within one step of its ideal position k * T / K.
  ideal = np.arange(1, num + 1) * total / num
  assert np.all(np.abs(np.asarray(steps) - ideal) < 1)


def test_nocycle_snapshot_steps_documented_rounding():
  # Snapshot k is taken after update floor(k * T / K).
  assert schedules.nocycle_snapshot_steps(10, 3) == [3, 6, 10]
  assert schedules.nocycle_snapshot_steps(11, 4) == [2, 5, 8, 11]


def test_nocycle_snapshot_steps_paper_budget():
  assert schedules.nocycle_snapshot_steps(300 * 782, 6) == [50 * 782 * k for k in range(1, 7)]


@pytest.mark.parametrize(
    "epochs,per_epoch,want",
    [(40, 782, 31280), (2.5, 3, 8), (1.5, 1, 2), (2.5, 1, 3), (0.5, 5, 3), (0.4, 1, 1), (0.001, 10, 1), (1 / 3, 3, 1),
     (0.1, 10, 1), (np.float32(2.0), np.int64(5), 10)])
def test_steps_for_epochs(epochs, per_epoch, want):
  got = schedules.steps_for_epochs(epochs, per_epoch)
  assert type(got) is int and got == want
  assert got == max(1, int(np.floor(float(epochs) * int(per_epoch) + 0.5)))


BAD_ARGS = [
    (schedules.snapshot_schedule, (0.1, 100, 0), "num_cycles", "0"),
    (schedules.snapshot_schedule, (0.1, 100, -2), "num_cycles", "-2"),
    (schedules.snapshot_schedule, (0.1, 100, 5.0), "num_cycles", "5.0"),
    (schedules.snapshot_schedule, (0.1, 100, True), "num_cycles", "True"),
    (schedules.snapshot_schedule, (0.1, 10.0, 5), "total_steps", "10.0"),
    (schedules.snapshot_schedule, (0.1, False, 1), "total_steps", "False"),
    (schedules.snapshot_schedule, (0.1, 4, 5), "total_steps", "4"),
    (schedules.snapshot_schedule, (0.1, 9, 4), "num_cycles", "4"),  # L=3: 4th cycle would start at 9
    (schedules.snapshot_schedule, (0.1, 2**31, 1), "total_steps", str(2**31)),
    (schedules.snapshot_schedule, (0.0, 100, 5), "init_value", "0.0"),
    (schedules.snapshot_schedule, (-0.1, 100, 5), "init_value", "-0.1"),
    (schedules.snapshot_schedule, (float("nan"), 100, 5), "init_value", "nan"),
    (schedules.snapshot_schedule, (float("inf"), 100, 5), "init_value", "inf"),
    (schedules.snapshot_schedule, ("0.1", 100, 5), "init_value", "0.1"),
    (schedules.snapshot_schedule, (True, 100, 5), "init_value", "True"),
    (schedules.snapshot_steps, (100, 0), "num_cycles", "0"),
    (schedules.snapshot_steps, (9, 4), "num_cycles", "4"),
    (schedules.snapshot_steps, (50, 49), "num_cycles", "49"),  # L=2: only 25 cycles fit
    (schedules.snapshot_steps, (3, 4), "total_steps", "3"),
    (schedules.snapshot_steps, (np.float64(100), 5), "total_steps", "100.0"),
    (schedules.step_schedule, (0.1, 3), "total_steps", "3"),
    (schedules.step_schedule, (0.1, 100.0), "total_steps", "100.0"),
    (schedules.step_schedule, (0.0, 100), "init_value", "0.0"),
    (schedules.nocycle_snapshot_steps, (100, 0), "num_snapshots", "0"),
    (schedules.nocycle_snapshot_steps, (5, 6), "total_steps", "5"),
    (schedules.nocycle_snapshot_steps, (100, 6.0), "num_snapshots", "6.0"),
    (schedules.steps_for_epochs, (0, 100), "num_epochs", "0"),
    (schedules.steps_for_epochs, (float("nan"), 100), "num_epochs", "nan"),
    (schedules.steps_for_epochs, (10, 0), "steps_per_epoch", "0"),
    (schedules.steps_for_epochs, (10, 100.0), "steps_per_epoch", "100.0"),
    (schedules.steps_for_epochs, (10, True), "steps_per_epoch", "True"),
]


@pytest.mark.parametrize("fn,args,name,value", BAD_ARGS)
def test_bad_arguments_raise_value_error_naming_them(fn, args, name, value):
  with pytest.raises(ValueError) as err:
    fn(*args)
  message = str(err.value)
  assert name in message and value in message
  assert "\n" not in message


@pytest.mark.parametrize("total,cycles", [(10, 4), (4, 4), (100, 5)])
def test_valid_uneven_budgets_are_accepted(total, cycles):
  assert schedules.snapshot_steps(total, cycles)[-1] == total
  schedules.snapshot_schedule(0.1, total, cycles)
