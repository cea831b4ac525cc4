"""Per-layer convolution kernels, isolated: XLA:CPU (forward, input and weight gradient) vs PyTorch's oneDNN.

  python benchmarks/conv_ops.py --one_core                     # ResNet-20's layer shapes at batch 128
  python benchmarks/conv_ops.py --model densenet40 --batch 64

Each op is jitted alone with its operands as arguments (so nothing is fused into it) and timed against the same
op in PyTorch (channels_last, `aten::convolution_backward` with one output mask at a time), alternating run by
run, median of `--repeats` after warm-up. GFLOP/s = 2 * multiply-adds / time. The `xla kernel` column says
which library XLA:CPU picked for the forward convolution (YNNPACK needs more than 16 input or output channels;
smaller ones run on Eigen). "wgrad snapjax" is snapjax.models.conv.weight_grad (operands transposed inside a
conditional, then the convolution XLA itself would run).
"""
import argparse
import os
import statistics
import sys
import time

if "--one_core" in sys.argv:  # Before JAX and PyTorch size their thread pools.
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # This checkout's snapjax.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from snapjax.models import conv as conv_lib  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")
PAUSE_S = 0.01


def layer_shapes(model: str, batch: int) -> list[tuple[int, int, int, int, int, int]]:
  """Distinct (batch, size, in, out, kernel, stride) of the model's convolutions (DenseNet: a sample)."""
  if model.startswith("resnet"):
    return [(batch, 32, 3, 16, 3, 1), (batch, 32, 16, 16, 3, 1), (batch, 32, 16, 32, 3, 2),
            (batch, 16, 32, 32, 3, 1), (batch, 16, 32, 64, 3, 2), (batch, 8, 64, 64, 3, 1)]
  if model == "densenet40":
    return [(batch, 32, 16, 12, 3, 1), (batch, 32, 148, 12, 3, 1), (batch, 32, 160, 160, 1, 1),
            (batch, 16, 292, 12, 3, 1), (batch, 16, 304, 304, 1, 1), (batch, 8, 436, 12, 3, 1)]
  raise ValueError(f"unknown model {model!r}: resnet20 (any CIFAR ResNet) or densenet40")


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="resnet20", help="resnet20 (CIFAR ResNet shapes) or densenet40")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--one_core", action="store_true", help="pin to one core, PyTorch 1 thread")
  p.add_argument("--no_torch", action="store_true")
  return p.parse_args()


def _median_ms(fns: dict, repeats: int) -> dict[str, float]:
  for f in fns.values():
    f()
    f()
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      time.sleep(PAUSE_S)
      t0 = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def bench(shape, repeats: int, with_torch: bool) -> tuple[dict[str, float], str, float]:
  n, size, c, k, kernel, stride = shape
  pad = ((kernel // 2,) * 2,) * 2
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n, size, size, c)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, c, k)), jnp.float32)

  def conv(x, w):
    return lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=NHWC)

  g = jnp.asarray(rng.normal(size=jax.eval_shape(conv, x, w).shape), jnp.float32)
  fwd = jax.jit(conv)
  dgrad = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
  wgrad = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
  ours = jax.jit(lambda x, w, g: conv_lib.weight_grad(x, g, w, (stride, stride), pad))
  kernel_lib = "YNNPACK" if "ynn" in fwd.lower(x, w).compile().as_text() else "Eigen"
  fns = {"fwd xla": lambda: fwd(x, w).block_until_ready(),
         "dgrad xla": lambda: dgrad(x, w, g).block_until_ready(),
         "wgrad xla": lambda: wgrad(x, w, g).block_until_ready(),
         "wgrad snapjax": lambda: ours(x, w, g).block_until_ready()}
  if with_torch:
    import torch
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)
    tw = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()).contiguous(memory_format=torch.channels_last)
    tg = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)
    p = kernel // 2

    def backward(mask):
      return torch.ops.aten.convolution_backward(tg, tx, tw, None, [stride] * 2, [p] * 2, [1, 1], False, [0, 0], 1,
                                                 mask)

    fns["fwd torch"] = lambda: torch.nn.functional.conv2d(tx, tw, stride=stride, padding=p)
    fns["dgrad torch"] = lambda: backward([True, False, False])
    fns["wgrad torch"] = lambda: backward([False, True, False])
  gflop = 2 * np.prod(g.shape) * kernel * kernel * c / 1e9
  return _median_ms(fns, repeats), kernel_lib, gflop


def main() -> None:
  args = _parse()
  with_torch = not args.no_torch
  if with_torch:
    import torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  print(f"jax {jax.__version__}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} cores; "
        f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
  rows = []
  for shape in layer_shapes(args.model, args.batch):
    ms, kernel_lib, gflop = bench(shape, args.repeats, with_torch)
    rows.append((shape, ms, kernel_lib, gflop))
    print(f"  {shape} done", flush=True)
  ops = list(rows[0][1])
  print(f"\n{args.model} layer shapes, median ms of {args.repeats} (GFLOP/s); load average at end "
        f"{os.getloadavg()[0]:.1f}\n")
  print("| batch, size, in, out, kernel, stride | GFLOP | xla kernel | " + " | ".join(ops) + " |")
  print("|---|---|---|" + "---|" * len(ops))
  for shape, ms, kernel_lib, gflop in rows:
    cells = [f"{ms[o]:.1f} ({gflop / ms[o] * 1e3:.0f})" for o in ops]
    print(f"| {', '.join(map(str, shape))} | {gflop:.2f} | {kernel_lib} | " + " | ".join(cells) + " |")
  totals = {o: sum(r[1][o] for r in rows) for o in ops}
  print("| total ms | | | " + " | ".join(f"{totals[o]:.1f}" for o in ops) + " |")


if __name__ == "__main__":
  main()
