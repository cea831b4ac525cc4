"""Snapshot-ensemble evaluation: stack snapshots, average the last m softmaxes, exact metrics.

The ensemble is f_ens(x) = 1/m * sum_{i=0}^{m-1} f_{M-i}(x) (Huang et al. 2017): the mean of the softmax
outputs of the last m of M snapshots. `ensemble_predict` runs it as one jitted program per
(apply_fn, input shapes, last_m, strategy, chunk_size, return_members); the snapshots are stacked on a
leading axis and sliced to the last m inside that program, so nothing is copied to the host.

Strategies (how the m members are evaluated inside the one program):
  "vmap": `jax.vmap` over the stacked axis. A convolution whose kernel is vmapped becomes a grouped
    convolution (feature_group_count=m) on an m-times wider input, which XLA:CPU runs several times
    slower than m ordinary convolutions.
  "map": `jax.lax.map` over the members (a scan): the body is the single-model program, compiled once
    whatever m is, with one member's activations alive at a time. `chunk_size` vmaps that many members
    per step (`lax.map(..., batch_size=chunk_size)`), so it inherits "vmap"'s grouped convolutions.
  "loop": a Python-unrolled sum over the members inside the jit; compile time grows with m.
  "auto": picked per platform (AUTO_STRATEGY) when the program is lowered (`jax.lax.platform_dependent`, one
    branch per distinct strategy: a program lowered for CUDA or TPU on a CPU machine runs their strategy):
    cpu -> "map". It kept up with the baseline of calling a jitted single model m times in every
      run, at every batch size tried; "loop" fell behind it at a small batch and compiles longer;
      "vmap" and chunked "map" were several times slower.
    gpu/tpu -> "map". Not measured (no accelerator here); reasoning: "map" runs exactly the
      single-model kernels m times, so apart from a device-side loop counter it costs what the
      per-snapshot baseline costs, keeps one member's activations in memory and compiles once
      whatever m is (the unrolled "loop" would compile m copies of e.g. a ResNet-110). "vmap" may be
      faster on an accelerator when one member does not fill the device (small model or batch),
      since grouped convolutions are native on TPU and in cuDNN, but that depends on the model, is
      unmeasured, and needs m times the activation memory, so it stays opt-in.
  measured: see benchmarks/README.md (python benchmarks/ensemble_eval.py).
"""
import functools
import numbers
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

PyTree = Any
ApplyFn = Callable[[PyTree, Any], jax.Array]

STRATEGIES = ("auto", "vmap", "map", "loop")
AUTO_STRATEGY = {"cpu": "map", "gpu": "map", "cuda": "map", "rocm": "map", "tpu": "map"}  # What "auto" runs.
_NLL_EPS = 1e-12


def leaf_name(path: tuple) -> str:
  """The name error messages give a pytree leaf: its key path joined by "/" (``"<root>"`` for a bare leaf).

  Args:
    path: A key path, as `jax.tree_util.tree_flatten_with_path` pairs it with each leaf.

  Returns:
    The path's keys joined by ``"/"``, e.g. ``"params/conv/kernel"``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from snapjax.ensemble import leaf_name
    >>> [leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path({"params": {"w": jnp.zeros(2)}})[0]]
    ['params/w']
    >>> leaf_name(())
    '<root>'
  """
  return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def stack_snapshots(snapshots: Sequence[PyTree]) -> PyTree:
  """Stacks M snapshot pytrees into one pytree with a leading snapshot axis, for `ensemble_predict`.

  Args:
    snapshots: The M snapshots, oldest first, each a pytree of arrays (e.g. ``{'params': ...,
      'batch_stats': ...}``) with the same structure, leaf shapes and dtypes.

  Returns:
    A pytree of the same structure whose every leaf is the M leaves stacked, of shape
    ``(M, *leaf.shape)``.

  Raises:
    ValueError: If ``snapshots`` is empty, the first has no array leaves, or any snapshot differs from
      the first in structure, leaf shape or leaf dtype (the message names the leaf).

  Examples:
    >>> import jax.numpy as jnp
    >>> import snapjax
    >>> stacked = snapjax.stack_snapshots([{"w": jnp.zeros((2, 3))}, {"w": jnp.ones((2, 3))}])
    >>> stacked["w"].shape
    (2, 2, 3)
  """
  snapshots = list(snapshots)
  if not snapshots:
    raise ValueError("snapshots must be a non-empty sequence of pytrees, got an empty sequence")
  leaves_0, treedef_0 = jax.tree_util.tree_flatten_with_path(snapshots[0])
  if not leaves_0:
    raise ValueError("snapshots[0] has no array leaves; expected e.g. {'params': ..., 'batch_stats': ...}")
  paths_0 = [leaf_name(p) for p, _ in leaves_0]
  for i, snap in enumerate(snapshots[1:], start=1):
    leaves_i, treedef_i = jax.tree_util.tree_flatten_with_path(snap)
    paths_i = [leaf_name(p) for p, _ in leaves_i]
    if treedef_i != treedef_0:
      missing = [p for p in paths_0 if p not in set(paths_i)]
      extra = [p for p in paths_i if p not in set(paths_0)]
      if missing or extra:
        detail = f"leaves missing: {missing[:3]}, unexpected leaves: {extra[:3]}"
      else:
        detail = f"same leaf paths but different containers: {treedef_0} vs {treedef_i}"
      raise ValueError(f"snapshots[{i}] has a different tree structure from snapshots[0] ({detail})")
    for path, (_, a), (_, b) in zip(paths_0, leaves_0, leaves_i):
      shape_a, dtype_a = np.shape(a), jnp.result_type(a)
      shape_b, dtype_b = np.shape(b), jnp.result_type(b)
      if shape_a != shape_b or dtype_a != dtype_b:
        raise ValueError(
            f"snapshots[{i}] leaf {path} has shape {shape_b} dtype {dtype_b}, "
            f"but snapshots[0] has shape {shape_a} dtype {dtype_a}")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *snapshots)


