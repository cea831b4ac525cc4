"""SWAG (Maddox et al., NeurIPS 2019): a Gaussian over the weights from the moments of the SWA iterates.

The moments are a dict of arrays, so they live in a train state (and its checkpoints) and under jit:
  count: the iterates collected so far (int32).
  mean, sq_mean: the running first and second moments of every parameter (the pytree of the parameters).
  deviations: the last `rank` deviations ``theta_i - mean_i`` (mean_i: the running mean after collecting
    theta_i, as the paper's Algorithm 1 and its reference code), every leaf with a leading axis of `rank`: a ring
    buffer, column ``(i - 1) % rank`` holding the i-th (1-based) iterate's deviation.

A sample is ``mean + sqrt(var) * z1 / sqrt(2) + D z2 / sqrt(2 (K - 1))`` with ``var = sq_mean - mean^2`` (`swag_variance`),
D the K = min(count, rank) deviation columns held, z1 ~ N(0, I) of the parameters' size and z2 ~ N(0, I_K): the
covariance ``diag(var) / 2 + D D^T / (2 (K - 1))`` of the paper (the low-rank term is left out while K < 2).
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def swag_init(params: PyTree, rank: int) -> dict[str, Any]:
  """Empty SWAG moments for parameters shaped like `params`, keeping the last `rank` (>= 1) deviations."""
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
  zeros = lambda a: jnp.zeros(jnp.shape(a), jnp.result_type(a))
  return {"count": jnp.zeros((), jnp.int32), "mean": jax.tree.map(zeros, params),
          "sq_mean": jax.tree.map(zeros, params),
          "deviations": jax.tree.map(lambda a: jnp.zeros((rank, *jnp.shape(a)), jnp.result_type(a)), params)}


def swag_rank(moments: dict[str, Any]) -> int:
  """The number of deviation columns the moments keep."""
  return int(jax.tree.leaves(moments["deviations"])[0].shape[0])


def swag_collect(moments: dict[str, Any], params: PyTree) -> dict[str, Any]:
  """The moments after collecting one more iterate `params` (traceable; the paper's Algorithm 1)."""
  n = moments["count"]

  def moment(m, p, power):  # m + (p^power - m) / (n + 1): the running mean, as SWA's (exact for equal iterates).
    x = p.astype(m.dtype) ** power
    return (m + (x - m) / (n + 1).astype(m.dtype)).astype(m.dtype)

  mean = jax.tree.map(lambda m, p: moment(m, p, 1), moments["mean"], params)
  sq_mean = jax.tree.map(lambda m, p: moment(m, p, 2), moments["sq_mean"], params)
  slot = n % swag_rank(moments)
  deviations = jax.tree.map(
      lambda d, p, m: jax.lax.dynamic_update_index_in_dim(d, (p.astype(m.dtype) - m).astype(d.dtype), slot, 0),
      moments["deviations"], params, mean)
  return {"count": n + 1, "mean": mean, "sq_mean": sq_mean, "deviations": deviations}


def swag_variance(moments: dict[str, Any]) -> PyTree:
  """The diagonal variance ``sq_mean - mean^2`` of every parameter, 0 where it is within rounding of 0.

  A difference at most 4 ulp of sq_mean (negative ones included) is cancellation noise, not variance: it is taken as
  0 (the reference clamps at 1e-30, which leaves such noise in, e.g. where XLA fuses ``mean^2`` into an FMA).
  """
  def var(s, m):
    d = s - m * m
    return jnp.where(d > 4 * jnp.finfo(s.dtype).eps * jnp.abs(s), d, 0).astype(s.dtype)
  return jax.tree.map(var, moments["sq_mean"], moments["mean"])


def swag_sample(moments: dict[str, Any], key: jax.Array, num_samples: int = 1) -> PyTree:
  """`num_samples` parameter draws from SWAG's Gaussian, stacked on a leading axis (module docstring).

  Sample s uses ``fold_in(key, s)`` alone, so the first S draws of a larger call are those of a call for S. Each
  draw's BatchNorm statistics (if the model has them) must be measured again before it is evaluated
  (`snapjax.recompute_batch_stats`), as the paper does.

  Args:
    moments: SWAG moments (`swag_init` / `swag_collect`, or a run's saved `swag` item), count >= 1.
    key: a JAX PRNG key.
    num_samples: S >= 1.

  Returns:
    The parameter pytree with every leaf of shape (S, ...), in the moments' dtypes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import snapjax
    >>> m = snapjax.swag.swag_init({"w": jnp.zeros(3)}, rank=2)
    >>> for v in (1.0, 2.0, 3.0):
    ...   m = snapjax.swag.swag_collect(m, {"w": jnp.full(3, v)})
    >>> snapjax.swag_sample(m, jax.random.key(0), num_samples=4)["w"].shape
    (4, 3)
  """
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
  return _sample(moments, key, num_samples)


@functools.partial(jax.jit, static_argnums=2)
def _sample(moments, key, num_samples):
  rank = swag_rank(moments)
  filled = jnp.minimum(moments["count"], rank)
  low_rank = filled >= 2
  column_mask = (jnp.arange(rank) < filled).astype(jnp.float32)
  scale = jnp.where(low_rank, 1.0 / jnp.sqrt(2.0 * jnp.maximum(filled - 1, 1).astype(jnp.float32)), 0.0)
  std = jax.tree.map(jnp.sqrt, swag_variance(moments))
  leaves, tree = jax.tree.flatten(moments["mean"])

  def one(s):
    keys = jax.random.split(jax.random.fold_in(key, s), len(leaves) + 1)
    z2 = jax.random.normal(keys[0], (rank,), jnp.float32) * column_mask * scale
    z1 = [jax.random.normal(k, jnp.shape(m), jnp.float32) for k, m in zip(keys[1:], leaves)]
    z1 = jax.tree.unflatten(tree, z1)
    return jax.tree.map(
        lambda m, sd, z, d: (m + sd * z.astype(m.dtype) / jnp.sqrt(2.0).astype(m.dtype)
                             + jnp.tensordot(z2.astype(d.dtype), d, axes=1)).astype(m.dtype),
        moments["mean"], std, z1, moments["deviations"])

  return jax.lax.map(one, jnp.arange(num_samples))
