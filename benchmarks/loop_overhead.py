"""Per-step overhead of training: the in-memory batch draw, and the loop around the compiled step.

  python benchmarks/loop_overhead.py [--part draw,loop,quickstart] [--repeats 5] [--steps 10000] [--ks 1,4,16]

draw: one step's batch draw with the data order (a permutation of the device's shard) computed in every step, as
  before, against once per epoch, as now, for shards of 10,000 (the quickstart) and 50,000 examples (CIFAR on one
  device); then the quickstart's whole train step both ways (ResNet-8, batch 128).
loop: steps/s of the real training loop (snapjax.training.train_and_evaluate: checks, logging, preemption) against a
  bare Python loop calling the same compiled update, on a model so small that device work is negligible (a linear
  layer on 28x28 images, batch 8: the regime of a fast accelerator), for config.steps_per_dispatch K in --ks.
quickstart: the quickstart's compiled update (ResNet-8, batch 128, device-bound on this CPU) with each K of --ks
  (and 1) steps per dispatch, --quickstart_steps steps each.

Every variant runs round-robin within one process (repeat r of each before repeat r + 1), so load from other processes
hits them alike; tables give the median and the min-max of --repeats repeats, and the load average.
"""
import argparse
import functools
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # This checkout's snapjax and configs.

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from snapjax import config as config_lib, data, experiment, models, train_step, training  # noqa: E402


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--part", default="draw,loop,quickstart", help="comma-separated: draw, loop, quickstart")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats of every variant")
  p.add_argument("--steps", type=int, default=10_000, help="loop: updates per run (the first log_every are not timed)")
  p.add_argument("--log_every", type=int, default=1000, help="loop: config.log_every_steps of the training loop")
  p.add_argument("--ks", default="1,4,16", help="loop: comma-separated steps_per_dispatch values")
  p.add_argument("--draw_steps", type=int, default=50, help="draw: steps per timed repeat of a batch draw")
  p.add_argument("--step_steps", type=int, default=10, help="draw: steps per timed repeat of the quickstart step")
  p.add_argument("--quickstart_steps", type=int, default=48, help="quickstart: steps per timed repeat")
  p.add_argument("--fashion_mnist_dir", default=config_lib.base_config().fashion_mnist_dir,
                 help="raw Fashion-MNIST IDX files (the loop's data)")
  args = p.parse_args()
  for name in ("repeats", "steps", "log_every", "draw_steps", "step_steps", "quickstart_steps"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  return args


def _load() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _row(ts: list[float], unit: float = 1e3) -> str:
  return f"{statistics.median(ts) * unit:.2f} | {min(ts) * unit:.2f}-{max(ts) * unit:.2f}"


# ----------------------------------------------------------------------------- draw

def _old_batch_fn(mesh, spec, steps_per_epoch, batch_size, data_key, aug_key):
  """The draw before this change: every step permuted the whole shard to take its slice."""
  local_batch = batch_size // mesh.devices.size

  def local(images_l, labels_l, step):
    d = jax.lax.axis_index(experiment.DATA_AXIS)
    epoch, pos = step // steps_per_epoch, step % steps_per_epoch
    perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(data_key, epoch), d), images_l.shape[0])
    idx = jax.lax.dynamic_slice_in_dim(perm, pos * local_batch, local_batch)
    key = jax.random.fold_in(jax.random.fold_in(aug_key, step), d)
    return data.augment_batch(key, images_l[idx], spec, train=True), labels_l[idx]

  return jax.shard_map(local, mesh=mesh, in_specs=(P(experiment.DATA_AXIS), P(experiment.DATA_AXIS), P()),
                       out_specs=(P(experiment.DATA_AXIS), P(experiment.DATA_AXIS)))


def _time_calls(fn, steps: int) -> float:
  """Seconds per call of fn(step) for steps 1..steps, waiting for every result."""
  t0 = time.perf_counter()
  jax.block_until_ready([fn(s) for s in range(1, steps + 1)])
  return (time.perf_counter() - t0) / steps


def _time_steps(fn, state, steps: int) -> float:
  """Seconds per step of state = fn(state) (each step waits for the previous one's state)."""
  t0 = time.perf_counter()
  for _ in range(steps):
    state = fn(state)
  jax.block_until_ready(state)
  return (time.perf_counter() - t0) / steps