def num_members(stacked: PyTree) -> int:
  """The number of snapshots M in a stacked pytree: the leading-axis size its leaves share.

  Args:
    stacked: Snapshots stacked on a leading axis, e.g. from `stack_snapshots`.

  Returns:
    M, the size of every leaf's leading axis.

  Raises:
    ValueError: If ``stacked`` has no array leaves, a leaf is a scalar, or the leaves disagree on M (the
      message names the first leaf of each size).

  Examples:
    >>> import jax.numpy as jnp
    >>> from snapjax.ensemble import num_members
    >>> num_members({"w": jnp.zeros((3, 2, 2)), "b": jnp.zeros((3, 2))})
    3
  """
  leaves = jax.tree_util.tree_leaves_with_path(stacked)
  if not leaves:
    raise ValueError("stacked has no array leaves; build it with stack_snapshots(snapshots)")
  sizes = {}
  for path, leaf in leaves:
    shape = np.shape(leaf)
    if not shape:
      raise ValueError(f"stacked leaf {leaf_name(path)} is a scalar; build stacked with stack_snapshots")
    sizes.setdefault(shape[0], leaf_name(path))
  if len(sizes) > 1:
    raise ValueError(f"stacked leaves disagree on the number of snapshots M: {sizes} (size: first leaf)")
  return next(iter(sizes))


def _platform(x: Any) -> str:
  """Platform of the first concrete jax.Array in x, else the default backend."""
  for leaf in jax.tree.leaves(x):
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
      return next(iter(leaf.sharding.device_set)).platform
  return jax.default_backend()


def resolve_strategy(strategy: str, x: Any = None) -> str:
  """Returns the concrete strategy that `ensemble_predict` runs for ``strategy`` and input ``x``.

  ``"vmap"``, ``"map"`` and ``"loop"`` are returned as given; ``"auto"`` becomes the strategy of the platform
  of the first concrete ``jax.Array`` in ``x`` (else ``jax.default_backend()``): ``"map"`` on every backend,
  the module docstring gives the reasons. (`ensemble_predict` itself resolves ``"auto"`` when its program is
  lowered, for the platform it is lowered for.)

  Args:
    strategy: One of ``"auto"``, ``"vmap"``, ``"map"``, ``"loop"``.
    x: The input pytree, used only to find the backend for ``"auto"``.

  Returns:
    ``"vmap"``, ``"map"`` or ``"loop"``.

  Raises:
    ValueError: If ``strategy`` is not one of the four.

  Examples:
    >>> import jax.numpy as jnp
    >>> from snapjax.ensemble import resolve_strategy
    >>> resolve_strategy("auto", jnp.zeros((4, 2)))
    'map'
    >>> resolve_strategy("loop")
    'loop'
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if strategy != "auto":
    return strategy
  return AUTO_STRATEGY.get(_platform(x), "map")


def _member_probs(apply_fn: ApplyFn, variables: PyTree, x: Any, logits: bool = False) -> Any:
  """float32 softmax of one snapshot's logits, (batch, classes); with logits, (softmax, float32 logits)."""
  logits_BxC = apply_fn(variables, x)
  if jnp.ndim(logits_BxC) != 2:
    raise ValueError(f"apply_fn must return logits of shape (batch, classes), got shape {jnp.shape(logits_BxC)}")
  logits_BxC = jnp.asarray(logits_BxC).astype(jnp.float32)
  probs_BxC = jax.nn.softmax(logits_BxC, axis=-1)
  return (probs_BxC, logits_BxC) if logits else probs_BxC


