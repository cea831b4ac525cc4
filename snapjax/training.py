"""Snapshot Ensemble training: a sharded, jitted SGD step over every device, snapshots at cycle ends."""
import contextlib
import dataclasses
import functools
import signal
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from snapjax import checkpoints, data, ensemble, models, schedules
from snapjax import config as config_lib
from snapjax.errors import CheckpointError, ConfigError

PyTree = Any
DATA_AXIS = "data"


class TrainingDiverged(RuntimeError):
  """The loss or gradient became non-finite; nothing after the last good save was kept."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """Step counts derived once from the config (epochs) and the dataset size: the loop deals in steps."""
  steps_per_epoch: int
  total_steps: int
  snapshot_steps: tuple[int, ...]


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """1-D data-parallel mesh over every device of every host (axis 'data')."""
  devices = devices if devices is not None else jax.devices()
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


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
    else:
      snaps = schedules.nocycle_snapshot_steps(total, config.num_cycles)
    make_schedule(config, total)  # Checks the budget against the schedule's own rules.
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(
        f"num_epochs={config.num_epochs} ({steps_per_epoch} steps/epoch) and num_cycles={config.num_cycles} "
        f"do not fit: {e}") from e
  return Plan(steps_per_epoch, total, tuple(snaps))


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """The config's learning-rate schedule over total_steps updates (paper Eq. 2, or the step baseline)."""
  if config.schedule == "cosine_cycles":
    return schedules.snapshot_schedule(config.init_lr, total_steps, config.num_cycles)
  return schedules.step_schedule(config.init_lr, total_steps)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and L2 weight decay added to the gradient (paper's reference code)."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(learning_rate=schedule, momentum=config.momentum, nesterov=config.nesterov))


def make_model(config: ml_collections.ConfigDict, num_classes: int):
  kwargs = {"dtype": jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32}
  if config.stem_stride != 1:
    kwargs["stem_stride"] = config.stem_stride
  if config.dropout_rate:
    kwargs["dropout_rate"] = config.dropout_rate
  try:
    return models.get(config.model, num_classes, **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model={config.model!r} does not accept these options ({e})") from e


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxC.astype(jnp.float32), labels_B)


def init_state(model, tx: optax.GradientTransformation, rng: jax.Array, input_shape: tuple[int, ...]) -> PyTree:
  """Train state {step, params, batch_stats, opt_state} for one example shape (H, W, C)."""
  variables = model.init({"params": rng, "dropout": rng}, jnp.zeros((1, *input_shape), jnp.float32), train=False)
  params = variables["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "batch_stats": variables.get("batch_stats", {}), "opt_state": tx.init(params)}


def make_train_step(model, tx, schedule, dropout_key: jax.Array) -> Callable:
  """One SGD update on a global batch: (state, x, y) -> (state, metrics). Shardings come from jit."""

  def step_fn(state, x_BxHxWxC, labels_B):
    step = state["step"]
    rng = jax.random.fold_in(dropout_key, step)

    def loss_fn(params):
      logits, new_vars = model.apply(
          {"params": params, "batch_stats": state["batch_stats"]}, x_BxHxWxC, train=True,
          mutable=["batch_stats"], rngs={"dropout": rng})
      return cross_entropy(logits, labels_B).mean(), (logits, new_vars)

    (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    grad_norm = optax.tree.norm(grads)
    new_state = {"step": step + 1, "params": optax.apply_updates(state["params"], updates),
                 "batch_stats": new_vars.get("batch_stats", {}), "opt_state": opt_state}
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels_B),
               "lr": schedule(step), "grad_norm": grad_norm,
               "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    return new_state, metrics

  return step_fn


def make_device_batch_fn(mesh, spec: data.DatasetSpec, plan: Plan, batch_size: int,
                         data_key: jax.Array, aug_key: jax.Array) -> Callable:
  """(images, labels, step) -> augmented global batch, drawn on each device from its own shard.

  Every device reshuffles its shard each epoch (a permutation keyed by seed, epoch and device) and
  augments its slice, so the host does no per-step work.
  """
  local_batch = batch_size // mesh.devices.size

  def local(images_l, labels_l, step):
    d = jax.lax.axis_index(DATA_AXIS)
    epoch, pos = step // plan.steps_per_epoch, step % plan.steps_per_epoch
    perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(data_key, epoch), d), images_l.shape[0])
    idx = jax.lax.dynamic_slice_in_dim(perm, pos * local_batch, local_batch)
    key = jax.random.fold_in(jax.random.fold_in(aug_key, step), d)
    return data.augment_batch(key, images_l[idx], spec, train=True), labels_l[idx]

  return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS), P()),
                       out_specs=(P(DATA_AXIS), P(DATA_AXIS)))