def run_draw(args) -> None:
  config = config_lib.base_config()
  config.update(model="resnet8", dataset="fashion_mnist", augment="none", batch_size=128)  # The quickstart's.
  exp = experiment.build(config)
  mesh, spec = exp.mesh, exp.spec
  data_key, aug_key = jax.random.split(jax.random.key(0))
  rng = np.random.default_rng(0)
  print(f"draw: {len(mesh.devices.flat)} device(s), batch {config.batch_size}, load average {_load()}", flush=True)
  draws, perms = {}, {}
  for n in (10_000, 50_000):
    steps_per_epoch = n // config.batch_size
    plan = train_step.Plan(steps_per_epoch, steps_per_epoch * 10, (steps_per_epoch * 10,))
    images = experiment.put_sharded(mesh, rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8))
    labels = experiment.put_sharded(mesh, rng.integers(0, 10, (n,), dtype=np.int32))
    old = jax.jit(_old_batch_fn(mesh, spec, steps_per_epoch, config.batch_size, data_key, aug_key))
    new = jax.jit(train_step.make_device_batch_fn(mesh, spec, plan, config.batch_size, aug_key))
    perm_fn = train_step.make_epoch_permutation_fn(mesh, data_key, n)
    perm = perm_fn(np.int32(0))
    for s in (0, 5, steps_per_epoch + 3):  # The same batches both ways, across an epoch's end too.
      p = perm if s < steps_per_epoch else perm_fn(np.int32(1))
      assert all(np.array_equal(a, b) for a, b in zip(old(images, labels, s), new(images, labels, p, s)))
    draws[f"{n:,}: permutation in every step (before)"] = functools.partial(old, images, labels)
    draws[f"{n:,}: permutation once per epoch (now)"] = functools.partial(new, images, labels, perm)
    perms[n] = (perm_fn, steps_per_epoch)
  times = {k: [] for k in draws}
  perm_times = {n: [] for n in perms}
  for r in range(args.repeats):
    for name, fn in draws.items():
      times[name].append(_time_calls(fn, args.draw_steps))
    for n, (perm_fn, _) in perms.items():
      perm_times[n].append(_time_calls(lambda e: perm_fn(np.int32(e)), 5))
    print(f"draw repeat {r + 1}/{args.repeats} done (load {_load()})", flush=True)

  print(f"\nBatch draw of one step (batch {config.batch_size} of 28x28x1 uint8, augment none), median of "
        f"{args.repeats} x {args.draw_steps} steps; load average {_load()}\n")
  print("| shard: draw | ms | min-max ms |")
  print("|---|---|---|")
  for name, ts in times.items():
    print(f"| {name}, per step | {_row(ts)} |")
  for n, ts in perm_times.items():
    spe = perms[n][1]
    print(f"| {n:,}: the epoch's permutation (now), once per {spe} steps | {_row(ts)} |")

  # The quickstart's whole step, both ways.
  spe = 10_000 // config.batch_size
  plan = train_step.Plan(spe, spe * 30, (spe * 30,))
  images = experiment.put_sharded(mesh, rng.integers(0, 256, (10_000, 28, 28, 1), dtype=np.uint8))
  labels = experiment.put_sharded(mesh, rng.integers(0, 10, (10_000,), dtype=np.int32))
  schedule = train_step.make_schedule(config, plan.total_steps)
  tx = train_step.make_optimizer(config, schedule)
  step_fn = train_step.make_train_step(exp.model, tx, schedule, jax.random.key(3))
  state0 = jax.jit(functools.partial(train_step.init_state, exp, tx))(jax.random.key(1))
  old_draw = _old_batch_fn(mesh, spec, spe, config.batch_size, data_key, aug_key)
  new_draw = train_step.make_device_batch_fn(mesh, spec, plan, config.batch_size, aug_key)
  perm = train_step.make_epoch_permutation_fn(mesh, data_key, 10_000)(np.int32(0))
  old_step = jax.jit(lambda s: step_fn(s, *old_draw(images, labels, s["step"]))[0])
  new_step = jax.jit(lambda s: step_fn(s, *new_draw(images, labels, perm, s["step"]))[0])
  steps = {"quickstart step, permutation in every step (before)": old_step,
           "quickstart step, permutation once per epoch (now)": new_step}
  step_times = {k: [] for k in steps}
  for fn in steps.values():
    jax.block_until_ready(fn(state0))
  for r in range(args.repeats):
    for name, fn in steps.items():
      step_times[name].append(_time_steps(fn, state0, args.step_steps))
    print(f"step repeat {r + 1}/{args.repeats} done (load {_load()})", flush=True)
  print(f"\nThe quickstart's train step (ResNet-8, batch 128, 10,000-example shard), median of {args.repeats} x "
        f"{args.step_steps} steps; load average {_load()}\n")
  print("| step | ms / step | min-max ms |")
  print("|---|---|---|")
  for name, ts in step_times.items():
    print(f"| {name} | {_row(ts)} |")


