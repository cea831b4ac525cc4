"""Snapshots in weight space: averaged weights (as in SWA), interpolation paths, BatchNorm statistics recomputed.

The paper's ensemble averages the snapshots' *predictions*; averaging their *weights* instead gives one network
(Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima", SWA), and the path between two snapshots,
``theta(lambda) = lambda * theta_final + (1 - lambda) * theta_i``, is the paper's Fig. 5. Either way the network
at the new point has no BatchNorm running statistics of its own (an average of the snapshots' statistics is not
the statistics of the averaged network), so `recompute_batch_stats` measures them again on training batches, as
SWA's ``bn_update`` does.

All three work on the stacked pytrees of `stack_snapshots` (every leaf with a leading snapshot or point axis).
"""
import functools
import numbers
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.ensemble import leaf_name, num_members

PyTree = Any
# (variables, x) -> (output, {"batch_stats": updated statistics}): the model in training mode, e.g.
# functools.partial(model.apply, train=True, mutable=["batch_stats"]) for a Flax Linen model.
TrainApplyFn = Callable[[PyTree, Any], tuple[Any, PyTree]]


def _check_floating(tree: PyTree, what: str) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(f"{what} leaf {leaf_name(path)} has dtype {jnp.result_type(leaf)}; only floating leaves "
                       f"can be averaged or interpolated")


def average_snapshots(stacked: PyTree, last_m: int | None = None) -> PyTree:
  """The weight average of the last ``last_m`` snapshots: every leaf's mean over its leading snapshot axis.

  ``theta_avg = 1/m * sum_{i=0}^{m-1} theta_{M-i}``, leaf by leaf, accumulated in float32 (or the leaf's wider
  float dtype) and cast back to the leaf's dtype. Every leaf is averaged, BatchNorm statistics included; those
  averaged statistics are not the averaged network's, so recompute them with `recompute_batch_stats` before
  evaluating it.

  Args:
    stacked: The M snapshots from `stack_snapshots`, every leaf floating and of shape ``(M, ...)``.
    last_m: How many of the newest snapshots to average, an int in ``[1, M]``; ``None`` means all M.

  Returns:
    One snapshot's pytree (no leading axis), the same structure and dtypes as a ``stacked`` entry.

  Raises:
    ValueError: If the leaves disagree on M or are scalars, a leaf is not floating, or ``last_m`` is out of
      range.

  Examples:
    >>> import jax.numpy as jnp
    >>> import snapjax
    >>> stacked = snapjax.stack_snapshots([{"w": jnp.full(2, v)} for v in (1.0, 2.0, 6.0)])
    >>> snapjax.average_snapshots(stacked)["w"].tolist()
    [3.0, 3.0]
    >>> snapjax.average_snapshots(stacked, last_m=2)["w"].tolist()
    [4.0, 4.0]
  """
  num = num_members(stacked)
  if last_m is None:
    last_m = num
  if isinstance(last_m, bool) or not isinstance(last_m, numbers.Integral) or not 1 <= last_m <= num:
    raise ValueError(f"last_m must be None or an int in [1, {num}] (M={num} snapshots), got {last_m!r}")
  _check_floating(stacked, "stacked")
  return _average(stacked, int(last_m))


@functools.partial(jax.jit, static_argnums=1)
def _average(stacked: PyTree, last_m: int) -> PyTree:
  num = num_members(stacked)

  def mean(a):
    acc = jnp.promote_types(a.dtype, jnp.float32)
    return jnp.mean(a[num - last_m:].astype(acc), axis=0).astype(a.dtype)

  return jax.tree.map(mean, stacked)


