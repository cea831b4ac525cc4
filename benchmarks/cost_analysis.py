"""FLOPs and bytes of snapjax's train step from XLA's cost analysis, and the roofline bound on an H100 and a TPU v5e.

  python benchmarks/cost_analysis.py                       # every row below (compiles 10 steps: ~10-20 min here)
  python benchmarks/cost_analysis.py --rows resnet110 --dtypes float32

For each (model, input, batch, dtype) it builds the real step (train_step.make_train_step over make_optimizer and
models.get, as the trainer does, minus the in-step data drawing), lowers and compiles it for this machine's CPU with
XLA's own convolution VJP (snapjax.models.conv "xla", what a GPU or TPU runs) and reads
`compiled.cost_analysis()`: 'flops' (convolutions count the multiply-adds of valid, unpadded positions, x2) and
'bytes accessed' (every operand and output of every top-level op after XLA:CPU's fusion). A GPU or TPU target
cannot be lowered here, so: the FLOPs are a property of the program and hold on any hardware; the bytes are an
estimate (another backend fuses differently).

Roofline: images/s <= batch / max(FLOPs / peak FLOP/s, bytes / memory bandwidth). Peaks (dense) are the library's
(snapjax.utilisation.PEAK_FLOPS, what the training loop's MFU divides by), the FLOPs its cost analysis:
  H100 SXM: 989 TFLOP/s bf16; float32 rows use TF32, 495 TFLOP/s (JAX's default precision runs float32
    convolutions and matmuls on GPU tensor cores in TF32; at precision HIGHEST the bound is 67 TFLOP/s); 3.35 TB/s.
  TPU v5e: 197 TFLOP/s bf16 (float32 rows too: default precision is one bf16 pass on the MXU); 819 GB/s.
Hours per Table 1/2 cell = epochs x floor(train examples / batch) x batch / bound / 3600, at the paper's budgets.
"""
import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # This checkout's snapjax and scripts.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from snapjax import config as config_lib, models, train_step, utilisation  # noqa: E402
from snapjax.models import conv as conv_lib  # noqa: E402


def _peaks(device_kind: str) -> dict[str, float]:
  return {dtype: utilisation.device_peak(device_kind, dtype) for dtype in ("bfloat16", "float32")}


# Peak dense FLOP/s per dtype (the library's table, by each device's device_kind) and memory bandwidth in bytes/s
# (H100 SXM and TPU v5e datasheets).
HARDWARE = {
    "H100": (_peaks("NVIDIA H100 80GB HBM3"), 3.35e12),
    "TPU v5e": (_peaks("TPU v5 lite"), 819e9),
}


@dataclasses.dataclass(frozen=True)
class Row:
  model: str
  image_size: int
  num_classes: int
  batch: int


ROWS = [Row("resnet110", 32, 10, 64), Row("resnet110", 32, 10, 128), Row("densenet40", 32, 10, 64),
        Row("densenet40", 32, 10, 128), Row("resnet50", 224, 1000, 256)]

# Table 1/2 cells: (model, dataset, epochs, training examples, batch) from /work/shared/paper.md.
CELLS = [
    ("resnet110", "CIFAR-10/100", 200, 50_000, 64),
    ("resnet110", "SVHN", 40, 73_257 - 6_000, 64),
    ("densenet40", "CIFAR-10/100", 300, 50_000, 64),
    ("densenet40", "SVHN", 40, 73_257 - 6_000, 64),
    ("resnet50", "ImageNet", 90, 1_281_167, 256),
]


# (source, setup, published figure, epochs, training examples, wall hours, chips). The flax example trains
# 100 epochs (125,100 steps x 1024 = 100 x 1,281,167); airbench94 and hlb-CIFAR10 are the fastest CIFAR-10 runs
# to 94% test accuracy (small custom networks; airbench94: 9.9 epochs at batch 1024, 0.36 PFLOPs in all), so
# only their wall time compares.
PUBLISHED = [
    ("google/flax examples/imagenet/README.md", "ResNet-50, TPU v3-8 (4 chips), bf16", "100 epochs in 4.4 h",
     100, 1_281_167, 4.4, 4),
    ("google/flax examples/imagenet/README.md", "ResNet-50, TPU v3-32 (16 chips), bf16", "100 epochs in 2.1 h",
     100, 1_281_167, 2.1, 16),
    ("google/flax examples/imagenet/README.md", "ResNet-50, 8 x V100, float32", "100 epochs in 13.2 h",
     100, 1_281_167, 13.2, 8),
    ("google/flax examples/imagenet/README.md", "ResNet-50, 8 x V100, mixed precision", "100 epochs in 4.3 h",
     100, 1_281_167, 4.3, 8),
    ("KellerJordan/cifar10-airbench README.md (arXiv 2404.00498)", "airbench94_compiled, 1 x A100",
     "94.01% in 3.29 s", 9.9, 50_000, 3.29 / 3600, 1),
    ("tysam-code/hlb-CIFAR10 (as cited by the airbench README)", "hlb-CIFAR10, 1 x A100", "94% in 6.3 s",
     None, 50_000, 6.3 / 3600, 1),
]


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", default="resnet110,densenet40,resnet50", help="comma-separated models of the rows to run")
  p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
  p.add_argument("--paper_table", metavar="JSON", default=None,
                 help="instead of the rows above: the step of every config in docs/results/paper.md (each distinct "
                      "model, input, batch and dtype compiled once) and each row's projected hours on one H100 and "
                      "on a TPU v5e-8, written to JSON for `scripts/paper_table.py --projections JSON`; the steps' costs "
                      "are kept in JSON.steps, and a rerun compiles only those missing there")
  return p.parse_args()


