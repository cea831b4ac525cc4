"""One run set-up from a config, shared by training and evaluation: data, model, dtype, mesh, variables, test batches.

The flow of a run: config -> data -> experiment (this module) -> train step -> snapshots (checkpoints) ->
scoring -> training loop / evaluation -> report. Modules import only from earlier stages.
"""
import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from snapjax import config as config_lib
from snapjax import data, models
from snapjax.errors import ConfigError

PyTree = Any
DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """1-D data-parallel mesh over every device of every host (axis 'data')."""
  devices = devices if devices is not None else jax.devices()
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def put_sharded(mesh: jax.sharding.Mesh, array: np.ndarray) -> jax.Array:
  """Place a host array (the same on every host) on the mesh, split along axis 0; each host makes its rows only."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` >= n (batch sizes that split evenly over the devices)."""
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True, eq=False)
class Experiment:
  """What both training and evaluation derive from a config; built once per entry point by `build`."""
  config: ml_collections.ConfigDict
  spec: data.DatasetSpec
  model: Any  # A Flax module: model.apply(variables, x, train=...) -> logits.
  compute_dtype: Any
  input_shape: tuple[int, int, int]  # (H, W, C) of one example as the model sees it.
  mesh: jax.sharding.Mesh

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def init_variables(self, rng: jax.Array) -> PyTree:
    """{'params', 'batch_stats'} of a fresh model (dropout rng = rng)."""
    variables = self.model.init({"params": rng, "dropout": rng},
                                jnp.zeros((1, *self.input_shape), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

  def abstract_variables(self) -> PyTree:
    """ShapeDtypeStructs of {'params', 'batch_stats'}, replicated over the mesh: a restore target."""
    shapes = jax.eval_shape(lambda: self.init_variables(jax.random.PRNGKey(0)))  # Traced: nothing compiles.
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes)

  @functools.cached_property
  def apply_fn(self) -> Callable[[PyTree, jax.Array], jax.Array]:
    """(variables, x) -> logits in eval mode; one function per experiment, so it keys one compile cache."""
    model, dtype = self.model, self.compute_dtype
    return lambda variables, x: model.apply(variables, x.astype(dtype), train=False)

  @functools.cached_property
  def _normalize(self) -> Callable[[jax.Array], jax.Array]:
    """The dataset's normalisation, jitted once per experiment (test batches are normalised on the devices)."""
    return jax.jit(functools.partial(data.normalize, spec=self.spec))

  def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of an in-memory dataset's split, from the paths in the config."""
    c = self.config
    return data.load_arrays(self.spec, split, data_dir=c.data_dir or None,
                            fashion_mnist_dir=c.fashion_mnist_dir or None,
                            tiny_imagenet_dir=c.tiny_imagenet_dir or None)

  def load_test_data(self) -> tuple[np.ndarray, np.ndarray] | None:
    """The test split in memory, or None for a streamed dataset after checking that its TFDS data is prepared.

    Called before anything is compiled or written: a missing dataset is a user error, not a crash.
    """
    if self.spec.in_memory:
      return self.load_split(self.spec.eval_split)
    self.stream(self.spec.eval_split, batch_size_per_host=1, train=False, seed=0)
    return None

  def stream(self, split: str, *, batch_size_per_host: int, train: bool,
             seed: int) -> Iterator[dict[str, np.ndarray]]:
    """This host's share of a TFDS split as {"image", "label", "mask"} batches (data.make_stream)."""
    c = self.config
    return data.make_stream(self.spec, split, batch_size_per_host=batch_size_per_host,
                            data_dir=c.data_dir or None, train=train, seed=seed, image_size=c.image_size)

  def train_stream(self, split: str, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """This host's share of a streamed training split (shuffled, repeated, augmented)."""
    return iter(self.stream(split, batch_size_per_host=self.config.batch_size // jax.process_count(),
                             train=True, seed=seed))

  def test_batches(self, batch_size: int | None = None,
                   arrays: tuple[np.ndarray, np.ndarray] | None = None) -> Iterator[tuple[jax.Array, ...]]:
    """Exact test batches (x, y, mask) sharded over the mesh: every example once, the last batch padded.

    batch_size (default: config.eval_batch_size) is rounded up to a multiple of the device count.
    """
    n = self.mesh.devices.size
    batch_size = round_up(batch_size or self.config.eval_batch_size, n)
    if self.spec.in_memory:
      images, labels = arrays if arrays is not None else self.load_split(self.spec.eval_split)
      for x, y, mask in data.eval_batches(images, labels, batch_size):
        yield self._normalize(put_sharded(self.mesh, x)), put_sharded(self.mesh, y), put_sharded(self.mesh, mask)
      return
    sharding = NamedSharding(self.mesh, P(DATA_AXIS))
    for b in self.stream(self.spec.eval_split, batch_size_per_host=batch_size // jax.process_count(),
                          train=False, seed=0):
      yield tuple(jax.make_array_from_process_local_data(sharding, b[k]) for k in ("image", "label", "mask"))


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Experiment:
  """The run set-up of a (validated) config: dataset spec, model, compute dtype, input shape and mesh."""
  spec = data.get_spec(config.dataset)
  if config.augment:
    spec = dataclasses.replace(spec, augment=config.augment)
  try:
    model = models.get(config.model, spec.num_classes, **config_lib.model_kwargs(config))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model={config.model!r} does not accept these options ({e})") from e
  input_shape = spec.image_shape if spec.in_memory else (config.image_size, config.image_size, spec.image_shape[-1])
  return Experiment(config=config, spec=spec, model=model, compute_dtype=config_lib.compute_dtype(config),
                    input_shape=tuple(input_shape), mesh=mesh if mesh is not None else make_mesh())