def _per_platform(run: Callable[[str], Callable[..., Any]], *args: Any) -> Any:
  """run(strategy)(*args) for the strategy AUTO_STRATEGY gives the platform the program is lowered for."""
  branches = {s: run(s) for s in sorted(set(AUTO_STRATEGY.values()))}
  if len(branches) == 1:  # The same on every platform: no conditional.
    return next(iter(branches.values()))(*args)
  per_platform = {p: branches[s] for p, s in AUTO_STRATEGY.items() if p != "gpu"}  # "gpu": cuda and rocm.
  return jax.lax.platform_dependent(*args, default=branches["map"], **per_platform)


@functools.partial(jax.jit, static_argnames=("apply_fn", "last_m", "strategy", "chunk_size", "return_members"))
def _ensemble(apply_fn, stacked, x, *, last_m, strategy, chunk_size, return_members):
  """The compiled ensemble: slice to the last m snapshots, average their softmaxes."""
  num = num_members(stacked)
  last = jax.tree.map(lambda a: a[num - last_m:], stacked)
  run = lambda s: functools.partial(_members_mean, apply_fn, last_m=last_m, strategy=s, chunk_size=chunk_size,
                                    return_members=return_members)
  return _per_platform(run, last, x) if strategy == "auto" else run(strategy)(last, x)


def _members_mean(apply_fn, last, x, *, last_m, strategy, chunk_size, return_members):
  with_logits = return_members == "logits"
  probs_fn = functools.partial(_member_probs, apply_fn, x=x, logits=with_logits)
  logits_MxBxC = None
  if strategy == "vmap":
    probs_MxBxC = jax.vmap(lambda v: probs_fn(v))(last)
    if with_logits:
      probs_MxBxC, logits_MxBxC = probs_MxBxC
    mean_BxC = jnp.mean(probs_MxBxC, axis=0)
  elif strategy == "map":
    probs_MxBxC = jax.lax.map(lambda v: probs_fn(v), last, batch_size=chunk_size)
    if with_logits:
      probs_MxBxC, logits_MxBxC = probs_MxBxC
    mean_BxC = jnp.mean(probs_MxBxC, axis=0)
  else:  # "loop"
    members = [probs_fn(jax.tree.map(lambda a, i=i: a[i], last)) for i in range(last_m)]
    if with_logits:
      logits_MxBxC = jnp.stack([z for _, z in members])
      members = [p for p, _ in members]
    mean_BxC = functools.reduce(jnp.add, members) / last_m
    probs_MxBxC = jnp.stack(members) if return_members else None
  if with_logits:
    return mean_BxC, probs_MxBxC, logits_MxBxC
  if return_members:
    return mean_BxC, probs_MxBxC
  return mean_BxC


def member_axis(stacked: PyTree) -> tuple[jax.sharding.Mesh, str] | None:
  """(mesh, axis) when the stacked snapshots are sharded over a mesh axis along their leading axis, else None."""
  leaves = jax.tree.leaves(stacked)
  leaf = leaves[0] if leaves else None
  if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
    return None
  sharding = leaf.sharding
  if not isinstance(sharding, jax.sharding.NamedSharding) or not sharding.spec or not isinstance(sharding.spec[0],
                                                                                                   str):
    return None
  axis = sharding.spec[0]
  return (sharding.mesh, axis) if sharding.mesh.shape[axis] > 1 else None


