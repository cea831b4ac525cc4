"""Learning-rate schedules and snapshot steps: the paper's cosine cycles (Eq. 2) and its baselines.

Every schedule is an optax schedule of the 0-based update count ``c`` (the number of updates already
done; the update with count ``c`` is update number ``t = c + 1`` of the paper). Snapshot and boundary
steps are computed in Python integers, so they are exact for any budget.
"""
import fractions
import math
import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

# optax counts updates in int32 (and saturates there), so a budget must fit in it.
_MAX_STEPS = 2**31 - 1


def _check_int(name: str, value: Any, minimum: int) -> int:
  """Returns `value` as an int if it is an integer (not bool/float) >= `minimum`, else raises."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _check_positive(name: str, value: Any) -> float:
  """Returns `value` as a float if it is a finite real number > 0 (not bool), else raises."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
  return float(value)


def _check_budget(total_steps: Any, minimum: int) -> int:
  """Validates a total number of updates: an integer in [minimum, 2**31 - 1]."""
  total_steps = _check_int("total_steps", total_steps, minimum)
  if total_steps > _MAX_STEPS:
    raise ValueError(
        f"total_steps must be <= 2**31 - 1 (optax counts updates in int32), got {total_steps}")
  return total_steps


def _cycle_length(total_steps: Any, num_cycles: Any) -> tuple[int, int, int]:
  """Validates a cyclic budget and returns (total_steps, num_cycles, L = ceil(total/cycles))."""
  num_cycles = _check_int("num_cycles", num_cycles, 1)
  total_steps = _check_budget(total_steps, 1)
  if total_steps < num_cycles:
    raise ValueError(
        f"total_steps must be an integer >= num_cycles ({num_cycles}), got {total_steps}")
  length = -(-total_steps // num_cycles)
  if (num_cycles - 1) * length >= total_steps:
    raise ValueError(
        f"num_cycles={num_cycles} leaves the last cycle empty for total_steps={total_steps}: "
        f"cycles of ceil({total_steps}/{num_cycles})={length} updates already use up the budget "
        f"after {-(-total_steps // length)} cycles; change num_cycles or total_steps")
  return total_steps, num_cycles, length


def _as_count(count: Any) -> int | jnp.ndarray:
  """Returns a Python int for host integers, else an integer array of at least 32 bits."""
  if isinstance(count, (int, np.integer)) and not isinstance(count, (bool, np.bool_)):
    return int(count)
  count = jnp.asarray(count)
  if not jnp.issubdtype(count.dtype, jnp.integer):
    raise TypeError(f"count must be an integer update count, got dtype {count.dtype}")
  if jnp.iinfo(count.dtype).bits < 32:
    count = count.astype(jnp.int32)
  return count


def snapshot_schedule(init_value: float, total_steps: int, num_cycles: int) -> optax.Schedule:
  """The paper's cyclic cosine learning rate (Eq. 2) as an optax schedule.

  The budget of ``total_steps`` updates is cut into ``num_cycles`` cycles of ``L = ceil(total_steps /
  num_cycles)`` updates (the last one may be shorter). With ``t = c + 1`` for the 0-based update count
  ``c``, the rate is Eq. 2 of Huang et al. (2017)::

    alpha(t) = init_value / 2 * (cos(pi * mod(t - 1, L) / L) + 1)

  so each cycle starts at ``init_value`` and ends just above 0, where a snapshot is taken (see
  `snapshot_steps`). It is evaluated in float32 as ``init_value * sin(pi * (L - mod(c, L)) / (2 L))**2``,
  the same value without cancellation near the end of a cycle. Counts past ``total_steps`` keep cycling.

  Args:
    init_value: The rate at the start of every cycle (alpha0), a finite number > 0.
    total_steps: The number of updates in the budget (T), an integer in ``[num_cycles, 2**31 - 1]``.
    num_cycles: The number of cycles (M), an integer >= 1.

  Returns:
    A schedule mapping an integer update count (a Python int or an integer array, traced or not) to
    the float32 rate; it raises ``TypeError`` for a non-integer count.

  Raises:
    ValueError: If ``init_value`` is not a finite number > 0, ``num_cycles`` or ``total_steps`` is not
      an integer in range, or the cycles of ``L`` updates use up the budget before the last one starts.

  Examples:
    >>> import optax
    >>> import snapjax
    >>> schedule = snapjax.snapshot_schedule(0.1, total_steps=6, num_cycles=2)
    >>> [round(float(schedule(c)), 4) for c in range(6)]
    [0.1, 0.075, 0.025, 0.1, 0.075, 0.025]
    >>> tx = optax.sgd(schedule, momentum=0.9, nesterov=True)
  """
  init_value = _check_positive("init_value", init_value)
  total_steps, num_cycles, length = _cycle_length(total_steps, num_cycles)

  def schedule(count: Any) -> jnp.ndarray:
    count = _as_count(count)
    # Position inside the cycle, exact in integers; only it becomes a float (< L <= 2**31 - 1).
    if isinstance(count, int):
      left = length - count % length
    else:
      left = length - jnp.mod(count, jnp.asarray(length, count.dtype))
    # (cos(pi * p / L) + 1) / 2 == sin(pi * (L - p) / (2 L))**2: no cancellation near the cycle end,
    # so the tiny rates just before a snapshot keep full float32 relative precision.
    frac = jnp.asarray(left, jnp.float32) / jnp.float32(2 * length)
    return jnp.float32(init_value) * jnp.square(jnp.sin(jnp.float32(math.pi) * frac))

  return schedule


def snapshot_steps(total_steps: int, num_cycles: int) -> list[int]:
  """The update numbers after which the snapshots of `snapshot_schedule` are taken.

  Snapshot ``k`` is taken at the end of cycle ``k``, after update ``min(k * L, total_steps)`` (1-based),
  with ``L = ceil(total_steps / num_cycles)``, so the last one is always taken after the final update.

  Args:
    total_steps: The number of updates in the budget, an integer in ``[num_cycles, 2**31 - 1]``.
    num_cycles: The number of cycles, hence of snapshots, an integer >= 1.

  Returns:
    A list of ``num_cycles`` increasing Python ints, the last being ``total_steps``.

  Raises:
    ValueError: On the same arguments as `snapshot_schedule`.

  Examples:
    >>> import snapjax
    >>> snapjax.snapshot_steps(total_steps=10, num_cycles=3)
    [4, 8, 10]
  """
  total_steps, num_cycles, length = _cycle_length(total_steps, num_cycles)
  return [min(k * length, total_steps) for k in range(1, num_cycles + 1)]


def step_schedule(init_value: float, total_steps: int) -> optax.Schedule:
  """The paper's single-model baseline: a step schedule dropping 10x at 50% and 75% of the budget.

  With ``c`` the 0-based update count, the rate is ``init_value`` while ``c < ceil(total_steps / 2)``,
  ``0.1 * init_value`` while ``c < ceil(3 * total_steps / 4)`` and ``0.01 * init_value`` after, i.e. it
  drops once that fraction of the updates is done.

  Args:
    init_value: The initial rate, a finite number > 0.
    total_steps: The number of updates in the budget, an integer in ``[4, 2**31 - 1]`` (so each of the
      three phases gets at least one update).

  Returns:
    A schedule mapping an integer update count to the float32 rate; it raises ``TypeError`` for a
    non-integer count.

  Raises:
    ValueError: If ``init_value`` is not a finite number > 0 or ``total_steps`` is not an integer in
      range.

  Examples:
    >>> import snapjax
    >>> schedule = snapjax.step_schedule(0.1, total_steps=8)
    >>> [round(float(schedule(c)), 4) for c in range(8)]
    [0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
  """
  init_value = _check_positive("init_value", init_value)
  total_steps = _check_budget(total_steps, 4)  # each of the three phases gets >= 1 update
  first_tenth = -(-total_steps // 2)
  first_hundredth = -(-3 * total_steps // 4)
  rates = (np.float32(init_value), np.float32(init_value * 0.1), np.float32(init_value * 0.01))

  def schedule(count: Any) -> jnp.ndarray:
    count = _as_count(count)
    rate = jnp.where(count >= first_tenth, rates[1], rates[0])
    return jnp.where(count >= first_hundredth, rates[2], rate).astype(jnp.float32)

  return schedule


def nocycle_snapshot_steps(total_steps: int, num_snapshots: int) -> list[int]:
  """Snapshot steps of the paper's NoCycle baseline: evenly spaced along one non-cyclic run.

  Snapshot ``k`` (1-based) is taken after update ``floor(k * total_steps / num_snapshots)``, for
  ``k = 1..num_snapshots``; the last one after the final update.

  Args:
    total_steps: The number of updates in the run, an integer >= ``num_snapshots``.
    num_snapshots: The number of snapshots, an integer >= 1.

  Returns:
    A list of ``num_snapshots`` increasing Python ints, the last being ``total_steps``.

  Raises:
    ValueError: If ``num_snapshots`` is not an integer >= 1 or ``total_steps`` is not an integer
      >= ``num_snapshots``.

  Examples:
    >>> import snapjax
    >>> snapjax.nocycle_snapshot_steps(total_steps=10, num_snapshots=3)
    [3, 6, 10]
  """
  num_snapshots = _check_int("num_snapshots", num_snapshots, 1)
  total_steps = _check_int("total_steps", total_steps, 1)
  if total_steps < num_snapshots:
    raise ValueError(
        f"total_steps must be an integer >= num_snapshots ({num_snapshots}), got {total_steps}")
  return [k * total_steps // num_snapshots for k in range(1, num_snapshots + 1)]


def steps_for_epochs(num_epochs: float, steps_per_epoch: int) -> int:
  """The number of updates in ``num_epochs`` epochs of ``steps_per_epoch`` updates.

  Computes ``num_epochs * steps_per_epoch`` in exact rational arithmetic (``num_epochs`` taken at its
  exact binary value), rounds half up and returns at least 1.

  Args:
    num_epochs: The number of epochs, a finite number > 0; it may be fractional.
    steps_per_epoch: The updates per epoch, an integer >= 1.

  Returns:
    The number of updates, a Python int >= 1.

  Raises:
    ValueError: If ``num_epochs`` is not a finite number > 0 or ``steps_per_epoch`` is not an integer
      >= 1.

  Examples:
    >>> import snapjax
    >>> snapjax.steps_for_epochs(2.5, steps_per_epoch=3)
    8
    >>> snapjax.steps_for_epochs(0.1, steps_per_epoch=3)
    1
  """
  num_epochs = _check_positive("num_epochs", num_epochs)
  steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, 1)
  # Exact rational arithmetic: integer epochs give exact products, halves round up deterministically.
  exact = fractions.Fraction(num_epochs) * steps_per_epoch
  return max(1, math.floor(exact + fractions.Fraction(1, 2)))


def _float32(value: float) -> np.float32:
  return np.float32(value)


def fge_schedule(init_value: float, lr1: float, lr2: float, *, num_epochs: float, steps_per_epoch: int,
                 pretrain_steps: int, cycle_epochs: int) -> optax.Schedule:
  """Fast Geometric Ensembling's learning rate (Garipov et al. 2018): pretraining, then triangular cycles.

  Transcribes the reference code (timgaripov/dnn-mode-connectivity). With ``c`` the 0-based update count and
  ``e = c // steps_per_epoch`` its 0-based epoch, pretraining (``c < pretrain_steps``) follows `train.py`'s
  ``learning_rate_schedule`` at the 1-based epoch ``e + 1`` of the whole budget ``num_epochs``:
  ``alpha = (e + 1) / num_epochs``, factor 1 for ``alpha <= 0.5``, ``1 - 0.99 (alpha - 0.5) / 0.4`` for
  ``alpha <= 0.9``, else 0.01 (the reference trains 200 epochs with it and starts FGE from epoch 160). Then
  `utils.cyclic_learning_rate` per update: with ``j = c - pretrain_steps``, ``t = ((j // spe) % cycle_epochs +
  (j % spe) / spe) / cycle_epochs``; ``lr1 (1 - 2t) + lr2 2t`` for ``t < 0.5``, else ``lr1 (2t - 1) + lr2 (2 - 2t)``.

  Args:
    init_value: The pretraining rate, a finite number > 0.
    lr1, lr2: The cycles' rates at their ends and at their midpoints, finite numbers > 0.
    num_epochs: The whole budget in epochs (pretraining and cycles), a finite number > 0.
    steps_per_epoch: Updates per epoch, an integer >= 1.
    pretrain_steps: Updates before the first cycle, an integer >= 1.
    cycle_epochs: Epochs per cycle, an even integer >= 2 (the reference asserts it).

  Returns:
    A schedule mapping an integer update count to the float32 rate.

  Examples:
    >>> import snapjax
    >>> s = snapjax.fge_schedule(0.1, 0.05, 0.01, num_epochs=4, steps_per_epoch=2, pretrain_steps=4, cycle_epochs=2)
    >>> [round(float(s(c)), 4) for c in range(8)]
    [0.1, 0.1, 0.1, 0.1, 0.05, 0.03, 0.01, 0.03]
  """
  init_value = _check_positive("init_value", init_value)
  lr1, lr2 = _check_positive("lr1", lr1), _check_positive("lr2", lr2)
  num_epochs = _check_positive("num_epochs", num_epochs)
  spe = _check_int("steps_per_epoch", steps_per_epoch, 1)
  pretrain = _check_int("pretrain_steps", pretrain_steps, 1)
  cycle = _check_int("cycle_epochs", cycle_epochs, 2)
  if cycle % 2:
    raise ValueError(f"cycle_epochs must be even (the model is collected at the cycle's midpoint epoch), got {cycle}")
  f32 = _float32

  def schedule(count: Any) -> jnp.ndarray:
    count = jnp.asarray(_as_count(count))
    epoch = count // spe
    alpha = (epoch + 1).astype(jnp.float32) / f32(num_epochs)
    factor = jnp.where(alpha <= 0.5, f32(1.0),
                       jnp.where(alpha <= 0.9, f32(1.0) - (alpha - f32(0.5)) / f32(0.4) * f32(0.99), f32(0.01)))
    j = jnp.maximum(count - pretrain, 0)
    t = ((j // spe) % cycle + (j % spe).astype(jnp.float32) / f32(spe)) / f32(cycle)
    two_t = f32(2.0) * t
    cyclic = jnp.where(t < 0.5, f32(lr1) * (f32(1.0) - two_t) + f32(lr2) * two_t,
                       f32(lr1) * (two_t - f32(1.0)) + f32(lr2) * (f32(2.0) - two_t))
    return jnp.where(count < pretrain, f32(init_value) * factor, cyclic).astype(jnp.float32)

  return schedule


def fge_snapshot_steps(total_steps: int, steps_per_epoch: int, pretrain_steps: int, cycle_epochs: int) -> list[int]:
  """The update numbers after which FGE collects a model: the end of each cycle's middle epoch (lr = lr2).

  The reference collects after FGE epoch ``e`` (0-based) when ``e % cycle + 1 == cycle // 2``: after update
  ``pretrain_steps + (k * cycle_epochs + cycle_epochs // 2) * steps_per_epoch`` for k = 0, 1, ... while within
  ``total_steps`` (a last cycle cut by the budget still gives its model if it reaches its midpoint).

  Raises:
    ValueError: On bad arguments, or if no midpoint falls within the budget.

  Examples:
    >>> import snapjax
    >>> snapjax.fge_snapshot_steps(total_steps=20, steps_per_epoch=2, pretrain_steps=8, cycle_epochs=2)
    [10, 14, 18]
  """
  total = _check_budget(total_steps, 1)
  spe = _check_int("steps_per_epoch", steps_per_epoch, 1)
  pretrain = _check_int("pretrain_steps", pretrain_steps, 1)
  cycle = _check_int("cycle_epochs", cycle_epochs, 2)
  if cycle % 2:
    raise ValueError(f"cycle_epochs must be even, got {cycle}")
  steps, k = [], 0
  while pretrain + (k * cycle + cycle // 2) * spe <= total:
    steps.append(pretrain + (k * cycle + cycle // 2) * spe)
    k += 1
  if not steps:
    raise ValueError(f"no FGE cycle midpoint within the budget: {total - pretrain} updates after pretraining, the "
                     f"first midpoint is {cycle // 2 * spe} updates in")
  return steps


def swa_schedule(init_value: float, swa_lr: float, *, steps_per_epoch: int, swa_start: float) -> optax.Schedule:
  """SWA's learning rate (Izmailov et al. 2018, timgaripov/swa `train.py` `schedule`), per epoch.

  With ``e = c // steps_per_epoch`` the 0-based epoch of the 0-based update count ``c`` and ``t = e / swa_start``:
  ``init_value`` for ``t <= 0.5``, linear to ``swa_lr`` at ``t = 0.9``, then ``swa_lr`` (through the averaging
  phase, which starts after epoch ``swa_start``).

  Examples:
    >>> import snapjax
    >>> s = snapjax.swa_schedule(0.1, 0.05, steps_per_epoch=1, swa_start=10)
    >>> [round(float(s(c)), 4) for c in (0, 5, 7, 9, 12)]
    [0.1, 0.1, 0.075, 0.05, 0.05]
  """
  init_value = _check_positive("init_value", init_value)
  swa_lr = _check_positive("swa_lr", swa_lr)
  spe = _check_int("steps_per_epoch", steps_per_epoch, 1)
  swa_start = _check_positive("swa_start", swa_start)
  f32 = _float32
  ratio = swa_lr / init_value

  def schedule(count: Any) -> jnp.ndarray:
    count = jnp.asarray(_as_count(count))
    t = (count // spe).astype(jnp.float32) / f32(swa_start)
    factor = jnp.where(t <= 0.5, f32(1.0),
                       jnp.where(t <= 0.9, f32(1.0) - f32(1.0 - ratio) * (t - f32(0.5)) / f32(0.4), f32(ratio)))
    return (f32(init_value) * factor).astype(jnp.float32)

  return schedule


def averaging_steps(total_steps: int, start_step: int, every: int) -> range:
  """The update numbers after which a running weight average collects: ``start_step, start_step + every, ...``.

  SWA collects at the end of epoch ``swa_start`` and every ``swa_c_epochs`` after (timgaripov/swa), so
  ``start_step = swa_start * steps_per_epoch`` and ``every = steps_per_epoch`` for one average per epoch.

  Examples:
    >>> import snapjax
    >>> list(snapjax.averaging_steps(total_steps=10, start_step=6, every=2))
    [6, 8, 10]
  """
  total = _check_budget(total_steps, 1)
  start = _check_int("start_step", start_step, 1)
  every = _check_int("every", every, 1)
  if start > total:
    raise ValueError(f"start_step={start} is past the end of the budget ({total} updates)")
  return range(start, total + 1, every)


__all__ = [
    "averaging_steps",
    "fge_schedule",
    "fge_snapshot_steps",
    "nocycle_snapshot_steps",
    "snapshot_schedule",
    "snapshot_steps",
    "step_schedule",
    "steps_for_epochs",
    "swa_schedule",
]
