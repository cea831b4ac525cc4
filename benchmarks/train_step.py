"""Images/s of snapjax's train step vs the same step in PyTorch (eager, channels_last), side by side in one process.

  python benchmarks/train_step.py                       # resnet20 at batch 64 and 128 (a few minutes)
  python benchmarks/train_step.py --models resnet20,resnet56,resnet110,densenet40 --batches 64,128
  python benchmarks/train_step.py --models resnet20 --batches 128 --profile   # plus per-op tables

snapjax: `train_step.make_train_step` over `make_optimizer(config, make_schedule(config, ...))` and the real
model (`models.get`), jitted with the state donated, as the trainer compiles it, but fed one fixed batch that
is already on the device: the trainer's in-step data drawing and augmentation are excluded. PyTorch: the same
network (benchmarks/torch_models.py: same layers and parameter count, printed), SGD with Nesterov momentum
0.9 and weight decay 1e-4 added to the gradient (`torch.optim.SGD(..., foreach=True)`), the learning rate
set from the same schedule every step, and the same metrics (loss, accuracy, gradient norm, finite check).

Every run times `--steps` consecutive steps; the implementations alternate run by run (repeat r of each
before repeat r + 1, with a short pause before each so that the other library's spinning threads go idle),
so load from other processes hits them alike. The table gives the median of `--repeats` runs after
`--warmup` untimed runs, the min-max, and the ratio of the medians.
"""
import argparse
import os
import platform
import statistics
import sys
import time

if "--one_core" in sys.argv:  # Before JAX and PyTorch size their thread pools.
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # This checkout's snapjax.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from snapjax import config as config_lib, models, train_step  # noqa: E402
from snapjax.models import conv as conv_lib  # noqa: E402

import oplevel  # noqa: E402

PAUSE_S = 0.05  # Before every timed run: lets the other library's worker threads stop spinning.


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="resnet20", help="comma-separated: resnet20, resnet56, resnet110, densenet40")
  p.add_argument("--batches", default="64,128", help="comma-separated global batch sizes")
  p.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (after warm-up)")
  p.add_argument("--warmup", type=int, default=2, help="untimed runs per implementation after compiling")
  p.add_argument("--steps", type=int, default=2, help="train steps per timed run")
  p.add_argument("--dtype", default="float32", choices=sorted(config_lib.DTYPES), help="snapjax compute dtype")
  p.add_argument("--jax", default="xla,auto",
                 help="comma-separated snapjax convolutions (snapjax.models.conv): 'auto' (the library's default), "
                      "'xla' (XLA's own VJP: before), 'cpu' (the CPU weight gradient)")
  p.add_argument("--no_torch", action="store_true", help="time snapjax only")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
  p.add_argument("--one_core", action="store_true",
                 help="pin the process to one core (PyTorch: 1 thread; XLA sizes its pools from the affinity): "
                      "compares the libraries' per-core efficiency, far less sensitive to other processes' load")
  p.add_argument("--profile", action="store_true",
                 help="after the table, per-op time of one step of each implementation (jax.profiler / torch.profiler)")
  args = p.parse_args()
  if args.one_core:
    args.threads = 1
  for name in ("repeats", "steps", "threads"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  return args


class JaxStep:
  """snapjax's compiled train step on a fixed device batch."""

  def __init__(self, name: str, batch: int, dtype: str, variant: str):
    c = config_lib.base_config()
    c.model, c.dataset, c.batch_size, c.dtype = name, "cifar10", batch, dtype
    self.model = models.get(name, 10, **config_lib.model_kwargs(c))
    schedule = train_step.make_schedule(c, 100_000)
    tx = train_step.make_optimizer(c, schedule)
    variables = self.model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    self.state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
                  "batch_stats": variables["batch_stats"], "opt_state": tx.init(variables["params"])}
    self.num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
    rng = np.random.default_rng(0)
    self.x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), config_lib.DTYPES[dtype])
    self.y = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
    step_fn = train_step.make_train_step(self.model, tx, schedule, jax.random.key(1))
    with conv_lib.using(variant):
      t0 = time.perf_counter()
      self.compiled = jax.jit(step_fn, donate_argnums=(0,)).lower(self.state, self.x, self.y).compile()
      self.compile_s = time.perf_counter() - t0

  def run(self, steps: int) -> None:
    for _ in range(steps):  # Dispatched back to back, as the trainer does; one wait at the end.
      self.state, metrics = self.compiled(self.state, self.x, self.y)
    jax.block_until_ready((self.state, metrics))


