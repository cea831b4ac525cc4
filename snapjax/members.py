"""Ensemble members trained side by side in one program: the member axis, its layout, batches and update.

A K-member run (config.num_members = K) trains K independent networks; member k is the run with seed
`seed + k` (its init, data order, augmentation, dropout and SmoothOut noise). With method="single_cycle" and
single_cycle_parallel, SingleCycle's M models also train side by side, model c from the step where the
sequential run starts it: a run trains K x M "training members" j = k * M + c.

A K-member train state is the 1-member state pytree with a leading member axis. Placement, combined:
  * the "member" mesh axis: `member_mesh` makes a (G, D / G) mesh ("member", "data"); device group g holds
    the members g * K/G .. (g + 1) * K/G - 1 and their data-parallel reduction stays inside the group
    (shard_map is manual over "member" only; "data" is partitioned as in a 1-member run);
  * within a group, "loop" (the 1-member step unrolled once per member, in one program), "map" (lax.map) or
    "vmap" over its members.
G = config.member_groups (0: gcd(K, D)); config.member_strategy "auto" is "loop" (see `resolve_layout`: on CPU
a training step under lax.map ran 20x slower than the loop, and a vmapped convolution becomes a grouped one).

Equivalence with the 1-member runs: the training split is held by the D / G devices of each group's data
axis, and each of them draws the batch slices of the G "virtual" devices whose shards it holds, with the
1-member run's keys (seed, epoch, virtual device index); so a member's global batch, augmentation included,
is the one the 1-member run on D devices draws, and SmoothOut cuts its chunks from the same D slices.
The arithmetic is the same up to the order of floating-point reductions (the batch mean of the gradient and
BatchNorm statistics are split over fewer devices), so snapshots agree to float tolerance, not bitwise.
"""
import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from snapjax import config as config_lib, data, dispatch, train_step
from snapjax.experiment import DATA_AXIS, Experiment

PyTree = Any
MEMBER_AXIS = "member"