def interpolate_snapshots(start: PyTree, end: PyTree, lambdas: Any) -> PyTree:
  """Points on the line from ``start`` to ``end``: ``theta(lambda) = lambda * end + (1 - lambda) * start``.

  The paper's Fig. 5 takes ``end`` = the final snapshot and ``start`` = an earlier one. Computed leaf by leaf
  in float32 (or the leaf's wider float dtype) and cast back, so ``lambda = 0`` gives ``start`` and
  ``lambda = 1`` gives ``end`` exactly.

  Args:
    start: One snapshot's pytree (e.g. ``{'params': ..., 'batch_stats': ...}``), floating leaves.
    end: A pytree of the same structure, leaf shapes and dtypes.
    lambdas: A 1-D sequence of L interpolation weights (any reals; [0, 1] lies between the two).

  Returns:
    A stacked pytree (as from `stack_snapshots`): every leaf of shape ``(L, *leaf.shape)``, point k at
    ``lambdas[k]``; BatchNorm statistics are interpolated too, so recompute them (`recompute_batch_stats`).

  Raises:
    ValueError: If ``start`` and ``end`` differ in structure, shape or dtype, a leaf is not floating, or
      ``lambdas`` is not a non-empty 1-D sequence of finite numbers.

  Examples:
    >>> import jax.numpy as jnp
    >>> import snapjax
    >>> path = snapjax.interpolate_snapshots({"w": jnp.zeros(2)}, {"w": jnp.array([1.0, 4.0])}, [0.0, 0.5, 1.0])
    >>> path["w"].tolist()
    [[0.0, 0.0], [0.5, 2.0], [1.0, 4.0]]
  """
  lambdas_L = np.asarray(lambdas, np.float64)
  if lambdas_L.ndim != 1 or lambdas_L.size == 0 or not np.all(np.isfinite(lambdas_L)):
    raise ValueError(f"lambdas must be a non-empty 1-D sequence of finite numbers, got {lambdas!r}")
  from snapjax.ensemble import stack_snapshots
  stack_snapshots([start, end])  # The structure, shape and dtype checks, with the leaf named.
  _check_floating(start, "start")
  return _interpolate(start, end, jnp.asarray(lambdas_L, jnp.float32))


@jax.jit
def _interpolate(start: PyTree, end: PyTree, lambdas_L: jax.Array) -> PyTree:
  def line(a, b):
    acc = jnp.promote_types(a.dtype, jnp.float32)
    lam = lambdas_L.astype(acc).reshape((-1,) + (1,) * a.ndim)
    return (lam * b.astype(acc)[None] + (1 - lam) * a.astype(acc)[None]).astype(a.dtype)

  return jax.tree.map(line, start, end)


def _batch_statistics(train_apply_fn: TrainApplyFn, variables: PyTree, x: Any) -> PyTree:
  """This batch's own BatchNorm statistics (batch means and variances), read off a training-mode apply.

  A BatchNorm layer in training mode normalises with the batch's statistics b and updates its running value r
  to ``momentum * r + (1 - momentum) * b``: affine in r, whatever its momentum. Applied at r = 0 with a
  forward-mode tangent of ones on r, the output is ``(1 - momentum) * b`` and its tangent ``momentum``, so
  ``b = output / (1 - tangent)`` without knowing the momentum. The tangent touches only the running-average
  update (the layer's output does not read r in training mode), so this costs one forward pass. Where the
  tangent is 1 the apply did not update the statistic (momentum 1, or a layer left in inference mode): its
  current value is kept. The momentum read off the tangent is the layer's momentum rounded to float32, so the
  result carries a relative error of about 6e-8 / (1 - momentum): 6e-7 at momentum 0.9, 6e-6 at 0.99.
  """
  old = variables["batch_stats"]
  params = {k: v for k, v in variables.items() if k != "batch_stats"}

  def updated(stats):
    _, new = train_apply_fn({**params, "batch_stats": stats}, x)
    return new["batch_stats"]

  zeros = jax.tree.map(jnp.zeros_like, old)
  ones = jax.tree.map(jnp.ones_like, old)
  scaled, momentum = jax.jvp(updated, (zeros,), (ones,))
  return jax.tree.map(lambda s, m, o: jnp.where(m != 1, s / jnp.where(m != 1, 1 - m, 1), o).astype(o.dtype),
                      scaled, momentum, old)


@functools.partial(jax.jit, static_argnames=("train_apply_fn", "stacked"), donate_argnums=(0,))
def _add_batch(sums: PyTree, variables: PyTree, x: Any, *, train_apply_fn: TrainApplyFn, stacked: bool) -> PyTree:
  """sums + this batch's statistics, in float32; with `stacked`, of every point (one at a time, `lax.map`)."""
  if stacked:
    batch = jax.lax.map(lambda v: _batch_statistics(train_apply_fn, v, x), variables)
  else:
    batch = _batch_statistics(train_apply_fn, variables, x)
  return jax.tree.map(lambda s, b: s + b.astype(jnp.float32), sums, batch)


