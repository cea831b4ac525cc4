"""The training step: plan (epochs -> steps), schedule, optimiser, the jitted SGD update and its batch sources.

Two batch sources give the loop one interface (`BatchSource.compile(step_fn) -> update(state, step, n)`):
in-memory datasets are placed on the devices once and each device draws and augments its slice of every batch
inside the compiled step, n <= steps_per_dispatch updates per call; streamed datasets (ImageNet) feed each host's
tf.data batches into the step, one update per call.
"""
import dataclasses
from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from snapjax import averaging as averaging_lib, data, dispatch, schedules, smoothout as smoothout_lib, utilisation
from snapjax.errors import ConfigError
from snapjax.experiment import DATA_AXIS, Experiment, put_sharded

PyTree = Any
StepFn = Callable[[PyTree, jax.Array, jax.Array], tuple[PyTree, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Plan:
  """Step counts derived once from the config (epochs) and the dataset size: the loop deals in steps."""
  steps_per_epoch: int
  total_steps: int
  snapshot_steps: tuple[int, ...]


def make_plan(config: ml_collections.ConfigDict, num_train: int) -> Plan:
  """Steps per epoch (drop remainder), total update steps and snapshot steps; ConfigError if they do not fit.

  The plan depends on the global batch only, not on the device count, so a run can resume on another mesh.
  """
  # Each device's shard (N // D examples) always holds the steps_per_epoch * B / D examples it draws per epoch.
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(
        f"batch_size={config.batch_size} is larger than the training set ({num_train} examples); "
        f"allowed: at most {num_train}")
  try:
    total = schedules.steps_for_epochs(config.num_epochs, steps_per_epoch)
    if config.num_cycles > total:
      raise ConfigError(
          f"num_cycles={config.num_cycles} is more than the {total} updates of num_epochs={config.num_epochs} "
          f"at {steps_per_epoch} steps/epoch (every cycle needs at least one update); allowed: 1..{total}, "
          f"or raise num_epochs")
    if config.schedule == "cosine_cycles":
      snaps = schedules.snapshot_steps(total, config.num_cycles)
    elif config.schedule == "fge":
      snaps = schedules.fge_snapshot_steps(total, steps_per_epoch, fge_pretrain_steps(config, steps_per_epoch),
                                           config.fge_cycle_epochs)
    else:
      snaps = schedules.nocycle_snapshot_steps(total, config.num_cycles)
    make_schedule(config, total, steps_per_epoch)  # Checks the budget against the schedule's own rules.
    averaging = averaging_lib.from_config(config, steps_per_epoch)
    if averaging is not None and averaging.start_step > total:
      raise ConfigError(f"swa_start={averaging_lib.swa_start_epochs(config):g} epochs ({averaging.start_step} updates "
                        f"at {steps_per_epoch} steps/epoch) is past the end of training ({total} updates)")
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(
        f"num_epochs={config.num_epochs} ({steps_per_epoch} steps/epoch) and num_cycles={config.num_cycles} "
        f"do not fit: {e}") from e
  return Plan(steps_per_epoch, total, tuple(snaps))


def fge_pretrain_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """FGE's pretraining updates: fge_pretrain_fraction of num_epochs, in steps."""
  return schedules.steps_for_epochs(config.fge_pretrain_fraction * config.num_epochs, steps_per_epoch)


def make_schedule(config: ml_collections.ConfigDict, total_steps: int,
                  steps_per_epoch: int | None = None) -> optax.Schedule:
  """The config's learning-rate schedule over total_steps updates (paper Eq. 2, the step baseline, FGE's, SWA's).

  steps_per_epoch: needed by the "fge" and "swa" schedules, which count epochs as their reference code does.
  """
  if config.schedule == "cosine_cycles":
    return schedules.snapshot_schedule(config.init_lr, total_steps, config.num_cycles)
  if config.schedule in ("fge", "swa"):
    if steps_per_epoch is None:
      raise ValueError(f"schedule={config.schedule!r} needs steps_per_epoch")
    if config.schedule == "fge":
      return schedules.fge_schedule(config.init_lr, config.fge_lr1, config.fge_lr2, num_epochs=config.num_epochs,
                                    steps_per_epoch=steps_per_epoch,
                                    pretrain_steps=fge_pretrain_steps(config, steps_per_epoch),
                                    cycle_epochs=config.fge_cycle_epochs)
    return schedules.swa_schedule(config.init_lr, config.swa_lr, steps_per_epoch=steps_per_epoch,
                                  swa_start=averaging_lib.swa_start_epochs(config))
  return schedules.step_schedule(config.init_lr, total_steps)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and L2 weight decay added to the gradient (paper's reference code)."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(learning_rate=schedule, momentum=config.momentum, nesterov=config.nesterov))


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxC.astype(jnp.float32), labels_B)


def init_state(exp: Experiment, tx: optax.GradientTransformation, rng: jax.Array) -> PyTree:
  """Train state {step, params, batch_stats, opt_state} of a fresh model; methods swa, ema, swag add its average."""
  variables = exp.init_variables(rng)
  state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
           "batch_stats": variables["batch_stats"], "opt_state": tx.init(variables["params"])}
  averaging = averaging_lib.from_config(exp.config, 1)  # Only what it holds matters here, not when it collects.
  if averaging is not None:
    state["average"] = averaging_lib.init(averaging, variables)
  return state


def make_smoothout(config: ml_collections.ConfigDict, plan: Plan) -> smoothout_lib.SmoothOut | None:
  """The config's SmoothOut settings over the plan's total steps, or None while smoothout_a is 0 (off)."""
  if not config.smoothout_a:
    return None
  return smoothout_lib.SmoothOut(
      a=float(config.smoothout_a), noise=config.smoothout_noise, chunks=config.smoothout_chunks,
      schedule=config.smoothout_schedule, total_steps=plan.total_steps,
      anneal_index=float(config.smoothout_anneal_index), tanh_scale=float(config.smoothout_tanh_scale))


def make_train_step(model, tx: optax.GradientTransformation, schedule: optax.Schedule, dropout_key: jax.Array,
                    smoothout: smoothout_lib.SmoothOut | None = None, num_shards: int = 1,
                    averaging: averaging_lib.Averaging | None = None, teacher: Any = None) -> StepFn:
  """One SGD update on a global batch: (state, x, y) -> (state, metrics). Shardings come from jit.

  With `smoothout` (a > 0) the gradient is taken at perturbed weights (`smoothout_step`); None or a = 0 is the
  plain step. num_shards: how many devices the batch is split over (SmoothOut's chunks are cut from each
  device's local batch, so they move no data between devices). With `averaging` (methods swa, ema, swag) the
  state's average collects after the update when its step is due (`averaging.wrap_step`).

  With a `teacher` (snapjax.distill.Teacher, method="distill", distill_alpha > 0) the loss is the distillation loss
  (`teacher.loss`; metrics "ce" and "kl" its two terms). A teacher that runs in the step makes the step
  (state, x, y, teacher_variables) -> (state, metrics), its tempered soft labels of x from `teacher.soft_targets`;
  the batch sources pass the teacher's variables as an input of the compiled update (`BatchSource.compile`'s
  frozen). With soft labels computed before training (`teacher.precomputed`) y is (labels, soft labels).
  """
  if averaging is not None:
    return averaging_lib.wrap_step(make_train_step(model, tx, schedule, dropout_key, smoothout, num_shards),
                                   averaging)
  if smoothout is not None and smoothout.a:
    return smoothout_step(model, tx, schedule, dropout_key, smoothout, num_shards)
  distil = teacher is not None and teacher.distils

  def step_fn(state, x_BxHxWxC, labels_B, *frozen):
    step = state["step"]
    rng = jax.random.fold_in(dropout_key, step)
    targets = None
    if distil and teacher.precomputed:  # Drawn with the labels (`Run.training_arrays`).
      labels_B, targets = labels_B
    elif distil:
      targets = teacher.soft_targets(*frozen, x_BxHxWxC)

    def loss_fn(params):
      logits, new_vars = model.apply(
          {"params": params, "batch_stats": state["batch_stats"]}, x_BxHxWxC, train=True,
          mutable=["batch_stats"], rngs={"dropout": rng})
      if distil:
        loss, terms = teacher.loss(logits, labels_B, targets)
        return loss, (logits, new_vars, terms)
      return cross_entropy(logits, labels_B).mean(), (logits, new_vars, {})

    (loss, (logits, new_vars, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    grad_norm = optax.tree.norm(grads)
    new_state = {"step": step + 1, "params": optax.apply_updates(state["params"], updates),
                 "batch_stats": new_vars.get("batch_stats", {}), "opt_state": opt_state}
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels_B),
               "lr": schedule(step), "grad_norm": grad_norm,
               "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm), **terms}
    return new_state, metrics

  return step_fn


def split_chunks(x_BxN: jax.Array, num_chunks: int, num_shards: int) -> jax.Array:
  """(B, ...) -> (K, B / K, ...): chunk k is the k-th slice of each of the num_shards device batches, in order.

  The batch is laid out as num_shards contiguous local batches (sharded over the data axis), so the reshape
  (D, K, B / (D K), ...) -> (K, D, B / (D K), ...) keeps every example on its device.
  """
  b = x_BxN.shape[0]
  if b % (num_shards * num_chunks):
    raise ValueError(f"batch of {b} does not split into {num_chunks} chunks on each of {num_shards} devices")
  per = b // (num_shards * num_chunks)
  x_DxKxPxN = x_BxN.reshape(num_shards, num_chunks, per, *x_BxN.shape[1:])
  return jnp.swapaxes(x_DxKxPxN, 0, 1).reshape(num_chunks, num_shards * per, *x_BxN.shape[1:])


def smoothout_step(model, tx: optax.GradientTransformation, schedule: optax.Schedule, dropout_key: jax.Array,
                   smoothout: smoothout_lib.SmoothOut, num_shards: int = 1) -> StepFn:
  """The SmoothOut update (Wu et al., arXiv 1805.07898): gradients at noisy weights, update of the clean ones.

  The batch is split into K chunks (`split_chunks`); chunk k adds noise keyed by (dropout_key, step, k) to every
  parameter (`smoothout.noise`; BatchNorm's running statistics are not parameters and get none), and its loss
  and gradient are taken at those weights, with BatchNorm statistics of that chunk alone (ghost batch norm).
  The running statistics are threaded through the chunks in order (unrolled). The K gradients are averaged
  and the optimiser (weight decay included) updates the clean weights, which the state never stops holding
  (the authors subtract the noise again; keeping the clean weights is the same update without rounding).
  Loss and accuracy are the means over chunks; metrics["smoothout_a"] is the step's bound a * c(t).

  Unlike the authors' code, the gradient norm is not clipped (they clip at 5) and the learning rate is not
  scaled with the batch size: the optimiser and schedule are the config's, as without SmoothOut.
  """
  num_chunks = smoothout.chunks

  def step_fn(state, x_BxHxWxC, labels_B):
    step, params = state["step"], state["params"]
    rng = jax.random.fold_in(dropout_key, step)
    bound = smoothout.bound(step)
    xs_KxPxHxWxC = split_chunks(x_BxHxWxC, num_chunks, num_shards)
    labels_KxP = split_chunks(labels_B, num_chunks, num_shards)

    def loss_fn(noisy_params, batch_stats, x, labels, chunk_rng):
      logits, new_vars = model.apply(
          {"params": noisy_params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"],
          rngs={"dropout": chunk_rng})
      return cross_entropy(logits, labels).mean(), (logits, new_vars)

    def chunk_fn(carry, chunk):
      batch_stats, grad_sum, loss_sum, acc_sum = carry
      k, x, labels = chunk
      noise = smoothout_lib.noise(smoothout.noise, smoothout_lib.noise_key(dropout_key, step, k), params, bound)
      noisy = jax.tree.map(lambda w, n: w + n.astype(w.dtype), params, noise)
      chunk_rng = rng if num_chunks == 1 else jax.random.fold_in(rng, k)  # K = 1: the plain step's dropout.
      (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          noisy, batch_stats, x, labels, chunk_rng)
      acc = jnp.mean(jnp.argmax(logits, -1) == labels)
      return (new_vars.get("batch_stats", {}), jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss,
              acc_sum + acc), None

    zero = jnp.zeros((), jnp.float32)
    carry = (state["batch_stats"], jax.tree.map(jnp.zeros_like, params), zero, zero)
    # Unrolled, not lax.scan: XLA:CPU runs the convolutions of a loop body with a generic emitter instead of its
    # fast kernels (snapjax/dispatch.py), which made a K = 1 SmoothOut step 3-4x slower than the plain step.
    for k in range(num_chunks):
      carry, _ = chunk_fn(carry, (jnp.int32(k), xs_KxPxHxWxC[k], labels_KxP[k]))
    batch_stats, grad_sum, loss_sum, acc_sum = carry
    grads = jax.tree.map(lambda g: g / num_chunks, grad_sum)
    loss = loss_sum / num_chunks
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    grad_norm = optax.tree.norm(grads)
    new_state = {"step": step + 1, "params": optax.apply_updates(params, updates), "batch_stats": batch_stats,
                 "opt_state": opt_state}
    metrics = {"loss": loss, "accuracy": acc_sum / num_chunks, "lr": schedule(step), "grad_norm": grad_norm,
               "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm), "smoothout_a": bound}
    return new_state, metrics

  return step_fn


class AotUpdate:
  """A jitted update called as update(state, step, n), compiled ahead of time by its first call.

  The first call lowers and compiles the program for its arguments (the compiled executable is the one every call
  then runs: nothing compiles twice) and reads XLA's cost analysis once: `flops_per_step`, the FLOPs of one update of
  every device (snapjax/utilisation.py; None until then, or where XLA reports none). `lower(state, step, n,
  platforms)` lowers the same program without compiling it, for any platform ("cpu", "cuda", "tpu"): how the
  accelerator programs are checked from a CPU machine.

  args(state, step, n) -> the jitted function's arguments. repeats: see utilisation.update_flops.
  """

  def __init__(self, jitted, args: Callable[..., tuple], steps_per_dispatch: int, num_devices: int,
               repeats: int = 1):
    self._jitted, self._args, self._num_devices, self._repeats = jitted, args, num_devices, repeats
    self.steps_per_dispatch, self.stacked = steps_per_dispatch, steps_per_dispatch > 1
    self.flops_per_step: float | None = None
    self._compiled = False

  def lower(self, state: PyTree, step: int | None = None, n: int = 1,
            platforms: tuple[str, ...] | None = None) -> jax.stages.Lowered:
    """The program of update(state, step, n) lowered for `platforms` (default: the devices'), not compiled."""
    return self._jitted.trace(*self._args(state, step, n)).lower(lowering_platforms=platforms)

  def __call__(self, state: PyTree, step: int | None = None, n: int = 1) -> tuple[PyTree, dict[str, jax.Array]]:
    args = self._args(state, step, n)
    if not self._compiled:
      compiled = self._jitted.trace(*args).lower().compile()
      self.flops_per_step = utilisation.update_flops(compiled, self._num_devices, self._repeats)
      self._compiled = True
    return self._jitted(*args)


class BatchSource(Protocol):
  """Where the training batches come from; the loop only calls the compiled update.

  steps_per_dispatch: the most updates one call runs. period: a call never runs past a multiple of it (None: no
  such limit).
  """
  steps_per_dispatch: int
  period: int | None

  def compile(self, step_fn: StepFn, frozen: PyTree = None) -> AotUpdate:
    """The jitted update(state, step, n) -> (state, metrics): n updates from update `step` (== state["step"]).

    metrics: each value a scalar (one update per call) or stacked along a leading axis of steps_per_dispatch
    (the first n rows hold the n updates). `step` may be left out (read from the state: one device sync).
    frozen: arrays the step reads and never changes (a distillation teacher's variables), an input of every call
    and passed to step_fn(state, x, y, frozen); None: step_fn(state, x, y), the program without that input.
    """


def make_epoch_permutation_fn(mesh, data_key: jax.Array, shard_size: int) -> Callable[[jax.Array], jax.Array]:
  """epoch -> each device's order of its shard for that epoch: int32 indices into the shard, sharded on the data axis.

  A permutation keyed by seed, epoch and device (fold_in(fold_in(data_key, epoch), device)); it sorts the whole
  shard, so it runs in its own compiled call once per epoch rather than inside every step.
  """

  def local(epoch):
    d = jax.lax.axis_index(DATA_AXIS)
    return jax.random.permutation(jax.random.fold_in(jax.random.fold_in(data_key, epoch), d), shard_size)

  def epoch_permutation(epoch):
    return jax.shard_map(local, mesh=mesh, in_specs=P(), out_specs=P(DATA_AXIS))(epoch)

  return jax.jit(epoch_permutation)


def make_device_batch_fn(mesh, spec: data.DatasetSpec, plan: Plan, batch_size: int,
                         aug_key: jax.Array) -> Callable:
  """(images, labels, permutation, step) -> augmented global batch, drawn on each device from its own shard.

  Each device takes the step's slice of its shard's order for the epoch (make_epoch_permutation_fn) and augments
  it, so the host does no per-step work and the step no per-epoch work.
  """
  local_batch = batch_size // mesh.devices.size

  def local(images_l, labels_l, perm_l, step):
    d = jax.lax.axis_index(DATA_AXIS)
    idx = jax.lax.dynamic_slice_in_dim(perm_l, step % plan.steps_per_epoch * local_batch, local_batch)
    key = jax.random.fold_in(jax.random.fold_in(aug_key, step), d)
    return data.augment_batch(key, images_l[idx], spec, train=True), jax.tree.map(lambda a: a[idx], labels_l)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS), P()),
                       out_specs=(P(DATA_AXIS), P(DATA_AXIS)))


class InMemoryBatches:
  """The training split on the devices (sharded over the data axis); batches are drawn inside the step.

  Up to steps_per_dispatch updates run in one compiled call (`dispatch.run_steps`); a call never crosses the end of
  an epoch (`period`), where each device's order of its shard is computed anew.
  """

  def __init__(self, exp: Experiment, arrays: tuple[np.ndarray, np.ndarray], plan: Plan,
               data_key: jax.Array, aug_key: jax.Array, steps_per_dispatch: int = 1):
    n = exp.mesh.devices.size
    images, labels = arrays  # labels: an array, or (labels, soft labels) of a distilled student (Run.training_arrays).
    # Drop the few examples that do not split evenly over the devices.
    self._images = put_sharded(exp.mesh, images[: len(images) // n * n])
    self._labels = jax.tree.map(lambda a: put_sharded(exp.mesh, a[: len(a) // n * n]), labels)
    self._batch_fn = make_device_batch_fn(exp.mesh, exp.spec, plan, exp.config.batch_size, aug_key)
    self._perm_fn = make_epoch_permutation_fn(exp.mesh, data_key, len(images) // n)
    self._perm, self._perm_epoch = None, None
    self._plan = plan
    self._dtype = exp.compute_dtype
    self._replicated = exp.replicated
    self._num_devices = n
    self.steps_per_dispatch = steps_per_dispatch
    self.period = plan.steps_per_epoch

  def permutation(self, step: int) -> jax.Array:
    """Each device's order of its shard in the epoch of update `step` + 1 (computed once per epoch)."""
    epoch = step // self._plan.steps_per_epoch
    if epoch != self._perm_epoch:
      self._perm, self._perm_epoch = self._perm_fn(np.int32(epoch)), epoch
    return self._perm

  def compile(self, step_fn: StepFn, frozen: PyTree = None) -> AotUpdate:
    batch_fn, dtype, k = self._batch_fn, self._dtype, self.steps_per_dispatch
    extra = () if frozen is None else (frozen,)

    def train_step(state, images, labels, perm, *frozen):
      x, y = batch_fn(images, labels, perm, state["step"])
      return step_fn(state, x.astype(dtype), y, *frozen)

    if k == 1:
      def args(state, step=None, n=1):
        assert n == 1, n
        step = int(jax.device_get(state["step"])) if step is None else step
        return state, self._images, self._labels, self.permutation(step), *extra

      return AotUpdate(jax.jit(train_step, donate_argnums=(0,)), args, 1, self._num_devices)

    # XLA:CPU compiles convolutions in a loop body unlike those at the top level: on CPU (resolved when the program
    # is lowered, so an accelerator program never holds it) the body's are rewritten first (snapjax/dispatch.py).
    body = dispatch.canonical_convolutions_on_cpu(train_step)

    def train_steps(state, images, labels, perm, num_steps, *frozen):
      return dispatch.run_steps(body, k, state, images, labels, perm, *frozen, num_steps=num_steps)

    counts = {}  # n -> the count on the devices, made once (a host scalar would be copied at every call).

    def args(state, step=None, n=1):
      assert 1 <= n <= k, (n, k)
      step = int(jax.device_get(state["step"])) if step is None else step
      if n not in counts:
        counts[n] = jax.device_put(np.int32(n), self._replicated)
      return state, self._images, self._labels, self.permutation(step), counts[n], *extra

    return AotUpdate(jax.jit(train_steps, donate_argnums=(0,)), args, k, self._num_devices)


class StreamedBatches:
  """Each host's tf.data batches, assembled into one global batch sharded over the data axis; one update per call.

  (A streamed step is long next to a dispatch, and stacking K host batches would hold K batches in device memory.)
  """
  steps_per_dispatch = 1
  period = None

  def __init__(self, stream: Iterator[dict[str, np.ndarray]], exp: Experiment):
    self._stream = stream
    self._sharding = NamedSharding(exp.mesh, P(DATA_AXIS))
    self._dtype = exp.compute_dtype
    self._num_devices = exp.mesh.devices.size

  def compile(self, step_fn: StepFn, frozen: PyTree = None) -> AotUpdate:
    dtype = self._dtype
    extra = () if frozen is None else (frozen,)

    def train_step(state, x, y, *frozen):
      return step_fn(state, x.astype(dtype), y, *frozen)

    def args(state, step=None, n=1):
      del step
      assert n == 1, n
      b = next(self._stream)
      return (state, jax.make_array_from_process_local_data(self._sharding, b["image"]),
              jax.make_array_from_process_local_data(self._sharding, b["label"]), *extra)

    return AotUpdate(jax.jit(train_step, donate_argnums=(0,)), args, 1, self._num_devices)
