"""Weight averages kept in the train state: SWA's running mean, an EMA of the weights, SWAG's moments.

`Averaging` (made from a config by `from_config`) says what is collected and when; `init` adds the average to a
fresh train state (state["average"]) and `wrap_step` updates it inside the compiled step, right after the update
whose step count is a collection step (`jax.lax.cond`: no host copy, nothing outside the step). So the average is
saved and restored with the train state, and a resumed run is bitwise equal to an uninterrupted one.

state["average"]:
  count: the iterates collected so far (int32).
  mean: the average of the parameters (SWA: the running mean; EMA: the exponential average).
  sq_mean, deviations: SWAG only (snapjax/swag.py).
  batch_stats: with swa_bn="average" only: the same average of the BatchNorm running statistics (torch's
    `AveragedModel(use_buffers=True)`); otherwise the averaged network's statistics are measured again on training
    batches when its snapshot is saved.
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from snapjax import schedules, swag

PyTree = Any
METHODS = ("swa", "ema", "swag")  # The config methods that train a weight average.


@dataclasses.dataclass(frozen=True)
class Averaging:
  """What a run averages: kind "swa" | "ema" | "swag", collected after steps start_step, start_step + every, ..."""
  kind: str
  start_step: int
  every: int
  decay: float = 0.999  # EMA only.
  rank: int = 20  # SWAG only: deviation columns kept.
  average_batch_stats: bool = False  # swa_bn="average".

  def is_collect(self, step: jax.Array) -> jax.Array:
    """Is `step` (updates done, traced) a collection step?"""
    return (step >= self.start_step) & ((step - self.start_step) % self.every == 0)

  def collect_steps(self, total_steps: int) -> range:
    return schedules.averaging_steps(total_steps, self.start_step, self.every)


def swa_start_epochs(config: ml_collections.ConfigDict) -> float:
  """swa_start in epochs: the config's, or 0.75 of num_epochs when it is None."""
  return float(config.swa_start) if config.swa_start is not None else 0.75 * float(config.num_epochs)


def from_config(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Averaging | None:
  """The config's average (methods swa, ema, swag), or None for every other method."""
  if config.method not in METHODS:
    return None
  if config.method == "ema":
    start, every = 1, 1  # Every update, from the first (the first collection copies the weights, as torch's).
  else:
    start = schedules.steps_for_epochs(swa_start_epochs(config), steps_per_epoch)
    every = config.swa_every_steps or steps_per_epoch
  return Averaging(kind=config.method, start_step=start, every=every, decay=float(config.ema_decay),
                   rank=int(config.swag_rank), average_batch_stats=config.swa_bn == "average")


def init(averaging: Averaging, variables: PyTree) -> dict[str, Any]:
  """The empty average of a network's variables ({"params", "batch_stats"})."""
  zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
  if averaging.kind == "swag":
    out = swag.swag_init(variables["params"], averaging.rank)
  else:
    out = {"count": jnp.zeros((), jnp.int32), "mean": zeros(variables["params"])}
  if averaging.average_batch_stats:
    out["batch_stats"] = zeros(variables["batch_stats"])
  return out


def _running_mean(mean: PyTree, new: PyTree, n: jax.Array) -> PyTree:
  """mean + (new - mean) / (n + 1): the mean of n + 1 iterates (torch's AveragedModel default)."""
  return jax.tree.map(lambda m, x: (m + (x.astype(m.dtype) - m) / (n + 1).astype(m.dtype)).astype(m.dtype), mean, new)


def _ema(mean: PyTree, new: PyTree, n: jax.Array, decay: float) -> PyTree:
  """decay * mean + (1 - decay) * new; the first collection (n = 0) copies `new`."""
  def one(m, x):
    x = x.astype(m.dtype)
    return jnp.where(n == 0, x, jnp.asarray(decay, m.dtype) * m + jnp.asarray(1 - decay, m.dtype) * x).astype(m.dtype)
  return jax.tree.map(one, mean, new)


def collect(averaging: Averaging, average: dict[str, Any], params: PyTree, batch_stats: PyTree) -> dict[str, Any]:
  """The average after collecting one more iterate (traceable)."""
  n = average["count"]
  if averaging.kind == "swag":
    out = swag.swag_collect({k: average[k] for k in ("count", "mean", "sq_mean", "deviations")}, params)
  elif averaging.kind == "ema":
    out = {"count": n + 1, "mean": _ema(average["mean"], params, n, averaging.decay)}
  else:
    out = {"count": n + 1, "mean": _running_mean(average["mean"], params, n)}
  if averaging.average_batch_stats:
    combine = _ema if averaging.kind == "ema" else _running_mean
    args = (averaging.decay,) if averaging.kind == "ema" else ()
    out["batch_stats"] = combine(average["batch_stats"], batch_stats, n, *args)
  return out


StepFn = Callable[[PyTree, jax.Array, jax.Array], tuple[PyTree, dict[str, jax.Array]]]


def wrap_step(step_fn: StepFn, averaging: Averaging) -> StepFn:
  """step_fn over states with an "average": the update, then the collection when its step count is due."""

  def step(state, x, y):
    inner = {k: v for k, v in state.items() if k != "average"}
    new, metrics = step_fn(inner, x, y)
    average = jax.lax.cond(averaging.is_collect(new["step"]),
                           lambda a: collect(averaging, a, new["params"], new["batch_stats"]),
                           lambda a: a, state["average"])
    return {**new, "average": average}, metrics

  return step


def averaged_variables(averaging: Averaging, state: PyTree) -> PyTree:
  """{"params", "batch_stats"} of the averaged network (the statistics: averaged, or the iterate's until measured)."""
  average = state["average"]
  stats = average["batch_stats"] if averaging.average_batch_stats else state["batch_stats"]
  return {"params": average["mean"], "batch_stats": stats}


def swag_moments(state: PyTree) -> dict[str, Any]:
  """The SWAG moments of a train state (swag.py's layout)."""
  return {k: state["average"][k] for k in ("count", "mean", "sq_mean", "deviations")}