@dataclasses.dataclass(frozen=True)
class MemberPlan:
  """Who trains side by side: per training member j, its seed, SingleCycle model, first and last step.

  seeds[j] = seed + k, models[j] = c (0 unless SingleCycle runs in parallel), training steps offsets[j] + 1 ..
  ends[j]; the loop runs `loop_steps` updates, a member past its end keeps its state (masked update).
  """
  num_members: int  # K: seed members (config.num_members).
  models_per_member: int  # M in a parallel SingleCycle run, else 1.
  groups: int  # G: size of the "member" mesh axis.
  strategy: str  # "map" or "vmap" within a group.
  seeds: tuple[int, ...]
  models: tuple[int, ...]
  offsets: tuple[int, ...]
  ends: tuple[int, ...]
  snapshot_steps: tuple[int, ...]  # The plan's (global) snapshot steps.

  @property
  def size(self) -> int:
    return len(self.seeds)

  @property
  def loop_steps(self) -> int:
    return max(e - o for o, e in zip(self.offsets, self.ends))

  @property
  def masked(self) -> bool:
    """Do members end at different loop steps (SingleCycle's shorter last cycle)?"""
    return len({e - o for o, e in zip(self.offsets, self.ends)}) > 1

  def member_of(self, j: int) -> int:
    """The seed member k of training member j."""
    return j // self.models_per_member

  def snapshots_at(self, i: int) -> dict[int, list[int]]:
    """{global step: [training members]} of the snapshots taken after loop step i (members in seed order)."""
    out = {}
    for j, (o, e) in enumerate(zip(self.offsets, self.ends)):
      step = o + i
      if i <= e - o and step in self.snapshot_steps:
        out.setdefault(step, []).append(j)
    return out

  def epoch_ends(self, steps_per_epoch: int) -> tuple[int, ...]:
    """The loop steps after which some member's next update starts a new epoch (its order of the data changes)."""
    ends = set()
    for o, e in zip(self.offsets, self.ends):
      ends.update(g - o for g in range((o // steps_per_epoch + 1) * steps_per_epoch, e, steps_per_epoch))
    return tuple(sorted(ends))

  def snapshot_loop_steps(self) -> tuple[int, ...]:
    return tuple(i for i in range(1, self.loop_steps + 1) if self.snapshots_at(i))

  def global_step(self, j: int, i: int) -> int:
    return min(self.offsets[j] + i, self.ends[j])


def resolve_layout(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, str]:
  """(groups, strategy) of a validated config: member_groups 0 is gcd(training members, devices), "auto" is "loop".

  "auto" is "loop" on every backend. Measured on CPU (ResNet-8, batch 128 per member, K = 2 on 4 devices,
  /tmp-style timings in docs/performance.md): the unrolled loop ran at the cost of K one-member steps (1.03 s
  against 2 x 0.46 s), while a training step under lax.map ran 20x slower (19.8 s) and vmap (grouped
  convolutions) 13.4 s. On GPU/TPU unmeasured: the loop runs exactly the one-member kernels K / G times.
  """
  groups = config.member_groups or math.gcd(config_lib.training_members(config), num_devices)
  strategy = "loop" if config.member_strategy == "auto" else config.member_strategy
  return groups, strategy


def is_member_run(config: ml_collections.ConfigDict) -> bool:
  """Does this config train through the member axis (K > 1 or a parallel SingleCycle)? K = 1 runs never do."""
  return config_lib.training_members(config) > 1 or bool(config.get("single_cycle_parallel", False))


def make_member_plan(config: ml_collections.ConfigDict, plan: train_step.Plan, num_devices: int) -> MemberPlan:
  groups, strategy = resolve_layout(config, num_devices)
  k_members = config.num_members
  parallel = config.method == "single_cycle" and config.single_cycle_parallel
  m = config.num_cycles if parallel else 1
  snaps = plan.snapshot_steps
  seeds, models, offsets, ends = [], [], [], []
  for k in range(k_members):
    for c in range(m):
      seeds.append(config.seed + k)
      models.append(c)
      offsets.append(((0,) + snaps[:-1])[c] if parallel else 0)
      ends.append(snaps[c] if parallel else plan.total_steps)
  return MemberPlan(k_members, m, groups, strategy, tuple(seeds), tuple(models), tuple(offsets), tuple(ends),
                    tuple(snaps))


def member_mesh(groups: int, devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """(groups, D / groups) mesh ("member", "data") over every device of every host."""
  devices = devices if devices is not None else jax.devices()
  return jax.make_mesh((groups, len(devices) // groups), (MEMBER_AXIS, DATA_AXIS),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def member_sharding(mesh) -> NamedSharding:
  """Where a stacked member pytree lives: its leading (member) axis split over the mesh's member axis."""
  return NamedSharding(mesh, P(MEMBER_AXIS))


def member_keys(mp: MemberPlan) -> dict[str, np.ndarray]:
  """Each training member's (init, data, aug, dropout) keys as the 1-member run of its seed derives them.

  SingleCycle model c > 0 starts from fold_in(init_key, c) (as the sequential run's hand-over, snapjax/train/one_member.py).
  """
  keys = {"init": [], "data": [], "aug": [], "dropout": []}
  for seed, c in zip(mp.seeds, mp.models):
    init, data_key, aug, dropout = jax.random.split(jax.random.PRNGKey(seed), 4)
    keys["init"].append(init if c == 0 else jax.random.fold_in(init, c))
    keys["data"].append(data_key)
    keys["aug"].append(aug)
    keys["dropout"].append(dropout)
  return {k: np.stack([np.asarray(jax.device_get(a)) for a in v]) for k, v in keys.items()}


def _map(strategy: str, fn: Callable, xs: Any) -> Any:
  """fn over the leading axis of xs: unrolled ("loop"), lax.map ("map", a device-side loop) or vmap."""
  if strategy == "map":
    return jax.lax.map(fn, xs)
  if strategy == "vmap":
    return jax.vmap(fn)(xs)
  n = jax.tree.leaves(xs)[0].shape[0]
  outs = [fn(jax.tree.map(lambda a, i=i: a[i], xs)) for i in range(n)]
  return jax.tree.map(lambda *a: jnp.stack(a), *outs)


def _set_counts(state: PyTree, step: jax.Array) -> PyTree:
  """The state with its step and the optimiser's integer update counts at `step` (SingleCycle's hand-over)."""
  counts = lambda a: jnp.full_like(a, step) if jnp.issubdtype(a.dtype, jnp.integer) else a
  return {**state, "step": jnp.asarray(step, jnp.int32), "opt_state": jax.tree.map(counts, state["opt_state"])}


def make_init(exp: Experiment, tx, mp: MemberPlan, mesh) -> Callable[[np.ndarray], PyTree]:
  """init_keys (J, 2) -> the J fresh member states, each at its first step, sharded over the member axis."""
  offsets = jnp.asarray(mp.offsets, jnp.int32)

  def init(keys):
    def one(args):
      key, offset = args
      return _set_counts(train_step.init_state(exp, tx, key), offset)
    return _map(mp.strategy, one, (keys, offsets))

  return jax.jit(init, out_shardings=member_sharding(mesh))


def make_fresh(exp: Experiment, tx, mp: MemberPlan, mesh) -> Callable[[PyTree, np.ndarray], PyTree]:
  """(state, init_keys) -> fresh models keeping each member's step and update counts (sequential SingleCycle)."""

  def fresh(state, keys):
    def one(args):
      old, key = args
      return _set_counts(train_step.init_state(exp, tx, key), old["step"])
    return _map(mp.strategy, one, (state, keys))

  return jax.jit(fresh, out_shardings=member_sharding(mesh), donate_argnums=(0,))


def make_member_permutation_fn(mesh, rows: int, strategy: str) -> Callable:
  """(data_keys_J, epochs_J) -> each member's order of every shard it draws from for its epoch, (J, D, G, rows).

  Data device d of the mesh holds the shards of the 1-member run's devices d * G + i (i < G, G = the member axis's
  size); their orders are the 1-member run's (train_step.make_epoch_permutation_fn: keyed by seed, epoch and
  device). A permutation sorts the whole shard, so it runs in its own compiled call when a member's epoch changes,
  not inside every update.
  """
  virtual = mesh.shape[MEMBER_AXIS]

  def local(data_keys_m, epochs_m):
    j = jax.lax.axis_index(DATA_AXIS)

    def member(args):
      data_key, epoch = args
      key = jax.random.fold_in(data_key, epoch)
      return jnp.stack([jax.random.permutation(jax.random.fold_in(key, j * virtual + i), rows)
                        for i in range(virtual)])[None]

    return _map(strategy, member, (data_keys_m, epochs_m))

  spec = P(MEMBER_AXIS)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=P(MEMBER_AXIS, DATA_AXIS)))


def make_member_batch_fn(mesh, spec: data.DatasetSpec, plan: train_step.Plan, batch_size: int,
                         strategy: str) -> Callable:
  """(images, labels, steps_J, perms_J, aug_keys_J) -> every member's global batch, (J, B, ...).

  The split is sharded over "data" (replicated over "member"); each data device holds the shards of
  `virtual` = G consecutive devices of the 1-member run on D devices and draws, for each of its members, the
  slices those devices draw (train_step.make_device_batch_fn's slices and keys), in their order; perms_J come
  from make_member_permutation_fn.
  """
  num_devices = mesh.devices.size
  virtual = mesh.shape[MEMBER_AXIS]
  local_batch = batch_size // num_devices

  def local(images_l, labels_l, steps_m, perms_m, aug_keys_m):
    j = jax.lax.axis_index(DATA_AXIS)
    rows = images_l.shape[0] // virtual

    def member(args):
      step, perm, aug_key = args
      pos = step % plan.steps_per_epoch
      xs, ys = [], []
      for i in range(virtual):
        d = j * virtual + i  # The 1-member run's device index.
        idx = jax.lax.dynamic_slice_in_dim(perm[0, i], pos * local_batch, local_batch) + i * rows
        key = jax.random.fold_in(jax.random.fold_in(aug_key, step), d)
        xs.append(data.augment_batch(key, images_l[idx], spec, train=True))
        ys.append(jax.tree.map(lambda a: a[idx], labels_l))
      return jnp.concatenate(xs), jax.tree.map(lambda *a: jnp.concatenate(a), *ys)

    return _map(strategy, member, (steps_m, perms_m, aug_keys_m))

  member_spec = P(MEMBER_AXIS)
  return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS), member_spec,
                                                   P(MEMBER_AXIS, DATA_AXIS), member_spec),
                       out_specs=(P(MEMBER_AXIS, DATA_AXIS), P(MEMBER_AXIS, DATA_AXIS)))


def put_train_split(mesh, arrays: tuple[np.ndarray, np.ndarray]) -> tuple[jax.Array, jax.Array]:
  """The training split sharded over "data" as the 1-member run on every device holds it (same rows dropped)."""
  n = mesh.devices.size
  sharding = NamedSharding(mesh, P(DATA_AXIS))

  def put(a):
    a = a[: len(a) // n * n]
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

  return tuple(jax.tree.map(put, a) for a in arrays)  # Labels may be (labels, soft labels): Run.training_arrays.


class MemberBatches:
  """The in-memory training split on the member mesh; every member's batch is drawn inside the update.

  Up to steps_per_dispatch loop steps run in one compiled call (`dispatch.run_steps`, its body's convolutions in
  the order XLA:CPU gives the top level, as the one-member source's); the caller ends a dispatch where a member's
  epoch ends (`MemberPlan.epoch_ends`), since every member's order of the data is fixed for the call.
  """

  def __init__(self, exp: Experiment, mesh, arrays: tuple[np.ndarray, np.ndarray], plan: train_step.Plan,
               mp: MemberPlan, keys: dict[str, np.ndarray], steps_per_dispatch: int = 1):
    self._mesh, self._mp, self._plan = mesh, mp, plan
    self._images, self._labels = put_train_split(mesh, arrays)
    self._batch_fn = make_member_batch_fn(mesh, exp.spec, plan, exp.config.batch_size, mp.strategy)
    self._perm_fn = make_member_permutation_fn(mesh, self._images.shape[0] // mesh.devices.size, mp.strategy)
    self._sharding = sharding = member_sharding(mesh)
    self._keys = {k: jax.device_put(v, sharding) for k, v in keys.items() if k != "init"}
    self._ends = jax.device_put(np.asarray(mp.ends, np.int32), sharding)
    self._dtype = exp.compute_dtype
    self._perms, self._perm_epochs = None, None
    self.steps_per_dispatch = steps_per_dispatch
    self.stacked = steps_per_dispatch > 1

  def permutations(self, steps: list[int]) -> jax.Array:
    """Every member's shard orders for the epochs of its steps, computed again only when an epoch changes."""
    epochs = tuple(s // self._plan.steps_per_epoch for s in steps)
    if epochs != self._perm_epochs:
      self._perms = None  # Free the old orders first.
      self._perms = self._perm_fn(self._keys["data"], jax.device_put(np.asarray(epochs, np.int32), self._sharding))
      self._perm_epochs = epochs
    return self._perms

  def compile(self, make_step: Callable[[jax.Array], train_step.StepFn],
              frozen: PyTree = None) -> train_step.AotUpdate:
    """The jitted update of every member: update(state_J, done, n) -> (state_J, metrics_J), n loop steps.

    make_step(dropout_key) -> the 1-member step function of one member (traced once per group program).
    metrics_J: one value per member, or (steps_per_dispatch > 1) one row of them per loop step. Its flops_per_step
    counts every member's update (under lax.map XLA counts one member of each group: utilisation.update_flops).
    frozen: as train_step.BatchSource.compile's (a distillation teacher's variables), replicated on every device
    and the same for every member.
    """
    batch_fn, dtype, mp, mesh, k = self._batch_fn, self._dtype, self._mp, self._mesh, self.steps_per_dispatch
    # In a loop body, convolutions as XLA:CPU's top level has them, where the program is lowered for CPU only.
    canonical = dispatch.canonical_convolutions_on_cpu if k > 1 else (lambda f: f)
    extra = () if frozen is None else (jax.device_put(frozen, NamedSharding(mesh, P())),)

    def group(state_m, x_m, y_m, dropout_keys_m, ends_m, *frozen):
      def one(args):
        state, x, y, dropout_key, end = args
        new, metrics = canonical(make_step(dropout_key))(state, x.astype(dtype), y, *frozen)
        if mp.masked:  # A member past its last step keeps its state; its metrics do not count.
          active = state["step"] < end
          new = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state)
          metrics = {**metrics, "finite": metrics["finite"] | ~active}
        return new, metrics
      return _map(mp.strategy, one, (state_m, x_m, y_m, dropout_keys_m, ends_m))

    spec = P(MEMBER_AXIS)
    update_groups = jax.shard_map(group, mesh=mesh, in_specs=(spec,) * 5 + (P(),) * len(extra),
                                  out_specs=(spec, spec), axis_names={MEMBER_AXIS})

    def member_step(state, images, labels, keys, ends, perms, *frozen):
      x, y = batch_fn(images, labels, state["step"], perms, keys["aug"])
      return update_groups(state, x, y, keys["dropout"], ends, *frozen)

    def fused(state, images, labels, keys, ends, perms, num_steps=None, *frozen):
      if num_steps is None:
        state, metrics = member_step(state, images, labels, keys, ends, perms, *frozen)
      else:
        state, metrics = dispatch.run_steps(member_step, k, state, images, labels, keys, ends, perms, *frozen,
                                            num_steps=num_steps)
      # The (J,) metrics replicated: every host reads them (the loop checks and logs them).
      return state, jax.lax.with_sharding_constraint(metrics, NamedSharding(mesh, P()))

    counts = {}  # n -> the count on the devices, made once.

    def args(state, done: int, n: int = 1):
      """n loop steps after `done` (every member's steps from the plan: no device sync)."""
      assert 1 <= n <= k, (n, k)
      perms = self.permutations([mp.global_step(j, done) for j in range(mp.size)])
      if k == 1:
        return state, self._images, self._labels, self._keys, self._ends, perms, None, *extra
      if n not in counts:
        counts[n] = jax.device_put(np.int32(n), NamedSharding(mesh, P()))
      return state, self._images, self._labels, self._keys, self._ends, perms, counts[n], *extra

    return train_step.AotUpdate(jax.jit(fused, donate_argnums=(0,)), args, k, mesh.devices.size,
                                repeats=mp.size // mp.groups if mp.strategy == "map" else 1)


def replicate(tree: PyTree, mesh) -> PyTree:
  """The pytree replicated on every device of the mesh: member-sharded values a host can read (several hosts)."""
  return _replicate_fn(NamedSharding(mesh, P()))(tree)


@functools.lru_cache(maxsize=None)
def _replicate_fn(sharding):
  return jax.jit(lambda tree: tree, out_shardings=sharding)


def take(stacked: PyTree, members: list[int], mesh) -> PyTree:
  """The given members of a stacked pytree, replicated on every device (a snapshot to save or score)."""
  return _take_fn(NamedSharding(mesh, P()))(stacked, np.asarray(members, np.int32))


@functools.lru_cache(maxsize=None)
def _take_fn(sharding):
  return jax.jit(lambda tree, idx: jax.tree.map(lambda a: a[idx], tree), out_shardings=sharding)
