"""SmoothOut and AdaSmoothOut (Wu et al., arXiv 1805.07898): gradients taken at randomly perturbed weights.

Before each gradient, noise is added to every trainable parameter; the loss and gradient are computed at the
noisy weights and the optimiser updates the clean ones (the noise is never stored). The noise is drawn from
U(-1, 1) and scaled by the bound ``a * c(t)``, where ``c`` is the schedule's coefficient at the 0-based
update count ``t``:

- ``"uniform"``: ``U(-1, 1) * a c``, the same bound for every weight (SmoothOut);
- ``"weight"``: ``U(-1, 1) * a c * |w|``, elementwise relative to each weight;
- ``"filter"`` (AdaSmoothOut): per filter, the ``U(-1, 1)`` draw rescaled to norm ``a c * ||w_filter||``. A
  filter is one output unit: one index of a kernel's LAST axis (Flax layout; PyTorch's is the first), the
  norm taken over all other axes; each element of a 1-D parameter (bias, BatchNorm scale or bias) is its own
  filter. A filter whose draw has norm < 1e-6 keeps its uniform noise (the authors' guard).

The noise of an update is keyed by the run's dropout key, the update count and the chunk (`noise_key`), and
split per leaf of ``params`` in ``jax.tree.leaves`` order (`noise`), so it is reproducible and the same on
every device and host.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
NOISES = ("uniform", "weight", "filter")
SCHEDULES = ("constant", "anneal", "tanh")
# Folded into the dropout key to start the noise stream: no int32 update count reaches 2**32 - 1, so the
# noise keys never coincide with a step's dropout key (which folds the count into the same key).
KEY_STREAM = 0xFFFFFFFF
# A filter whose U(-1, 1) draw has a smaller norm is not rescaled (the authors' guard against dividing by ~0).
MIN_NOISE_NORM = 1e-6


@dataclasses.dataclass(frozen=True)
class SmoothOut:
  """What to perturb and by how much: the noise bound a, its kind and schedule, and the chunks per batch.

  chunks K: the batch is split into K chunks, each with fresh noise; their gradients are averaged (K = 1 is
  stochastic SmoothOut). total_steps T is the run's update budget (the "tanh" schedule ramps over it).
  """
  a: float
  noise: str = "uniform"
  chunks: int = 1
  schedule: str = "constant"
  total_steps: int = 1
  anneal_index: float = 0.55
  tanh_scale: float = 10.0

  def __post_init__(self):
    if self.noise not in NOISES:
      raise ValueError(f"noise={self.noise!r} is not known; allowed: {', '.join(NOISES)}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule={self.schedule!r} is not known; allowed: {', '.join(SCHEDULES)}")
    if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or self.chunks < 1:
      raise ValueError(f"chunks must be an integer >= 1, got {self.chunks!r}")
    if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
      raise ValueError(f"total_steps must be an integer >= 1, got {self.total_steps!r}")

  def bound(self, step: jax.Array) -> jax.Array:
    """The noise bound a * c(step) of the update with 0-based count `step` (float32)."""
    return self.a * coefficient(self.schedule, step, self.total_steps, anneal_index=self.anneal_index,
                                tanh_scale=self.tanh_scale)


def coefficient(schedule: str, step: jax.Array, total_steps: int, *, anneal_index: float = 0.55,
                tanh_scale: float = 10.0) -> jax.Array:
  """The noise coefficient c(t) at the 0-based update count t = step, as float32.

  "constant": 1; "anneal": (1 / (1 + t)^anneal_index)^0.5; "tanh": (tanh(tanh_scale * (t / T - 0.5)) + 1) / 2
  with T = total_steps (a ramp from ~0 to ~1 centred on the middle of training).

  Examples:
    >>> from snapjax import smoothout
    >>> float(smoothout.coefficient("constant", 7, 10))
    1.0
    >>> round(float(smoothout.coefficient("anneal", 3, 10, anneal_index=0.5)), 6)  # (1 / 4^0.5)^0.5
    0.707107
    >>> float(smoothout.coefficient("tanh", 5, 10))  # The middle of training.
    0.5
  """
  t = jnp.asarray(step, jnp.float32)
  if schedule == "constant":
    return jnp.ones((), jnp.float32)
  if schedule == "anneal":
    return jnp.sqrt(1.0 / (1.0 + t) ** anneal_index)
  if schedule == "tanh":  # (tanh(z) + 1) / 2 = sigmoid(2 z), which keeps float32's precision near 0.
    return jax.nn.sigmoid(2.0 * tanh_scale * (t / total_steps - 0.5))
  raise ValueError(f"schedule={schedule!r} is not known; allowed: {', '.join(SCHEDULES)}")


def noise_key(dropout_key: jax.Array, step: jax.Array, chunk: jax.Array | int) -> jax.Array:
  """The key of one chunk's noise: fold_in(fold_in(fold_in(dropout_key, KEY_STREAM), step), chunk)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(dropout_key, KEY_STREAM), step), chunk)


def _filter_norms(x: jax.Array) -> jax.Array:
  """The L2 norm of each filter (over every axis but the last; elementwise for 0-D and 1-D), kept as x's rank."""
  if x.ndim <= 1:
    return jnp.abs(x)
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(x.ndim - 1)), keepdims=True))


def _leaf_noise(kind: str, u: jax.Array, w: jax.Array, bound: jax.Array) -> jax.Array:
  """One parameter's noise from its U(-1, 1) draw u."""
  if kind == "uniform":
    return bound * u
  if kind == "weight":
    return bound * u * jnp.abs(w)
  if kind == "filter":
    u_norm = _filter_norms(u)
    big = u_norm >= MIN_NOISE_NORM
    scale = jnp.where(big, _filter_norms(w) / jnp.where(big, u_norm, 1.0), 1.0)
    return bound * u * scale
  raise ValueError(f"noise={kind!r} is not known; allowed: {', '.join(NOISES)}")


def noise(kind: str, key: jax.Array, params: PyTree, bound: jax.Array | float) -> PyTree:
  """SmoothOut noise for every leaf of `params` (a tree of float arrays): "uniform", "weight" or "filter".

  Leaf i (in jax.tree.leaves order) draws u_i = jax.random.uniform(jax.random.split(key, n)[i], shape,
  float32, -1, 1); its noise is bound * u_i ("uniform"), bound * u_i * |w_i| ("weight"), or per filter
  u_i rescaled to norm bound * ||w_filter|| ("filter"). The noise is float32 whatever the parameters' dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from snapjax import smoothout
    >>> params = {"bias": jnp.array([1.0, -2.0]), "kernel": jnp.ones((3, 3, 2, 4))}
    >>> n = smoothout.noise("filter", jax.random.PRNGKey(0), params, 0.1)
    >>> [round(float(v), 6) for v in jnp.abs(n["bias"])]  # Each element is its own filter: |n_i| = 0.1 * |w_i|.
    [0.1, 0.2]
    >>> [round(float(v), 6) for v in jnp.sqrt(jnp.sum(n["kernel"] ** 2, axis=(0, 1, 2)))]  # 0.1 * ||ones(3, 3, 2)||.
    [0.424264, 0.424264, 0.424264, 0.424264]
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  bound = jnp.asarray(bound, jnp.float32)
  out = [_leaf_noise(kind, jax.random.uniform(k, w.shape, jnp.float32, -1.0, 1.0), w.astype(jnp.float32), bound)
         for k, w in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)