def paper_projections(cache: str | None = None) -> dict[str, str]:
  """{paper.md config string: its projected time on 1 H100 and on a TPU v5e-8} from each row's own step.

  'at least C h on 1 H100 (c ms/step; roofline estimate R h, r ms/step); at least C' h on a TPU v5e-8 (roofline
  estimate R' h)': C is the compute bound (the step's FLOPs at the chip's peak), which no run can beat; R also
  takes the memory term from XLA:CPU's estimate of the bytes, which overstates an accelerator's traffic (see
  `main`'s table), so R is an estimate, not a bound. The row's run has plan.total_steps updates of its global batch
  (train_step.make_plan on the dataset's training examples: epochs x floor(examples / batch)). A TPU v5e-8 is 8
  chips with the batch split over them: 1/8 of one chip's step time, the ideal of data parallelism (per-chip
  batches of 8 for CIFAR leave a chip's MXU mostly idle, so this is the most optimistic of the bounds). `cache`: a
  JSON file of the step costs compiled so far, read and extended, so that an interrupted run goes on where it
  stopped.
  """
  import json
  from scripts import paper_table
  from snapjax import data
  costs, out = {}, {}
  if cache and os.path.exists(cache):
    with open(cache) as f:
      costs = json.load(f)
  for r in paper_table.rows():
    c = paper_table.load_config(r)
    spec = data.get_spec(c.dataset)
    shape = spec.image_shape if spec.in_memory else (c.image_size, c.image_size, spec.image_shape[2])
    # One compile per model, model options, input, batch and dtype: the class count (10, 100 or 200 outputs of
    # the last layer) changes a step's FLOPs by under 0.1%, so CIFAR-10, CIFAR-100 and SVHN share one.
    key = json.dumps([c.model, repr(sorted(config_lib.model_kwargs(c).items())), shape, c.batch_size, c.dtype])
    if key not in costs:
      costs[key] = config_step_cost(c, shape, spec.num_classes)
      if cache:
        with open(cache, "w") as f:
          json.dump(costs, f, indent=1)
      print(f"  {c.model} {shape} batch {c.batch_size} {c.dtype} ({r['config']}): "
            f"{costs[key]['flops'] / c.batch_size / 1e9:.2f} GFLOP/image, compiled in {costs[key]['compile_s']:.0f} s",
            flush=True)
    cost, plan = costs[key], train_step.make_plan(c, spec.num_train)
    h100 = step_seconds(cost["flops"], cost["bytes"], "H100", c.dtype)
    v5e8 = [t / 8 for t in step_seconds(cost["flops"], cost["bytes"], "TPU v5e", c.dtype)]
    hours = [plan.total_steps * t / 3600 for t in (*h100, *v5e8)]
    out[r["config"]] = (f"at least {hours[0]:.3g} h on 1 H100 ({1e3 * h100[0]:.3g} ms/step; roofline estimate "
                        f"{hours[1]:.3g} h, {1e3 * h100[1]:.3g} ms/step); at least {hours[2]:.3g} h on a TPU v5e-8 "
                        f"(roofline estimate {hours[3]:.3g} h)")
  return out


def step_cost(row: Row, dtype: str) -> dict[str, float]:
  """XLA's cost analysis of one compiled train step (CPU compile, XLA's convolution VJP)."""
  c = config_lib.base_config()
  c.model, c.batch_size, c.dtype = row.model, row.batch, dtype
  return config_step_cost(c, (row.image_size, row.image_size, 3), row.num_classes)