def put_sharded(mesh, array: np.ndarray) -> jax.Array:
  """Place a host array (the same on every host) on the mesh, split along axis 0."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def make_eval_fn(model, cast_dtype) -> Callable:
  """Jitted (variables, x, y, mask) -> (errors, nll_sum, count) for one model."""

  @jax.jit
  def eval_fn(variables, x, labels, mask):
    probs = jax.nn.softmax(model.apply(variables, x.astype(cast_dtype), train=False).astype(jnp.float32), -1)
    return ensemble.counts(probs, labels, mask)

  return eval_fn


def eval_batches_on_mesh(mesh, spec, images, labels, batch_size) -> Iterator[tuple[jax.Array, ...]]:
  """Exact evaluation batches (padded, masked), normalised on device and sharded over the mesh."""
  n = mesh.devices.size
  batch_size = -(-batch_size // n) * n
  norm = jax.jit(functools.partial(data.normalize, spec=spec))
  for x, y, mask in data.eval_batches(images, labels, batch_size):
    yield norm(put_sharded(mesh, x)), put_sharded(mesh, y), put_sharded(mesh, mask)


def evaluate(eval_fn, variables, batches) -> dict[str, float]:
  """Test error and NLL of one model over every example of the split."""
  totals = np.zeros(3, np.float64)
  for x, y, mask in batches:
    totals += np.asarray(jax.device_get(eval_fn(variables, x, y, mask)), np.float64)
  errors, nll_sum, count = totals
  return {"error": float(errors / count), "nll": float(nll_sum / count), "count": int(count)}


class _Preemption:
  """Turns a preemption notice (SIGTERM on Cloud TPU / spot VMs) into a stop every host takes at the same step.

  One process: a SIGTERM handler sets a flag the loop polls. Several processes: JAX's distributed runtime
  catches SIGTERM itself and its preemption sync manager picks one step for every host
  (multihost_utils.reached_preemption_sync_point, called at every step). A Python handler would replace the
  runtime's and a host stopping alone hangs the others in their next collective, so none is installed then.
  If the runtime's service is off (jax_enable_preemption_service=False), each host keeps its own flag and the
  hosts agree every AGREE_EVERY steps with an allgather of the flags.
  """
  AGREE_EVERY = 10

  def __init__(self):
    self.requested = False
    self._previous = None
    self._sync_manager = False

  def __enter__(self):
    """One process: catch SIGTERM from the start, so a notice during set-up or compilation is kept too."""
    if jax.process_count() == 1:
      self._install_handler()
    return self

  def begin(self, start: int) -> contextlib.AbstractContextManager:
    """Called once before the first step (several processes: registers the start step with JAX's service)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:  # Registers the start step, so a notice that arrives before the first step picks a later one.
        self.requested = multihost_utils.reached_preemption_sync_point(start)
        self._sync_manager = True
      except RuntimeError:  # The preemption service is disabled: fall back to flags and an allgather.
        self._install_handler()
    return contextlib.nullcontext(self)

  def _install_handler(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: no handler, the loop never sees a request.
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    if self._sync_manager:
      return self.requested or multihost_utils.reached_preemption_sync_point(step)
    if step % self.AGREE_EVERY:
      return False
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))


def _check_workdir(workdir: str, config_dict: dict[str, Any]) -> None:
  saved = checkpoints.read_config(workdir)
  if saved is None:
    return
  diff = checkpoints.config_differences(saved, config_dict)
  if diff:
    shown = ", ".join(f"{k}: {saved.get(k)!r} -> {config_dict.get(k)!r}" for k in diff)
    raise CheckpointError(
        f"workdir {workdir!r} holds a run with a different config ({shown}); use another --workdir, "
        f"or pass --fresh to move the old run aside and start again")


