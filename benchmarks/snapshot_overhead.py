"""What taking snapshots costs a training run: scoring on the test split, CRC32 checksums and the orbax save.

  python benchmarks/snapshot_overhead.py [--part quickstart,paper] [--repeats 5] [--model resnet110]

quickstart (measured): a short run of configs/quickstart.py with 4 cycles of 39 steps (2 epochs), with its snapshots
  and with snapshot-taking switched off (the one-member trainee's take_snapshots replaced by a no-op; the train-state saves
  at the same steps stay), round-robin. Wall time from the end of the first step to the end of the run (every save
  committed); per-snapshot cost = the difference / 4; per-step cost = the run without snapshots / its steps. The
  quickstart's share = 5 snapshots over its 2,340 steps, from those two costs.
paper (projected): the per-step cost of the paper model (--model, CIFAR-shaped 32x32x3 data, batch 64) and the cost
  of one snapshot as the loop takes it (snapjax.train.one_member.OneMember.take_snapshots on --test_examples synthetic test images,
  then waiting for the save), then the share of 5 snapshots in 200 epochs of 781 steps (the paper's CIFAR budget).

All data are synthetic except the quickstart's (Fashion-MNIST's IDX files): costs do not depend on pixel values.
"""
import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # This checkout's snapjax and configs.

import jax  # noqa: E402
import numpy as np  # noqa: E402

from snapjax import checkpoints, config as config_lib, experiment, methods, train_step, training  # noqa: E402
from snapjax.train import loop, one_member, preemption, setup  # noqa: E402


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--part", default="quickstart,paper", help="comma-separated: quickstart, paper")
  p.add_argument("--repeats", type=int, default=5, help="runs of each variant (quickstart), snapshots (paper)")
  p.add_argument("--model", default="resnet110", help="paper: the model (a snapjax.models name)")
  p.add_argument("--test_examples", type=int, default=10_000, help="paper: test images scored per snapshot")
  p.add_argument("--step_repeats", type=int, default=5, help="paper: timed train steps")
  p.add_argument("--fashion_mnist_dir", default=None, help="quickstart: Fashion-MNIST IDX directory, if not the default")
  args = p.parse_args()
  for name in ("repeats", "test_examples", "step_repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1")
  return args


def _load() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _quickstart_config(args):
  from configs import quickstart
  return quickstart.get_config()


def _short_run(args, with_snapshots: bool) -> tuple[float, int, int, list[float]]:
  """Of the short quickstart run: seconds from the end of step 1 to the end of the run, steps timed, snapshots, and
  the seconds spent in each snapshot (OneMember.take_snapshots: scoring, CRC32, the save's start)."""
  c = _quickstart_config(args)
  c.num_epochs, c.num_cycles = 2.0, 4  # 156 steps, a snapshot every 39.
  if args.fashion_mnist_dir:
    c.fashion_mnist_dir = args.fashion_mnist_dir
  t = {}

  def clock(step):
    t.setdefault(step, time.perf_counter())
    return False

  spent = []

  class Timed(one_member.OneMember):  # The loop's own one-member trainee, its snapshots timed or left out.
    def take_snapshots(self, state, step):
      if not with_snapshots:
        return []
      t0 = time.perf_counter()
      scores = super().take_snapshots(state, step)
      spent.append(time.perf_counter() - t0)
      return scores

  with tempfile.TemporaryDirectory() as workdir:
    c.log_every_steps = 1  # The loop waits for step 1 before the clock starts.
    hooks = training.Hooks(stop_at=clock)
    with preemption.Preemption(hooks) as stop:  # What training.train_and_evaluate does, with the Timed trainee.
      run = setup.set_up(c, workdir, fresh=False)
      try:
        result = loop.train(run, Timed(run, hooks), stop, hooks)
      finally:
        run.close()
    end = time.perf_counter()  # run.close() waited for every save to commit.
  return end - t[1], result.step - 1, len(result.snapshot_steps), spent


def run_quickstart(args) -> None:
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  print(f"quickstart: load average {_load()}", flush=True)
  _short_run(args, True)  # Warm-up: file caches, XLA's own caches.
  runs = {True: [], False: []}
  for r in range(args.repeats):
    for with_snapshots in (True, False):
      runs[with_snapshots].append(_short_run(args, with_snapshots))
    print(f"repeat {r + 1}/{args.repeats} done (load {_load()})", flush=True)
  with_s = [r[0] for r in runs[True]]
  without = [r[0] for r in runs[False]]
  steps, snaps = runs[True][0][1], runs[True][0][2]
  per_snapshot = [(a - b) / snaps for a, b in zip(with_s, without)]  # Paired by repeat.
  in_loop = [x for r in runs[True] for x in r[3]]
  per_step = [b / steps for b in without]
  snap, step = statistics.median(per_snapshot), statistics.median(per_step)
  full_steps, full_snaps = 2340, 5
  print(f"\nQuickstart (ResNet-8, batch 128, 10,000 test images at eval batch 1,000), short run of {steps + 1} steps "
        f"with {snaps} snapshots, median of {args.repeats} (min-max); load average {_load()}\n")
  print("| quantity | median | min-max |")
  print("|---|---|---|")
  print(f"| short run with snapshots, s (steps 2-{steps + 1}) | {statistics.median(with_s):.1f} | "
        f"{min(with_s):.1f}-{max(with_s):.1f} |")
  print(f"| short run without snapshots, s | {statistics.median(without):.1f} | {min(without):.1f}-{max(without):.1f} |")
  print(f"| one snapshot (score, CRC32, save), s: run time difference / {snaps} | {snap:.2f} | "
        f"{min(per_snapshot):.2f}-{max(per_snapshot):.2f} |")
  print(f"| one snapshot, s: time in the loop's snapshot call ({len(in_loop)} calls) | "
        f"{statistics.median(in_loop):.2f} | {min(in_loop):.2f}-{max(in_loop):.2f} |")
  print(f"| one step, ms | {step * 1e3:.1f} | {min(per_step) * 1e3:.1f}-{max(per_step) * 1e3:.1f} |")
  share = [a / b - 1 for a, b in zip(with_s, without)]
  print(f"| short run: snapshots' share of the run time ({snaps} per {steps + 1} steps) | "
        f"{statistics.median(share):.1%} | {min(share):.1%}-{max(share):.1%} |")
  for what, cost in (("run time difference", snap), ("snapshot call", statistics.median(in_loop))):
    full = full_snaps * cost / (full_steps * step)
    print(f"| quickstart ({full_snaps} snapshots per {full_steps} steps), projected from the {what} | {full:.2%} | |")