@functools.partial(jax.jit, static_argnames=("apply_fn", "last_m", "strategy", "return_members", "mesh", "axis"))
def _ensemble_sharded(apply_fn, stacked, x, *, last_m, strategy, return_members, mesh, axis):
  """The ensemble of snapshots sharded over `axis`: each device group runs its own, one psum makes the mean."""
  num = num_members(stacked)

  def group(local, x):
    n = num_members(local)
    index_N = jax.lax.axis_index(axis) * n + jnp.arange(n)
    weight_N = (index_N >= num - last_m).astype(jnp.float32)
    fn = lambda v: _member_probs(apply_fn, v, x, logits=True)
    run = lambda s: jax.vmap(fn) if s == "vmap" else functools.partial(jax.lax.map, fn)  # "loop" runs "map" here.
    probs_NxBxC, logits_NxBxC = _per_platform(run, local) if strategy == "auto" else run(strategy)(local)
    mean_BxC = jax.lax.psum(jnp.einsum("n,nbc->bc", weight_N, probs_NxBxC), axis) / last_m
    return mean_BxC, probs_NxBxC, logits_NxBxC

  mean_BxC, probs_MxBxC, logits_MxBxC = jax.shard_map(
      group, mesh=mesh, in_specs=(P(axis), P()), out_specs=(P(), P(axis), P(axis)), axis_names={axis})(stacked, x)
  if return_members == "logits":
    return mean_BxC, probs_MxBxC[num - last_m:], logits_MxBxC[num - last_m:]
  if return_members:
    return mean_BxC, probs_MxBxC[num - last_m:]
  return mean_BxC


def ensemble_predict(apply_fn: ApplyFn, stacked: PyTree, x: Any, *, last_m: int | None = None,
                     strategy: str = "auto", chunk_size: int | None = None,
                     return_members: bool | str = False):
  """The snapshot ensemble's prediction: the mean softmax of the last ``last_m`` snapshots on ``x``.

  Computes ``1/m * sum_{i=0}^{m-1} softmax(apply_fn(snapshot_{M-i}, x))`` in float32, with ``m =
  last_m``, as one jitted program per (apply_fn, input shapes, last_m, strategy, chunk_size,
  return_members); the slice to the last m snapshots happens inside it, on the device.

  Args:
    apply_fn: ``apply_fn(variables, x) -> logits`` of shape ``(batch, classes)`` for one snapshot's
      variables (a ``stacked`` entry without its leading axis). It is a static argument of the jit, so
      it must be hashable, and passing the same object on every call avoids recompiling (a new lambda
      or ``functools.partial`` per call compiles each time).
    stacked: The M snapshots from `stack_snapshots`, every leaf of shape ``(M, ...)``.
    x: The input batch, passed to ``apply_fn`` as is (an array or a pytree).
    last_m: How many of the newest snapshots to average, an int in ``[1, M]``; ``None`` means all M.
    strategy: How the members run: ``"map"`` (``jax.lax.map``, one member at a time), ``"vmap"``,
      ``"loop"`` (unrolled), or ``"auto"`` (see `resolve_strategy`); the module docstring compares them.
    chunk_size: For ``"map"`` only, members vmapped per step (capped at ``last_m``); ignored by the
      other strategies; ``None`` means one at a time.
    return_members: Also return every member's softmax; ``"logits"``: its softmax and its float32 logits.

  Snapshots sharded over a mesh axis along their leading axis (e.g. the "member" axis of a K-member run,
  `NamedSharding(mesh, P("member"))`) are evaluated where they are: each device group runs its own snapshots
  (``"vmap"`` or, for the others, ``"map"``; chunk_size is ignored) and the mean is one psum over that axis; x
  must then be on the same mesh (replicated over that axis).

  Returns:
    The mean softmax, float32 of shape ``(batch, classes)``; with ``return_members``, the tuple
    ``(mean, members)`` where ``members`` is float32 of shape ``(last_m, batch, classes)``, oldest first;
    with ``return_members="logits"``, ``(mean, members, logits)``, the logits shaped as the members.

  Raises:
    ValueError: If ``apply_fn`` is not callable or not hashable, ``strategy`` is unknown, ``last_m`` or
      ``chunk_size`` is out of range, the leaves of ``stacked`` disagree on M or are scalars, or
      ``apply_fn`` does not return 2-D logits.

  Examples:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import snapjax
    >>> def apply_fn(variables, x):
    ...   return x @ variables["w"]
    >>> stacked = snapjax.stack_snapshots([{"w": k * jnp.eye(2)} for k in (1.0, 2.0, 3.0)])
    >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> probs = snapjax.ensemble_predict(apply_fn, stacked, x, last_m=2)
    >>> probs.shape, probs.dtype
    ((2, 2), dtype('float32'))
    >>> np.asarray(probs, np.float64).round(3).tolist()
    [[0.917, 0.083], [0.01, 0.99]]
    >>> mean, members = snapjax.ensemble_predict(apply_fn, stacked, x, last_m=2, return_members=True)
    >>> members.shape
    (2, 2, 2)
  """
  if not callable(apply_fn):
    raise ValueError(f"apply_fn must be callable as apply_fn(variables, x), got {apply_fn!r}")
  try:
    hash(apply_fn)
  except TypeError:
    raise ValueError(f"apply_fn must be hashable (it keys the compile cache), got {apply_fn!r}") from None
  resolve_strategy(strategy)  # Checks the name; "auto" is resolved when the program is lowered, per platform.
  num = num_members(stacked)
  if last_m is None:
    last_m = num
  if isinstance(last_m, bool) or not isinstance(last_m, numbers.Integral) or not 1 <= last_m <= num:
    raise ValueError(f"last_m must be None or an int in [1, {num}] (M={num} snapshots), got {last_m!r}")
  if chunk_size is not None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
      raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if strategy not in ("map", "auto"):
      chunk_size = None  # Only "map" batches members; "vmap" does all at once, "loop" one at a time.
    else:
      chunk_size = min(int(chunk_size), int(last_m))
  if return_members not in (True, False, "logits"):
    raise ValueError(f"return_members must be True, False or 'logits', got {return_members!r}")
  return_members = return_members if return_members == "logits" else bool(return_members)
  sharded = member_axis(stacked)
  if sharded is not None:
    return _ensemble_sharded(apply_fn, stacked, x, last_m=int(last_m), strategy=strategy,
                             return_members=return_members, mesh=sharded[0], axis=sharded[1])
  return _ensemble(apply_fn, stacked, x, last_m=int(last_m), strategy=strategy, chunk_size=chunk_size,
                   return_members=return_members)