def dataset_spec(config: ml_collections.ConfigDict) -> data.DatasetSpec:
  """The dataset's spec, with the config's augmentation override."""
  spec = data.get_spec(config.dataset)
  return dataclasses.replace(spec, augment=config.augment) if config.augment else spec


def load_split(config: ml_collections.ConfigDict, spec: data.DatasetSpec, split: str):
  """(images, labels) of an in-memory dataset's split, from the paths in the config."""
  return data.load_arrays(spec, split, data_dir=config.data_dir or None,
                          fashion_mnist_dir=config.fashion_mnist_dir or None,
                          tiny_imagenet_dir=config.tiny_imagenet_dir or None)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False) -> dict[str, Any]:
  """Train a Snapshot Ensemble (resuming from workdir if it holds this run), save and score snapshots.

  Every check of the user's input (config, workdir, data) runs before anything is written or compiled;
  fresh=True moves an existing run aside (after those checks) instead of refusing a different config.
  A preemption notice (SIGTERM) at any point saves the state after the next step and returns.
  """
  with _Preemption() as preemption:
    return _train_and_evaluate(config, workdir, fresh, preemption)


def _train_and_evaluate(config, workdir, fresh, preemption) -> dict[str, Any]:
  num_devices = jax.device_count()
  config_lib.validate(config, num_devices)
  config_dict = config_lib.to_dict(config)
  if not fresh:
    _check_workdir(workdir, config_dict)
  spec = dataset_spec(config)
  model = make_model(config, spec.num_classes)

  # Data (host side, before any compilation: a missing file is a user error, not a crash).
  train_split = config.train_split or spec.train_split
  train_arrays = load_split(config, spec, train_split) if spec.in_memory else None
  test_images, test_labels = load_split(config, spec, spec.eval_split) if spec.in_memory else (None, None)
  if not spec.in_memory:  # Opening the test stream checks that the TFDS data is prepared.
    data.make_stream(spec, spec.eval_split, batch_size_per_host=1, data_dir=config.data_dir or None,
                     train=False, seed=0, image_size=config.image_size)
  num_train = len(train_arrays[1]) if train_arrays is not None else spec.num_train
  plan = make_plan(config, num_train)
  schedule = make_schedule(config, plan.total_steps)
  tx = make_optimizer(config, schedule)
  if fresh:
    _start_fresh(workdir)
  checkpoints.write_config(workdir, config_dict)

  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  root = jax.random.PRNGKey(config.seed)
  init_key, data_key, aug_key, dropout_key = jax.random.split(root, 4)
  input_shape = spec.image_shape if spec.in_memory else (config.image_size, config.image_size, spec.image_shape[-1])
  state = jax.jit(functools.partial(init_state, model, tx, input_shape=input_shape),
                  out_shardings=replicated)(init_key)
  ckpt = checkpoints.RunCheckpoints(workdir)
  writer = _make_writer(workdir)
  try:
    start = ckpt.latest_state_step()
    if start is not None:
      state = ckpt.restore_state(start, checkpoints.abstract_like(state, replicated))
      logging.info("Resumed from step %d of %d in %s", start, plan.total_steps, workdir)
    start = int(jax.device_get(state["step"]))
    _check_snapshots(ckpt, plan, start, state)

    compute_dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    step_fn = make_train_step(model, tx, schedule, dropout_key)
    if spec.in_memory:
      images = put_sharded(mesh, _trim(train_arrays[0], num_devices))
      labels = put_sharded(mesh, _trim(train_arrays[1], num_devices))
      del train_arrays
      batch_fn = make_device_batch_fn(mesh, spec, plan, config.batch_size, data_key, aug_key)

      def fused(state, images, labels):
        x, y = batch_fn(images, labels, state["step"])
        return step_fn(state, x.astype(compute_dtype), y)

      train_step = jax.jit(fused, donate_argnums=(0,))
      next_inputs = lambda: (images, labels)  # noqa: E731
    else:
      stream = data.make_stream(
          spec, train_split, batch_size_per_host=config.batch_size // jax.process_count(),
          data_dir=config.data_dir or None, train=True, seed=config.seed + start, image_size=config.image_size)
      # A resumed stream is reseeded by the resume step: it does not replay the batches already seen, but
      # (unlike the in-memory path) its order is not the one an uninterrupted run would have had.
      stream = iter(stream)
      batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
      train_step = jax.jit(lambda s, x, y: step_fn(s, x.astype(compute_dtype), y), donate_argnums=(0,))

      def next_inputs():
        b = next(stream)
        return (jax.make_array_from_process_local_data(batch_sharding, b["image"]),
                jax.make_array_from_process_local_data(batch_sharding, b["label"]))

    eval_fn = make_eval_fn(model, compute_dtype)
    test_arrays = (test_images, test_labels) if spec.in_memory else None
    eval_batches = functools.partial(iter_test_batches, config, spec, mesh, config.eval_batch_size, test_arrays)
    snapshot_steps = set(plan.snapshot_steps)
    scores = []
    pending = None  # (step, metrics) of the previous step, pulled after the next step is dispatched.
    window = _Window(time.time(), start)
    with preemption.begin(start):
      for step in range(start, plan.total_steps):
        state, metrics = train_step(state, *next_inputs())
        done = step + 1
        if pending is not None:
          _check_finite(pending, ckpt)
        pending = (done, metrics)
        must_save = done in snapshot_steps or done % config.checkpoint_every_steps == 0 or done == plan.total_steps
        if must_save or done % config.log_every_steps == 0:
          _check_finite(pending, ckpt)
          pending = None
        if done % config.log_every_steps == 0:
          _log_progress(writer, done, metrics, plan, config.batch_size, window)
        if done in snapshot_steps:
          variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
          cycle = sorted(snapshot_steps).index(done) + 1
          meta = {"step": done, "cycle": cycle, "epoch": done / plan.steps_per_epoch}
          if config.eval_snapshots:  # Scored before its save starts, so the score lands in its metadata.
            s = evaluate(eval_fn, variables, eval_batches())
            scores.append({"step": done, **s})
            meta.update(test_error=s["error"], test_nll=s["nll"])
            logging.info("Snapshot %d/%d at step %d: test error %.4f, NLL %.4f", cycle, len(snapshot_steps),
                         done, s["error"], s["nll"])
            writer.write_scalars(done, {"snapshot/error": s["error"], "snapshot/nll": s["nll"]})
          if done not in ckpt.snapshot_steps():
            ckpt.save_snapshot(done, variables, meta)
        if must_save:
          ckpt.save_state(done, state)
        if preemption.should_stop(done) and done < plan.total_steps:
          if pending is not None:
            _check_finite(pending, ckpt)
          if not must_save:
            ckpt.save_state(done, state)
          ckpt.wait()
          logging.warning("Preempted: state saved at step %d of %d; re-run the same command to resume.",
                          done, plan.total_steps)
          return {"preempted": True, "step": done, "snapshot_scores": scores}
      if pending is not None:
        _check_finite(pending, ckpt)
      ckpt.wait()  # Still under the SIGTERM handler: a notice now cannot cut the final saves.
    return {"preempted": False, "step": plan.total_steps, "snapshot_steps": list(plan.snapshot_steps),
            "snapshot_scores": scores}
  finally:
    ckpt.wait()
    ckpt.close()
    writer.flush()