class TorchStep:
  """The same update in PyTorch eager mode, channels_last."""

  def __init__(self, name: str, batch: int, threads: int):
    import torch
    import torch.nn.functional as F
    import torch_models
    torch.set_num_threads(threads)
    self.torch, self.F = torch, F
    self.model = torch_models.get(name, 10).to(memory_format=torch.channels_last).train()
    self.num_params = torch_models.num_params(self.model)
    self.params = list(self.model.parameters())
    c = config_lib.base_config()
    self.schedule = train_step.make_schedule(c, 100_000)
    self.opt = torch.optim.SGD(self.params, lr=c.init_lr, momentum=c.momentum, nesterov=c.nesterov,
                               weight_decay=c.weight_decay, foreach=True)
    rng = np.random.default_rng(0)
    self.x = torch.from_numpy(rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)).contiguous(
        memory_format=torch.channels_last)
    self.y = torch.from_numpy(rng.integers(0, 10, size=batch))
    self.count = 0
    self.compile_s = 0.0

  def run(self, steps: int) -> None:
    torch, F = self.torch, self.F
    for _ in range(steps):
      for group in self.opt.param_groups:
        group["lr"] = float(self.schedule(self.count))
      logits = self.model(self.x)
      loss = F.cross_entropy(logits, self.y)
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      with torch.no_grad():
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in self.params])))
        self.metrics = {"loss": loss.detach(), "accuracy": (logits.argmax(-1) == self.y).float().mean(),
                        "grad_norm": grad_norm, "finite": torch.isfinite(loss) & torch.isfinite(grad_norm)}
      self.opt.step()
      self.count += 1


def _time(impls: dict, args) -> dict[str, list[float]]:
  for _ in range(args.warmup):
    for impl in impls.values():
      impl.run(args.steps)
  times = {k: [] for k in impls}
  for _ in range(args.repeats):
    for k, impl in impls.items():
      time.sleep(PAUSE_S)
      t0 = time.perf_counter()
      impl.run(args.steps)
      times[k].append((time.perf_counter() - t0) / args.steps)
  return times


def main() -> None:
  args = _parse()
  names = [m.strip() for m in args.models.split(",") if m.strip()]
  batches = [int(b) for b in args.batches.split(",") if b.strip()]
  variants = [v.strip() for v in args.jax.split(",") if v.strip()]
  print(f"jax {jax.__version__} ({jax.default_backend()}, {len(jax.devices())} device(s)), "
        f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} cores, "
        f"PyTorch threads {args.threads}; "
        f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
  rows, profiles = [], []
  for name in names:
    for batch in batches:
      impls = {}
      for v in variants:
        impls[f"snapjax conv={v}"] = JaxStep(name, batch, args.dtype, v)
      if not args.no_torch:
        impls["pytorch"] = TorchStep(name, batch, args.threads)
      counts = {k: i.num_params for k, i in impls.items()}
      print(f"{name} batch {batch}: parameters {counts}; compile s "
            f"{ {k: round(i.compile_s, 1) for k, i in impls.items()} }", flush=True)
      times = _time(impls, args)
      ref = statistics.median(times["pytorch"]) if "pytorch" in times else None
      for k, ts in times.items():
        med = statistics.median(ts)
        rows.append((name, batch, k, med, min(ts), max(ts), ref / med if ref else float("nan")))
      print(f"  done (load average {os.getloadavg()[0]:.1f})", flush=True)
      if args.profile:
        profiles.append((name, batch, impls))
  print(f"\ntrain step, {args.dtype} (snapjax) / float32 (PyTorch {_torch_version(args)}), median of {args.repeats} "
        f"runs of {args.steps} steps after {args.warmup} warm-up runs; load average at end {os.getloadavg()[0]:.1f}\n")
  print("| model | batch | implementation | median ms/step | images/s | min-max ms/step | vs PyTorch |")
  print("|---|---|---|---|---|---|---|")
  for name, batch, k, med, lo, hi, ratio in rows:
    print(f"| {name} | {batch} | {k} | {med * 1e3:.0f} | {batch / med:.0f} | {lo * 1e3:.0f}-{hi * 1e3:.0f} | "
          f"{ratio:.2f}x |")
  for name, batch, impls in profiles:
    for k, impl in impls.items():
      print(f"\n### per-op profile: {name}, batch {batch}, {k}\n")
      if isinstance(impl, JaxStep):
        oplevel.print_jax_profile(impl)
      else:
        oplevel.print_torch_profile(impl)


def _torch_version(args) -> str:
  if args.no_torch:
    return "not run"
  import torch
  return torch.__version__


if __name__ == "__main__":
  main()
