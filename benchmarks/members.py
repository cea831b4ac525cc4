"""Training images/s of K ensemble members side by side (snapjax/members.py) vs K one-member runs one after another.

  python benchmarks/members.py [--devices 4] [--members 1,2,4,8] [--strategies loop,map,vmap] [--batch 128] \
      [--steps 3] [--repeats 3] [--model resnet20] [--groups 1,4] [--dispatch 1,16]

Every row trains K ResNet-20s (batch 128 each, random CIFAR-10-shaped data held on the devices, the real
update: augmentation, SGD with momentum and weight decay) for --steps updates per timed repeat and reports the
median. "sequential" is the 1-member program (train_step.InMemoryBatches, exactly what a K = 1 run compiles) run
K times over: its total images/s is the K = 1 row's whatever K is. Each placement is a member_groups G (size of
the "member" mesh axis, divisors of gcd(K, D)) and a strategy within a group ("loop": unrolled, the default;
"map": lax.map; "vmap"). --dispatch N adds, for each member row, the same update with up to N loop steps per
compiled call (config.steps_per_dispatch; one row per N, timed over a multiple of N updates).
On CPU the --devices fake devices share the machine's cores, so the table mostly shows the overhead of the
member axis, not the speed-up a K-device GPU host would give.
"""
import argparse
import os
import statistics
import sys
import time


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, default=4, help="fake CPU devices (XLA flag, set before JAX starts)")
  p.add_argument("--members", default="1,2,4,8", help="comma-separated K values")
  p.add_argument("--strategies", default="loop", help="comma-separated: loop, map, vmap")
  p.add_argument("--groups", default="", help="comma-separated member_groups to try (default: every one that fits)")
  p.add_argument("--batch", type=int, default=128, help="batch size of each member")
  p.add_argument("--steps", type=int, default=3, help="updates per timed repeat")
  p.add_argument("--repeats", type=int, default=3, help="timed repeats per row (after a compile warm-up)")
  p.add_argument("--model", default="resnet20")
  p.add_argument("--dispatch", default="1", help="comma-separated steps_per_dispatch of the member rows (1, 16, ...)")
  args = p.parse_args()
  for name in ("devices", "batch", "steps", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1")
  return args


def random_split(n: int, image_size: int = 32, seed: int = 0):
  """n random CIFAR-10-shaped training examples: (uint8 images n x H x W x 3, int32 labels in 0..9)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8),
          rng.integers(0, 10, n).astype(np.int32))


def one_member_update(exp, tx, schedule, arrays, plan, steps_per_dispatch: int = 1):
  """(update, fresh state) of the 1-member program exactly as a K = 1 run compiles it (train_step.InMemoryBatches).

  update(state, step, n) runs n <= steps_per_dispatch updates (dispatch.run_steps when steps_per_dispatch > 1).
  """
  import jax
  from snapjax import train_step
  init_key, data_key, aug_key, dropout_key = jax.random.split(jax.random.PRNGKey(0), 4)
  state = jax.jit(lambda k: train_step.init_state(exp, tx, k), out_shardings=exp.replicated)(init_key)
  step_fn = train_step.make_train_step(exp.model, tx, schedule, dropout_key, num_shards=exp.mesh.devices.size)
  batches = train_step.InMemoryBatches(exp, arrays, plan, data_key, aug_key, steps_per_dispatch)
  return batches.compile(step_fn), state


def member_update(exp, tx, schedule, arrays, plan, config, steps_per_dispatch: int = 1):
  """(update, fresh stacked state) of the K-member program of `config` (num_members, member_groups, member_strategy)
  as a member run compiles it (members.MemberBatches); update(state, done, n) runs n loop steps after `done`."""
  import jax
  from snapjax import members, train_step
  num_devices = jax.device_count()
  mp = members.make_member_plan(config, plan, num_devices)
  mesh = members.member_mesh(mp.groups)
  keys = members.member_keys(mp)
  make_step = lambda dk: train_step.make_train_step(exp.model, tx, schedule, dk, num_shards=num_devices)  # noqa: E731
  update = members.MemberBatches(exp, mesh, arrays, plan, mp, keys, steps_per_dispatch).compile(make_step)
  return update, members.make_init(exp, tx, mp, mesh)(keys["init"])


def main() -> None:
  args = _parse()
  if "jax" not in sys.modules:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={args.devices}"])
  import jax
  from snapjax import config as config_lib, experiment, train_step

  if jax.default_backend() == "cpu" and jax.device_count() != args.devices:
    raise SystemExit(f"error: JAX has {jax.device_count()} devices, not --devices={args.devices}")
  num_devices = jax.device_count()
  config = config_lib.base_config()
  config.model, config.dataset, config.batch_size, config.init_lr = args.model, "cifar10", args.batch, 0.1
  dispatches = [int(v) for v in args.dispatch.split(",") if v]
  arrays = random_split(args.batch * max(16, *dispatches))  # One epoch holds a whole dispatch of the longest kind.
  n = len(arrays[1])
  plan = train_step.Plan(steps_per_epoch=n // args.batch, total_steps=10 ** 6, snapshot_steps=(10 ** 6,))
  schedule = train_step.make_schedule(config, plan.total_steps)
  tx = train_step.make_optimizer(config, schedule)

  def timed(update, state, per_call=1):
    """Seconds per update: update(state, done, n) runs n = per_call updates after `done` (a warm-up call first)."""
    calls = max(1, -(-args.steps // per_call))
    done = 0
    t0 = time.perf_counter()
    state, metrics = update(state, done, per_call)
    done += per_call
    jax.block_until_ready(metrics)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      for _ in range(calls):
        state, metrics = update(state, done, per_call)
        done += per_call
      jax.block_until_ready(metrics)
      times.append((time.perf_counter() - t0) / (calls * per_call))
    return statistics.median(times), min(times), max(times), warm

  rows = []
  exp = experiment.build(config)
  single, state = one_member_update(exp, tx, schedule, arrays, plan)
  med1, lo1, hi1, warm1 = timed(single, state)
  rate1 = args.batch / med1
  print(f"K=1 one-member program: {med1:.3f} s/step, {rate1:.0f} img/s (compile+first step {warm1:.1f} s)", flush=True)
  for k in [int(v) for v in args.members.split(",") if v]:
    rows.append((k, "sequential: K one-member runs", k * med1, k * args.batch / (k * med1), 1.0, f"{k * lo1:.3f}-"
                 f"{k * hi1:.3f}", warm1))
    if k == 1:
      continue
    config.num_members = k
    fits = config_lib.member_group_choices(config, num_devices)
    groups = [g for g in ([int(v) for v in args.groups.split(",") if v] or fits) if g in fits]
    for g in groups:
      for strategy in [s for s in args.strategies.split(",") if s]:
        config.member_groups, config.member_strategy = g, strategy
        for per_call in dispatches:
          update, mstate = member_update(exp, tx, schedule, arrays, plan, config, per_call)
          med, lo, hi, warm = timed(update, mstate, per_call)
          rate = k * args.batch / med
          rows.append((k, f"members: G={g} x {num_devices // g} data, {strategy}, {per_call}/dispatch", med, rate,
                       rate / rate1, f"{lo:.3f}-{hi:.3f}", warm))
          print(f"K={k} G={g} {strategy} {per_call}/dispatch: {med:.3f} s/step, {rate:.0f} img/s", flush=True)
          del mstate, update
  print(f"\n{args.model}, batch {args.batch} per member, {num_devices} {jax.devices()[0].platform} device(s), "
        f"jax {jax.__version__}; median of {args.repeats} x {args.steps} updates\n")
  print("| K | placement | s / step (all members) | total images/s | vs K one-member runs | min-max s | warm-up s |")
  print("|---|---|---|---|---|---|---|")
  for k, name, med, rate, speed, spread, warm in rows:
    print(f"| {k} | {name} | {med:.3f} | {rate:.0f} | {speed:.2f}x | {spread} | {warm:.1f} |")


if __name__ == "__main__":
  main()
