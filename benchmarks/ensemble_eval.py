"""Images/s of snapshot-ensemble evaluation strategies vs calling a jitted single model M times and vs PyTorch.

  python benchmarks/ensemble_eval.py --batch 500 --members 5 --repeats 5 --model resnet20

All methods run round-robin in one process (repeat r of every method before repeat r + 1, with a short pause
before each so that the other library's worker threads go idle), so load from other processes on a shared
machine hits them alike; the table reports the median. The PyTorch row is the per-snapshot loop of
torchensemble's VotingClassifier.forward (softmax of each of the M models, averaged), run under
torch.inference_mode() on channels_last tensors: the same network (benchmarks/torch_models.py), eval mode.
"""
import argparse
import os
import platform
import re
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

from snapjax import ensemble, models  # noqa: E402

PAUSE_S = 0.05


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=500, help="images per forward pass")
  p.add_argument("--members", type=int, default=5, help="M, number of stacked snapshots")
  p.add_argument("--repeats", type=int, default=5, help="timed runs per method (after warm-up)")
  p.add_argument("--model", default="resnet20", help=f"a snapjax.models name: {', '.join(models.names())}")
  p.add_argument("--num_classes", type=int, default=10, help="classes of the model's output")
  p.add_argument("--chunk_size", type=int, default=2, help="members per step for the chunked 'map' row")
  p.add_argument("--image_size", type=int, default=32, help="height = width of the input images")
  p.add_argument("--skip", default="",
                 help="comma-separated methods to skip: vmap, map, map_chunk, loop, auto, pytorch")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
  p.add_argument("--one_core", action="store_true",
                 help="pin the process to one core (PyTorch: 1 thread): the per-core comparison, steadier under load")
  args = p.parse_args()
  if args.one_core:
    args.threads = 1
  for name in ("batch", "members", "repeats", "num_classes", "chunk_size", "image_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  return args


def main() -> None:
  args = _parse()
  model = models.get(args.model, args.num_classes)
  x = jax.random.normal(jax.random.key(0), (args.batch, args.image_size, args.image_size, 3))
  snapshots = [model.init(jax.random.key(1 + i), x[:1], train=False) for i in range(args.members)]
  stacked = ensemble.stack_snapshots(snapshots)
  jax.block_until_ready(stacked)

  def apply_fn(variables, x):
    return model.apply(variables, x, train=False)

  single_probs = jax.jit(lambda v, x: jax.nn.softmax(apply_fn(v, x).astype(jnp.float32), axis=-1))

  def baseline():
    probs = [single_probs(s, x) for s in snapshots]
    return sum(probs[1:], probs[0]) / len(probs)

  def strategy(name, chunk_size=None):
    return lambda: ensemble.ensemble_predict(apply_fn, stacked, x, strategy=name, chunk_size=chunk_size)

  skip = {s.strip() for s in args.skip.split(",") if s.strip()}
  torch_loop = None if "pytorch" in skip else _torch_loop(args, snapshots, x)
  methods = {  # label -> fn; the first one is the baseline the speed column divides by.
      "baseline: jitted single model x M": baseline,
      "vmap": strategy("vmap"),
      "map": strategy("map"),
      f"map_chunk: map, chunk_size={args.chunk_size}": strategy("map", args.chunk_size),
      "loop": strategy("loop"),
      f"auto (-> {ensemble.resolve_strategy('auto', x)})": strategy("auto"),
      "pytorch: per-snapshot loop (torchensemble's)": torch_loop,
  }
  methods = {k: v for k, v in methods.items() if re.split(r"[: ]", k)[0] not in skip and v is not None}

  first, want = {}, None
  for name, fn in methods.items():
    t0 = time.perf_counter()
    out = _block(fn())
    first[name] = time.perf_counter() - t0
    want = np.asarray(out) if want is None else want
    err = float(np.max(np.abs(np.asarray(out) - want)))
    print(f"warm-up {name}: {first[name]:.2f} s (compile + run), max |probs - first method| = {err:.1e}",
          flush=True)
  times = {name: [] for name in methods}
  for r in range(args.repeats):
    for name, fn in methods.items():
      time.sleep(PAUSE_S)
      t0 = time.perf_counter()
      _block(fn())
      times[name].append(time.perf_counter() - t0)
    print(f"repeat {r + 1}/{args.repeats} done", flush=True)

  base = statistics.median(next(iter(times.values())))
  torch_name = next((k for k in times if k.startswith("pytorch")), None)
  torch_med = statistics.median(times[torch_name]) if torch_name else float("nan")
  print(f"\n{args.model}, M={args.members}, batch {args.batch}x{args.image_size}x{args.image_size}x3, "
        f"median of {args.repeats}; jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{len(jax.devices())} device(s), {platform.processor() or platform.machine()}; {_torch_version(torch_name)}; "
        f"load average at end {os.getloadavg()[0]:.1f}\n")
  print("| method | median s / batch | images/s | speed vs baseline | speed vs PyTorch | min-max s | warm-up s |")
  print("|---|---|---|---|---|---|---|")
  for name, ts in times.items():
    med = statistics.median(ts)
    print(f"| {name} | {med:.3f} | {args.batch / med:.0f} | {base / med:.2f}x | {torch_med / med:.2f}x | "
          f"{min(ts):.3f}-{max(ts):.3f} | {first[name]:.1f} |")


def _block(out):
  """Waits for a JAX result; a PyTorch one (a tensor) is already computed."""
  if isinstance(out, jax.Array):
    return np.asarray(jax.block_until_ready(out))
  return out.numpy()


def _torch_version(torch_name) -> str:
  if torch_name is None:
    return "PyTorch not run"
  import torch
  return f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads)"


def _torch_loop(args, snapshots, x):
  """torchensemble's soft vote over M PyTorch twins carrying the snapshots' weights: mean of the M softmaxes."""
  import torch
  import torch.nn.functional as F
  import torch_models
  torch.set_num_threads(args.threads)
  try:
    nets = [torch_models.get(args.model, args.num_classes) for _ in snapshots]
  except ValueError:
    return None
  for net, snap in zip(nets, snapshots):
    torch_models.load_flax_variables(net, snap)
    net.to(memory_format=torch.channels_last).eval()
  x_t = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)

  def run():
    with torch.inference_mode():
      outputs = [F.softmax(net(x_t), dim=1) for net in nets]
      return sum(outputs) / len(outputs)

  return run


if __name__ == "__main__":
  main()