def run_paper(args) -> None:
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  c = methods.paper_config(args.model, "cifar10")
  c.eval_batch_size = 500
  exp = experiment.build(c)
  num_train, steps_per_epoch = 50_000, 50_000 // c.batch_size
  plan = train_step.make_plan(c, num_train)
  schedule = train_step.make_schedule(c, plan.total_steps)
  tx = train_step.make_optimizer(c, schedule)
  rng = np.random.default_rng(0)
  print(f"paper: {args.model}, batch {c.batch_size}, {len(jax.devices())} device(s), load average {_load()}",
        flush=True)

  # One train step, batches drawn on the device from a synthetic CIFAR-sized training set.
  images = rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (num_train,), dtype=np.int32)
  init_key, data_key, aug_key, dropout_key = jax.random.split(jax.random.PRNGKey(0), 4)
  source = train_step.InMemoryBatches(exp, (images, labels), plan, data_key, aug_key)
  update = source.compile(train_step.make_train_step(exp.model, tx, schedule, dropout_key))
  init = jax.jit(functools.partial(train_step.init_state, exp, tx), out_shardings=exp.replicated)
  state = init(init_key)
  state, _ = update(state, 0)
  jax.block_until_ready(state)
  step_times = []
  for s in range(1, args.step_repeats + 1):
    t0 = time.perf_counter()
    state, _ = update(state, s)
    jax.block_until_ready(state)
    step_times.append(time.perf_counter() - t0)
  print(f"steps done: {statistics.median(step_times):.2f} s/step (load {_load()})", flush=True)

  # One snapshot as the loop takes it: score on the test split, CRC32, save (waited for).
  test = (rng.integers(0, 256, (args.test_examples, 32, 32, 3), dtype=np.uint8),
          rng.integers(0, 10, (args.test_examples,), dtype=np.int32))
  snap_times = []
  with tempfile.TemporaryDirectory() as workdir:
    # The loop's own pieces: snapshots at steps 1..repeats + 1 of a plan that has them.
    snapshot_plan = train_step.Plan(plan.steps_per_epoch, plan.total_steps, tuple(range(1, args.repeats + 2)))
    run = setup.Run(c, setup.Settings.from_config(c, exp.spec.train_split), workdir, exp, snapshot_plan, tx,
                    schedule, None, test)
    run.ckpt = checkpoints.RunCheckpoints(workdir)
    run.writer = setup.make_writer(workdir)
    trainee = one_member.OneMember(run, training.Hooks())
    try:
      for step in snapshot_plan.snapshot_steps:  # The first one compiles the evaluator: not timed.
        t0 = time.perf_counter()
        trainee.take_snapshots(state, step)
        run.ckpt.wait()
        if step > 1:
          snap_times.append(time.perf_counter() - t0)
        print(f"snapshot {step - 1}/{args.repeats} done ({time.perf_counter() - t0:.1f} s, load {_load()})",
              flush=True)
    finally:
      run.close()
  step_s, snap_s = statistics.median(step_times), statistics.median(snap_times)
  epochs, cycles = c.num_epochs, c.num_cycles
  total_steps = int(epochs * steps_per_epoch)
  share = cycles * snap_s / (total_steps * step_s)
  print(f"\n{args.model} on CIFAR-sized data (batch {c.batch_size}; {args.test_examples:,} test images at eval batch "
        f"{c.eval_batch_size}), median of {args.step_repeats} steps and {args.repeats} snapshots; load average "
        f"{_load()}\n")
  print("| quantity | median | min-max |")
  print("|---|---|---|")
  print(f"| one train step, s | {step_s:.3f} | {min(step_times):.3f}-{max(step_times):.3f} |")
  print(f"| one snapshot (score {args.test_examples:,} images, CRC32, save), s | {snap_s:.1f} | "
        f"{min(snap_times):.1f}-{max(snap_times):.1f} |")
  print(f"| one snapshot, in train steps | {snap_s / step_s:.0f} | |")
  print(f"| paper budget: {cycles} snapshots in {epochs:.0f} epochs x {steps_per_epoch} steps, projected | "
        f"{share:.3%} | |")


def main() -> None:
  args = _parse()
  parts = {p.strip() for p in args.part.split(",") if p.strip()}
  if not parts <= {"quickstart", "paper"}:
    raise SystemExit(f"error: --part={args.part!r}; allowed: quickstart, paper")
  if "quickstart" in parts:
    run_quickstart(args)
  if "paper" in parts:
    run_paper(args)


if __name__ == "__main__":
  main()