def iter_test_batches(config, spec, mesh, batch_size, arrays=None):
  """Exact (padded, masked) test batches sharded over the mesh: in-memory arrays or a tf.data stream."""
  if spec.in_memory:
    images, labels = arrays if arrays is not None else load_split(config, spec, spec.eval_split)
    yield from eval_batches_on_mesh(mesh, spec, images, labels, batch_size)
    return
  n = mesh.devices.size
  per_host = -(-batch_size // n) * n // jax.process_count()
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  for b in data.make_stream(spec, spec.eval_split, batch_size_per_host=per_host, data_dir=config.data_dir or None,
                            train=False, seed=0, image_size=config.image_size):
    yield tuple(jax.make_array_from_process_local_data(sharding, b[k]) for k in ("image", "label", "mask"))


def _trim(array: np.ndarray, num_devices: int) -> np.ndarray:
  """Drop the few examples that do not split evenly over the devices (training only)."""
  return array[: len(array) // num_devices * num_devices]


def _check_snapshots(ckpt: checkpoints.RunCheckpoints, plan: Plan, start: int, state: PyTree) -> None:
  """Every snapshot up to the resumed step exists; the one at the resumed step is re-saved if its save was cut."""
  saved = set(ckpt.snapshot_steps())
  for s in plan.snapshot_steps:
    if s > start or s in saved:
      continue
    if s == start:  # Killed after the state save committed but before the snapshot's: the state has it.
      ckpt.save_snapshot(s, {"params": state["params"], "batch_stats": state["batch_stats"]},
                         {"step": s, "cycle": plan.snapshot_steps.index(s) + 1, "epoch": s / plan.steps_per_epoch})
      logging.warning("Snapshot at step %d was missing; re-saved it from the train state.", s)
    else:
      raise CheckpointError(
          f"snapshot at step {s} is missing from {ckpt.workdir}/snapshots but the run resumed at step {start}; "
          f"pass --fresh to retrain")


@dataclasses.dataclass
class _Window:
  """Wall-clock window for images/s and ETA."""
  t0: float
  step0: int


def _check_finite(pending, ckpt: checkpoints.RunCheckpoints) -> None:
  """Raise TrainingDiverged if the step's loss or gradient was non-finite (pulls one scalar per step)."""
  step, metrics = pending
  if not bool(jax.device_get(metrics["finite"])):
    m = jax.device_get(metrics)
    ckpt.wait()  # Saves in flight (all of good steps) commit first, so the message names what is on disk.
    saved = ckpt.snapshot_steps()
    last = f"step {saved[-1]} ({ckpt.snapshot_path(saved[-1])})" if saved else "none"
    state_step = ckpt.latest_state_step()
    raise TrainingDiverged(
        f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, "
        f"grad_norm={float(m['grad_norm'])}, lr={float(m['lr']):.6g}); last good snapshot: {last}; "
        f"train state kept at step {state_step if state_step is not None else 'none'}")


def _log_progress(writer, step: int, metrics, plan: Plan, batch_size: int, window: _Window) -> None:
  m = jax.device_get(metrics)
  now = time.time()
  rate = (step - window.step0) / max(now - window.t0, 1e-9)
  eta = (plan.total_steps - step) / max(rate, 1e-9)
  logging.info("step %d/%d epoch %.2f loss %.4f acc %.3f lr %.5f %.0f img/s ETA %s", step, plan.total_steps,
               step / plan.steps_per_epoch, m["loss"], m["accuracy"], m["lr"], rate * batch_size,
               f"{int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
  writer.write_scalars(step, {"train/loss": float(m["loss"]), "train/accuracy": float(m["accuracy"]),
                              "train/lr": float(m["lr"]), "train/images_per_sec": rate * batch_size})
  window.t0, window.step0 = now, step


def _make_writer(workdir: str):
  from clu import metric_writers
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


def move_run_aside(workdir: str) -> str | None:
  """Rename an existing run's files into WORKDIR/previous-<time>/ (nothing is deleted); return that path."""
  root = checkpoints.run_path(workdir)
  if not root.is_dir() or jax.process_index() != 0:
    return None
  names = [p.name for p in root.iterdir() if p.name in (checkpoints.CONFIG_FILE, checkpoints.STATE_DIR,
                                                        checkpoints.SNAPSHOT_DIR, "eval")
           or p.name.startswith("events.out.tfevents")]
  if not names:
    return None
  dest = root / time.strftime("previous-%Y%m%d-%H%M%S")
  dest.mkdir()
  for n in sorted(names):
    (root / n).rename(dest / n)
  return str(dest)


def _start_fresh(workdir: str) -> None:
  """Move an existing run aside (process 0) and wait for every process, for --fresh."""
  moved = move_run_aside(workdir)
  if moved:
    logging.warning("Moved the previous run in %s to %s", workdir, moved)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("snapjax_fresh")


def main(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False) -> dict[str, Any]:
  """Entry point of train.py: validate, optionally move an old run aside, train, report."""
  config_lib.validate(config, jax.device_count())
  try:
    return train_and_evaluate(config, workdir, fresh=fresh)
  except TrainingDiverged as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None
