"""The BatchNorm batches: the training batches on which a network that no run trained gets its statistics measured.

Used by eval.py's weight-space analyses (snapjax/weight_analyses.py), by the averaged networks of SWA and EMA when
their snapshot is saved, and by SWAG's samples at evaluation. `bn_batches` global batches of the run's batch size,
drawn from the run's training split (config.train_split, else the dataset's) with the run's training augmentation,
since that is what the running statistics averaged over in training. In-memory datasets: a fixed random subset
(seed 0, no example twice) through the run's on-device augmentation with fixed keys. Streamed datasets (ImageNet):
the first batches of the training stream with seed 0. The same batches every time, so the result is deterministic.
"""
import functools
from typing import Callable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from snapjax import data, experiment, weight_space
from snapjax.errors import ConfigError

BN_SEED = 0


def train_split(exp: experiment.Experiment) -> str:
  return exp.config.train_split or exp.spec.train_split


def bn_batch_size(exp: experiment.Experiment) -> int:
  """The run's global batch size, rounded up to a multiple of this mesh's device count."""
  return experiment.round_up(exp.config.batch_size, exp.mesh.devices.size)


def num_bn_batches(exp: experiment.Experiment, num_train: int, bn_batches: int) -> int:
  """bn_batches, at most one epoch of full batches (0: exactly one epoch); ConfigError if not even one fits."""
  batch = bn_batch_size(exp)
  epoch = num_train // batch
  if epoch < 1:
    raise ConfigError(f"the training split {train_split(exp)!r} has {num_train} examples, fewer than one batch of "
                      f"{batch}: the BatchNorm statistics of --analyses need at least one full training batch")
  return epoch if bn_batches == 0 else min(bn_batches, epoch)


def load_bn_data(exp: experiment.Experiment) -> tuple[np.ndarray, np.ndarray] | None:
  """The training split in memory, or None for a streamed dataset after checking that its data is prepared.

  Called before anything is restored or compiled, like `Experiment.load_test_data`.
  """
  if exp.spec.in_memory:
    return exp.load_split(train_split(exp))
  exp.stream(train_split(exp), batch_size_per_host=1, train=True, seed=BN_SEED)
  return None


@functools.cache
def _augment_fn(spec: data.DatasetSpec) -> Callable[[jax.Array, jax.Array], jax.Array]:
  return jax.jit(lambda key, x: data.augment_batch(key, x, spec, train=True))


def bn_batches(exp: experiment.Experiment, train_arrays: tuple[np.ndarray, np.ndarray] | None,
               num_batches: int) -> Iterator[jax.Array]:
  """The BatchNorm batches (module docstring): `num_batches` global training batches, sharded over the mesh."""
  batch = bn_batch_size(exp)
  if train_arrays is not None:
    images = train_arrays[0]
    if num_batches * batch > len(images):
      raise ValueError(f"{num_batches} batches of {batch} need {num_batches * batch} examples; the split has "
                       f"{len(images)}")
    order = np.random.default_rng(BN_SEED).permutation(len(images))[:num_batches * batch]
    augment, key = _augment_fn(exp.spec), jax.random.PRNGKey(BN_SEED)
    for k in range(num_batches):
      x = experiment.put_sharded(exp.mesh, images[order[k * batch:(k + 1) * batch]])
      yield augment(jax.random.fold_in(key, k), x)
    return
  sharding = NamedSharding(exp.mesh, P(experiment.DATA_AXIS))
  stream = exp.stream(train_split(exp), batch_size_per_host=batch // jax.process_count(), train=True, seed=BN_SEED)
  for _ in range(num_batches):
    yield jax.make_array_from_process_local_data(sharding, next(stream)["image"])


@functools.cache
def train_apply_fn(exp: experiment.Experiment) -> weight_space.TrainApplyFn:
  """(variables, x) -> (logits, {'batch_stats'}): the model in training mode, as `recompute_batch_stats` needs.

  Dropout (if the model has it) runs as in training, with a fixed key. One function per experiment (it keys the
  compile cache).
  """
  model, dtype, key = exp.model, exp.compute_dtype, jax.random.PRNGKey(BN_SEED)
  return lambda variables, x: model.apply(variables, x.astype(dtype), train=True, mutable=["batch_stats"],
                                          rngs={"dropout": key})