def config_step_cost(c, image_shape: tuple[int, int, int], num_classes: int) -> dict[str, float]:
  """XLA's cost analysis of the train step of config `c` (its model, model options, batch, dtype, optimiser)."""
  model = models.get(c.model, num_classes, **config_lib.model_kwargs(c))
  schedule = train_step.make_schedule(c, 100_000)
  tx = train_step.make_optimizer(c, schedule)
  shape = (1, *image_shape)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": variables["params"],
           "batch_stats": variables["batch_stats"],
           "opt_state": jax.eval_shape(tx.init, variables["params"])}
  x = jax.ShapeDtypeStruct((c.batch_size, *image_shape), jnp.float32)
  y = jax.ShapeDtypeStruct((c.batch_size,), jnp.int32)
  step_fn = train_step.make_train_step(model, tx, schedule, jax.random.key(1))
  compute = config_lib.DTYPES[c.dtype]
  with conv_lib.using("xla"):
    lowered = jax.jit(lambda s, x, y: step_fn(s, x.astype(compute), y), donate_argnums=(0,)).lower(state, x, y)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  return {"flops": utilisation.update_flops(compiled, num_devices=1),
          "bytes": float(utilisation.cost_analysis(compiled)["bytes accessed"]), "compile_s": time.perf_counter() - t0}


def step_seconds(flops: float, nbytes: float, hw: str, dtype: str) -> tuple[float, float]:
  """(compute bound, roofline) seconds of a step on hardware `hw`: FLOPs at the peak; the longer of that and the
  bytes at the memory bandwidth."""
  peaks, bandwidth = HARDWARE[hw]
  t_compute = flops / peaks[dtype]
  return t_compute, max(t_compute, nbytes / bandwidth)


def bound(flops: float, nbytes: float, batch: int, hw: str, dtype: str) -> tuple[float, str]:
  """(images/s upper bound, 'compute' or 'memory') on hardware `hw`."""
  t_compute, t_roofline = step_seconds(flops, nbytes, hw, dtype)
  return batch / t_roofline, "compute" if t_compute >= t_roofline else "memory"


def main() -> None:
  args = _parse()
  if args.paper_table:
    import json
    projections = paper_projections(cache=args.paper_table + ".steps")
    with open(args.paper_table, "w") as f:
      json.dump(projections, f, indent=1)
    print(f"wrote {args.paper_table}: {len(projections)} rows; `python scripts/paper_table.py --projections "
          f"{args.paper_table}` puts them in docs/results/paper.md")
    return
  wanted = {m.strip() for m in args.rows.split(",") if m.strip()}
  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  print(f"jax {jax.__version__}, cost analysis of the CPU-compiled step; peaks: {HARDWARE}", flush=True)
  results = {}
  for row in ROWS:
    if row.model not in wanted:
      continue
    for dtype in dtypes:
      results[(row, dtype)] = step_cost(row, dtype)
      print(f"  {row} {dtype}: {results[(row, dtype)]}", flush=True)

  print("\nImages/s bounds: roofline = min(compute bound, memory bound); memory bound from the CPU-fused bytes.\n")
  print("| model | input | batch | dtype | GFLOP/step | GFLOP/image | GB/step (est.) | FLOP/byte | "
        "H100 compute / memory / roofline img/s | TPU v5e compute / memory / roofline img/s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for (row, dtype), cost in results.items():
    cells = []
    for hw in HARDWARE:
      peaks, bandwidth = HARDWARE[hw]
      compute, memory = row.batch * peaks[dtype] / cost["flops"], row.batch * bandwidth / cost["bytes"]
      cells.append(f"{compute:,.0f} / {memory:,.0f} / **{min(compute, memory):,.0f}**")
    print(f"| {row.model} | {row.image_size}x{row.image_size} | {row.batch} | {dtype} | {cost['flops'] / 1e9:,.1f} | "
          f"{cost['flops'] / row.batch / 1e9:.2f} | {cost['bytes'] / 1e9:.2f} | {cost['flops'] / cost['bytes']:.0f} | "
          f"{cells[0]} | {cells[1]} |")

  print("\nHours per Table 1/2 cell at the roofline bound (one training run at the paper's budget):\n")
  print("| model | dataset | epochs | batch | dtype | images | H100 h | TPU v5e h |")
  print("|---|---|---|---|---|---|---|---|")
  for model, dataset, epochs, num_train, batch in CELLS:
    for dtype in dtypes:
      row = next((r for (r, d) in results if r.model == model and r.batch == batch and d == dtype), None)
      if row is None:
        continue
      cost = results[(row, dtype)]
      images = epochs * (num_train // batch) * batch
      hours = [images / bound(cost["flops"], cost["bytes"], batch, hw, dtype)[0] / 3600 for hw in HARDWARE]
      print(f"| {model} | {dataset} | {epochs} | {batch} | {dtype} | {images:,} | {hours[0]:.2f} | {hours[1]:.2f} |")

  print("\nPublished training throughput, for comparison (images/s derived as epochs x examples / wall time):\n")
  print("| source | setup | published | images/s (per chip) |")
  print("|---|---|---|---|")
  for source, setup, published, epochs, examples, hours, chips in PUBLISHED:
    ips = epochs * examples / (hours * 3600) if epochs else None
    derived = f"{ips:,.0f} ({ips / chips:,.0f})" if ips else "-"
    print(f"| {source} | {setup} | {published} | {derived} |")


if __name__ == "__main__":
  main()