class Counts(NamedTuple):
  """Per-batch metric sums that merge over a test set into its error rate and mean NLL.

  Made by `counts`. Masked (padding) examples count nowhere, so merging the counts of every batch gives
  the metrics of the test set itself; the two counts are exact int32, ``sum_nll`` is a float32 sum.

  Attributes:
    num_errors: The number of counted examples whose argmax differs from the label, int32 scalar.
    sum_nll: The sum of ``-log p(label)`` over the counted examples, float32 scalar.
    num_examples: The number of counted examples, int32 scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> import snapjax
    >>> probs = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> labels = jnp.array([0, 0, 1])
    >>> total = snapjax.counts(probs[:2], labels[:2]).merge(snapjax.counts(probs[2:], labels[2:]))
    >>> int(total.num_errors), int(total.num_examples)
    (2, 3)
    >>> round(float(total.error_rate()), 4), round(float(total.nll()), 4)
    (0.6667, 0.877)
  """
  num_errors: jax.Array
  sum_nll: jax.Array
  num_examples: jax.Array

  def merge(self, other: "Counts") -> "Counts":
    """Elementwise sum with another batch's counts."""
    return Counts(*(a + b for a, b in zip(self, other)))

  def error_rate(self) -> jax.Array:
    """Fraction misclassified (nan when no example counted)."""
    return self.num_errors / self.num_examples

  def nll(self) -> jax.Array:
    """Mean negative log-likelihood (nan when no example counted)."""
    return self.sum_nll / self.num_examples


def check_metric_args(probs_BxC: Any, labels_B: Any, mask_B: Any | None = None) -> None:
  """Checks the shapes a per-batch metric takes: probabilities ``(batch, classes)``, labels and mask ``(batch,)``.

  Args:
    probs_BxC: Class probabilities of shape ``(batch, classes)``.
    labels_B: Labels of shape ``(batch,)``.
    mask_B: ``None``, or shape ``(batch,)``.

  Raises:
    ValueError: Naming the argument whose shape does not fit.

  Examples:
    >>> import jax.numpy as jnp
    >>> from snapjax.ensemble import check_metric_args
    >>> check_metric_args(jnp.zeros((3, 2)), jnp.zeros(3, int))
    >>> check_metric_args(jnp.zeros((3, 2)), jnp.zeros(2, int))
    Traceback (most recent call last):
    ...
    ValueError: labels_B must have shape (3,) to match probs_BxC, got (2,)
  """
  if jnp.ndim(probs_BxC) != 2:
    raise ValueError(f"probs_BxC must have shape (batch, classes), got shape {jnp.shape(probs_BxC)}")
  batch = jnp.shape(probs_BxC)[0]
  if jnp.shape(labels_B) != (batch,):
    raise ValueError(f"labels_B must have shape ({batch},) to match probs_BxC, got {jnp.shape(labels_B)}")
  if mask_B is not None and jnp.shape(mask_B) != (batch,):
    raise ValueError(f"mask_B must be None or have shape ({batch},), got {jnp.shape(mask_B)}")