def recompute_batch_stats(train_apply_fn: TrainApplyFn, variables: PyTree, batches: Iterable[Any], *,
                          stacked: bool = False,
                          progress: Callable[[int], None] | None = None) -> PyTree:
  """``variables`` with their BatchNorm statistics measured again: the exact mean over ``batches``.

  The momentum-free cumulative average of SWA's ``bn_update`` (PyTorch's ``update_bn``, momentum=None): every
  running statistic becomes the mean over the N batches of that batch's own statistic (batch mean, and the
  batch variance the layer tracks; Flax's BatchNorm tracks the biased one), whatever its old value and the
  layer's momentum. Each batch is one forward pass of ``train_apply_fn`` (training mode) on the given
  parameters; the parameters are not changed. Use training batches of the size the model was trained with,
  and with the augmentation it was trained on, to measure what its running averages measured in training.

  Args:
    train_apply_fn: ``(variables, x) -> (output, {'batch_stats': updated})``, the model in training mode
      updating its running statistics, e.g. ``functools.partial(model.apply, train=True,
      mutable=['batch_stats'])`` (add ``rngs=`` for dropout). Hashable; it keys the compile cache.
    variables: ``{'batch_stats': ..., 'params': ..., ...}`` of one model, or with ``stacked`` of P models
      stacked on a leading axis (`stack_snapshots`, `interpolate_snapshots`).
    batches: An iterable of at least one input batch ``x``, passed to ``train_apply_fn`` as is (e.g. arrays
      sharded over a mesh). Equal batch sizes make the mean over batches the mean over examples.
    stacked: ``variables`` holds P models: recompute each one's statistics in the same pass over
      ``batches`` (the models run one at a time, `jax.lax.map`).
    progress: Called with the number of batches done after each batch, once that batch's work has finished
      on the devices (the loop then waits for every batch; without it the batches are dispatched ahead).

  Returns:
    ``variables`` with ``'batch_stats'`` replaced (same structure and dtypes); the other collections are the
    same objects. A model without statistics (an empty ``'batch_stats'``) comes back unchanged, without a pass.

  Raises:
    ValueError: If ``variables`` has no ``'batch_stats'`` collection or ``batches`` is empty.

  Examples:
    >>> import functools
    >>> import flax.linen as nn
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import snapjax
    >>> bn = nn.BatchNorm(use_running_average=False, momentum=0.99)
    >>> x = jnp.array([[0.0], [2.0], [4.0], [6.0]])
    >>> variables = bn.init(jax.random.key(0), x)
    >>> train_apply = functools.partial(bn.apply, mutable=["batch_stats"])
    >>> fresh = snapjax.recompute_batch_stats(train_apply, variables, [x[:2], x[2:]])
    >>> [round(float(fresh["batch_stats"][k][0]), 4) for k in ("mean", "var")]  # Batch means 1, 5; variances 1, 1.
    [3.0, 1.0]
  """
  if not isinstance(variables, dict) or "batch_stats" not in variables:
    keys = list(variables) if isinstance(variables, dict) else []
    raise ValueError("variables must be a dict with a 'batch_stats' collection (BatchNorm running statistics), "
                     f"got {type(variables).__name__} with keys {keys}")
  if not jax.tree.leaves(variables["batch_stats"]):
    return variables
  if stacked:
    num_members(variables)  # Every leaf has the same leading axis.
  sums = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32, device=getattr(a, "sharding", None)),
                      variables["batch_stats"])
  num = 0
  for x in batches:
    sums = _add_batch(sums, variables, x, train_apply_fn=train_apply_fn, stacked=bool(stacked))
    num += 1
    if progress is not None:
      jax.block_until_ready(sums)
      progress(num)
  if num == 0:
    raise ValueError("batches yielded no batch: BatchNorm statistics need at least one training batch")
  old = variables["batch_stats"]
  return {**variables, "batch_stats": jax.tree.map(lambda s, o: (s / num).astype(o.dtype), sums, old)}