# ----------------------------------------------------------------------------- loop

class TinyLinear(nn.Module):
  """Logistic regression on flattened images: device work far below the cost of a dispatch."""
  num_classes: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return nn.Dense(self.num_classes, dtype=self.dtype)(x.reshape(x.shape[0], -1))


def _loop_config(args, k: int):
  c = config_lib.base_config()
  c.update(model="tiny_linear", dataset="fashion_mnist", fashion_mnist_dir=args.fashion_mnist_dir,
           train_split="train[:10000]", augment="none", batch_size=8, num_cycles=1, eval_snapshots=False,
           log_every_steps=args.log_every, checkpoint_every_steps=10**9, steps_per_dispatch=k)
  c.num_epochs = args.steps / (10_000 // c.batch_size)
  return c


def _real_loop(args, k: int) -> float:
  """Steps/s of train_and_evaluate from its first log step to the last one before the end.

  The clock is Hooks.stop_at, which the loop asks about every update of a dispatch once the dispatch is done with: at
  a log step that is after the loop has waited for the device (it checks every update before logging), so both ends
  of the window are points where the device has caught up with the host.
  """
  seen = {}
  log_every = _loop_config(args, k).log_every_steps

  def clock(step):
    if step % log_every == 0:
      seen.setdefault(step, time.perf_counter())
    return False

  with tempfile.TemporaryDirectory() as workdir:
    result = training.train_and_evaluate(_loop_config(args, k), workdir, hooks=training.Hooks(stop_at=clock))
  start = min(seen)
  end = max(s for s in seen if s < result.step)
  return (end - start) / (seen[end] - seen[start])


def _bare_loop(args, k: int, cache: dict) -> float:
  """Steps/s of a Python loop calling the batch source's compiled update (the loop's own call) k steps at a time,
  over the training loop's window (log_every to the last log step before the end), waiting for the device at both
  ends. (It does not end dispatches at epoch ends: the same work.)"""
  if k not in cache:
    c = _loop_config(args, k)
    exp = experiment.build(c)
    arrays = exp.load_split(c.train_split)
    plan = train_step.make_plan(c, len(arrays[1]))
    schedule = train_step.make_schedule(c, plan.total_steps)
    tx = train_step.make_optimizer(c, schedule)
    init_key, data_key, aug_key, dropout_key = jax.random.split(jax.random.PRNGKey(c.seed), 4)
    source = train_step.InMemoryBatches(exp, arrays, plan, data_key, aug_key, k)
    update = source.compile(train_step.make_train_step(exp.model, tx, schedule, dropout_key))
    init = jax.jit(functools.partial(train_step.init_state, exp, tx), out_shardings=exp.replicated)
    cache[k] = (init, init_key, update, plan)
  init, init_key, update, plan = cache[k]
  state = init(init_key)
  step, end = 0, (plan.total_steps - 1) // args.log_every * args.log_every
  while step < args.log_every:
    state, _ = update(state, step, min(k, args.log_every - step))
    step += min(k, args.log_every - step)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  while step < end:
    state, _ = update(state, step, min(k, end - step))
    step += min(k, end - step)
  jax.block_until_ready(state)
  return (end - args.log_every) / (time.perf_counter() - t0)


def run_loop(args) -> None:
  models._REGISTRY["tiny_linear"] = (TinyLinear, {})  # pylint: disable=protected-access
  ks = [int(k) for k in args.ks.split(",")]
  print(f"loop: {len(jax.devices())} device(s), {args.steps} steps, load average {_load()}", flush=True)
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # The progress lines go to the console.
  variants = {}
  for k in ks:
    variants[f"bare loop, K={k}"] = functools.partial(_bare_loop, args, k, {})
    variants[f"training loop, K={k}"] = functools.partial(_real_loop, args, k)
  rates = {name: [] for name in variants}
  for r in range(args.repeats):
    for name, fn in variants.items():
      rates[name].append(fn())
    print(f"loop repeat {r + 1}/{args.repeats} done (load {_load()})", flush=True)
  base = statistics.median(rates[f"bare loop, K={ks[0]}"])
  print(f"\nSteps/s of a linear model on 28x28x1, batch 8 (device work negligible), steps {args.log_every} to "
        f"{(args.steps - 1) // args.log_every * args.log_every} of {args.steps}, log_every_steps={args.log_every}, "
        f"median of {args.repeats}; jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{platform.processor() or platform.machine()}; load average {_load()}\n")
  print(f"| loop | steps/s | min-max | vs bare loop with the same K | vs bare loop, K={ks[0]} |")
  print("|---|---|---|---|---|")
  for name, rs in rates.items():
    k = name.split("K=")[1]
    same = statistics.median(rates[f"bare loop, K={k}"])
    med = statistics.median(rs)
    print(f"| {name} | {med:.0f} | {min(rs):.0f}-{max(rs):.0f} | {med / same:.3f}x | {med / base:.2f}x |")


def run_quickstart(args) -> None:
  from configs import quickstart
  c = quickstart.get_config()
  c.fashion_mnist_dir = args.fashion_mnist_dir
  exp = experiment.build(c)
  arrays = exp.load_split(c.train_split)
  plan = train_step.make_plan(c, len(arrays[1]))
  schedule = train_step.make_schedule(c, plan.total_steps)
  tx = train_step.make_optimizer(c, schedule)
  init_key, data_key, aug_key, dropout_key = jax.random.split(jax.random.PRNGKey(c.seed), 4)
  init = jax.jit(functools.partial(train_step.init_state, exp, tx), out_shardings=exp.replicated)
  ks = sorted({1, *(int(k) for k in args.ks.split(","))})
  updates = {}
  for k in ks:
    source = train_step.InMemoryBatches(exp, arrays, plan, data_key, aug_key, k)
    updates[k] = source.compile(train_step.make_train_step(exp.model, tx, schedule, dropout_key))
  print(f"quickstart: {len(jax.devices())} device(s), load average {_load()}", flush=True)

  def run(k):  # args.quickstart_steps steps from step k (the first dispatch, compiling, is not timed).
    state, _ = updates[k](init(init_key), 0, k)
    jax.block_until_ready(state)
    t0, step = time.perf_counter(), k
    while step < k + args.quickstart_steps:
      n = min(k, k + args.quickstart_steps - step, (step // plan.steps_per_epoch + 1) * plan.steps_per_epoch - step)
      state, _ = updates[k](state, step, n)
      step += n
    jax.block_until_ready(state)
    return (time.perf_counter() - t0) / args.quickstart_steps

  times = {k: [] for k in ks}
  for r in range(args.repeats):
    for k in ks:
      times[k].append(run(k))
    print(f"quickstart repeat {r + 1}/{args.repeats} done (load {_load()})", flush=True)
  print(f"\nThe quickstart's compiled update (ResNet-8, batch 128), {args.quickstart_steps} steps per repeat, median of "
        f"{args.repeats}; load average {_load()}\n")
  print("| steps per dispatch | ms / step | min-max ms | vs K=1 |")
  print("|---|---|---|---|")
  for k, ts in times.items():
    print(f"| K={k} | {_row(ts)} | {statistics.median(times[1]) / statistics.median(ts):.2f}x |")


def main() -> None:
  args = _parse()
  parts = {p.strip() for p in args.part.split(",") if p.strip()}
  if not parts <= {"draw", "loop", "quickstart"}:
    raise SystemExit(f"error: --part={args.part!r}; allowed: draw, loop, quickstart")
  print(f"uptime load average at start: {_load()}", flush=True)
  if "draw" in parts:
    run_draw(args)
  if "loop" in parts:
    run_loop(args)
  if "quickstart" in parts:
    run_quickstart(args)


if __name__ == "__main__":
  main()