def counts(probs_BxC: jax.Array, labels_B: jax.Array, mask_B: jax.Array | None = None) -> Counts:
  """The `Counts` of one batch: errors, summed NLL and number of the examples that ``mask_B`` keeps.

  An example counts where ``mask_B != 0`` (every example if ``mask_B`` is None). It is an error when
  ``argmax(probs_BxC) != label``; its NLL is ``-log(max(p_label, 1e-12))``, computed in float32.

  Args:
    probs_BxC: Class probabilities of shape ``(batch, classes)``, e.g. from `ensemble_predict`.
    labels_B: Integer labels in ``[0, classes)``, of shape ``(batch,)``.
    mask_B: ``None``, or shape ``(batch,)`` with 0 at examples to leave out (e.g. batch padding).

  Returns:
    A `Counts`; merge them over batches with `Counts.merge`.

  Raises:
    ValueError: If the shapes are not ``(batch, classes)``, ``(batch,)`` and ``(batch,)`` or ``None``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import snapjax
    >>> probs = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> c = snapjax.counts(probs, jnp.array([0, 0, 1]), mask_B=jnp.array([1, 1, 0]))
    >>> int(c.num_errors), int(c.num_examples), round(float(c.sum_nll), 4)
    (1, 2, 1.7148)
  """
  check_metric_args(probs_BxC, labels_B, mask_B)
  probs_BxC = jnp.asarray(probs_BxC).astype(jnp.float32)
  labels_B = jnp.asarray(labels_B).astype(jnp.int32)
  keep_B = jnp.ones(labels_B.shape, bool) if mask_B is None else jnp.asarray(mask_B) != 0
  wrong_B = jnp.argmax(probs_BxC, axis=-1) != labels_B
  p_B = jnp.take_along_axis(probs_BxC, labels_B[:, None], axis=-1)[:, 0]
  nll_B = -jnp.log(jnp.clip(p_B, _NLL_EPS, 1.0))
  return Counts(
      num_errors=jnp.sum(wrong_B & keep_B, dtype=jnp.int32),
      sum_nll=jnp.sum(jnp.where(keep_B, nll_B, 0.0)),
      num_examples=jnp.sum(keep_B, dtype=jnp.int32))


def error_rate(probs_BxC: jax.Array, labels_B: jax.Array, mask_B: jax.Array | None = None) -> jax.Array:
  """The fraction of the examples ``mask_B`` keeps whose argmax differs from the label.

  Args:
    probs_BxC: Class probabilities of shape ``(batch, classes)``.
    labels_B: Integer labels in ``[0, classes)``, of shape ``(batch,)``.
    mask_B: ``None`` (count every example), or shape ``(batch,)`` with 0 at examples to leave out.

  Returns:
    A float32 scalar in ``[0, 1]``; nan when no example counts.

  Raises:
    ValueError: On the shapes `counts` rejects.

  Examples:
    >>> import jax.numpy as jnp
    >>> import snapjax
    >>> probs = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> labels = jnp.array([0, 0, 1])
    >>> round(float(snapjax.error_rate(probs, labels)), 4)
    0.6667
    >>> round(float(snapjax.error_rate(probs, labels, mask_B=jnp.array([1, 1, 0]))), 4)
    0.5
  """
  return counts(probs_BxC, labels_B, mask_B).error_rate().astype(jnp.float32)


def nll(probs_BxC: jax.Array, labels_B: jax.Array, mask_B: jax.Array | None = None) -> jax.Array:
  """The mean negative log-likelihood ``-log p(label)`` over the examples ``mask_B`` keeps.

  Probabilities are clipped to at least 1e-12 first, so a zero probability costs about 27.6.

  Args:
    probs_BxC: Class probabilities of shape ``(batch, classes)``.
    labels_B: Integer labels in ``[0, classes)``, of shape ``(batch,)``.
    mask_B: ``None`` (count every example), or shape ``(batch,)`` with 0 at examples to leave out.

  Returns:
    A float32 scalar; nan when no example counts.

  Raises:
    ValueError: On the shapes `counts` rejects.

  Examples:
    >>> import jax.numpy as jnp
    >>> import snapjax
    >>> probs = jnp.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> round(float(snapjax.nll(probs, jnp.array([0, 0, 1]))), 4)
    0.877
  """
  return counts(probs_BxC, labels_B, mask_B).nll().astype(jnp.float32)
