"""eval.py's SWAG: each SWAG run's snapshot becomes S networks sampled from its moments, BatchNorm measured per sample.

A run trained with method="swag" holds one snapshot (the SWA mean) and, beside it, SWAG's moments (item "swag").
`expand` replaces that snapshot's Member with `samples` Members: draw s of member k of the i-th run given is
`snapjax.swag_sample(moments, fold_in(fold_in(key(seed), i), k))[s]`, its BatchNorm statistics the exact mean
over the run's swa_bn_batches training batches (snapjax/bn_data.py). Scored as that run's snapshots, the ensemble
of its S samples is SWAG's Bayesian model average (the mean of the samples' probabilities), through the same fused
evaluator as every ensemble.
"""
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from snapjax import bn_data, checkpoints, experiment, swag, weight_space
from snapjax import progress as progress_lib
from snapjax.errors import ConfigError

DEFAULT_SAMPLES = 30


def check_args(samples: int, seed: int) -> None:
  if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
    raise ConfigError(f"--swag_samples={samples!r}; allowed: an integer >= 1")
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ConfigError(f"--swag_seed={seed!r}; allowed: an integer")


def is_swag(config: ml_collections.ConfigDict) -> bool:
  return config.get("method") == "swag"


def _abstract_moments(exp: experiment.Experiment, rank: int, k: int) -> Any:
  params = exp.abstract_variables()["params"]
  lead = (k,) if k > 1 else ()
  shaped = lambda extra: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((*lead, *extra, *a.shape), a.dtype, sharding=a.sharding), params)
  return {"count": jax.ShapeDtypeStruct(lead, np.int32, sharding=exp.replicated), "mean": shaped(()),
          "sq_mean": shaped(()), "deviations": shaped((rank,))}


def expand(members: list[Any], exp: experiment.Experiment, configs: list[ml_collections.ConfigDict],
           workdirs: list[str], *, samples: int, seed: int, train_arrays: tuple[np.ndarray, np.ndarray] | None,
           member_type: type) -> tuple[list[Any], dict[str, Any]]:
  """The Members with every SWAG run's snapshot replaced by its samples, and the report's "swag" entry."""
  out, runs = [], []
  num_train = len(train_arrays[1]) if train_arrays is not None else exp.spec.num_train
  for m in members:
    i = workdirs.index(m.workdir)
    config = configs[i]
    if not is_swag(config):
      out.append(m)
      continue
    k = int(config.get("num_members", 1))
    ckpt = checkpoints.RunCheckpoints(m.workdir, read_only=True)
    try:
      moments = ckpt.restore_extra(m.step, "swag", _abstract_moments(exp, int(config.swag_rank), k))
    finally:
      ckpt.close()
    if k > 1:
      moments = jax.tree.map(lambda a: a[m.member], moments)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), i), m.member)
    params = swag.swag_sample(moments, key, samples)
    stats = jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (samples, *a.shape)), m.variables["batch_stats"])
    num = bn_data.num_bn_batches(exp, num_train, int(config.swa_bn_batches))
    if jax.process_index() == 0:
      logging.info("SWAG: %d samples of %s (member %d, %d iterates collected), BatchNorm statistics of each on %d "
                   "training batches", samples, m.workdir, m.member, int(moments["count"]), num)
    sampled = weight_space.recompute_batch_stats(bn_data.train_apply_fn(exp), {"params": params, "batch_stats": stats},
                                                 bn_data.bn_batches(exp, train_arrays, num), stacked=True,
                                                 progress=progress_lib.BatchProgress(
                                                     f"BatchNorm statistics of {samples} SWAG samples", num))
    for s in range(samples):
      out.append(member_type(m.workdir, m.step, jax.tree.map(lambda a, s=s: a[s], sampled), m.member, m.seed))
    runs.append({"workdir": m.workdir, "member": m.member, "step": m.step, "collected": int(moments["count"]),
                 "rank": int(config.swag_rank), "bn_batches": num})
  return out, {"samples": samples, "seed": seed, "runs": runs}
