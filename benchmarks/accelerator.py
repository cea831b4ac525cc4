"""Accelerator throughput of snapjax's own programs, measured on the device that runs this: one command, <= 8 minutes.

  python benchmarks/accelerator.py [--json PATH] [--peak_flops FLOP/s] [--budget_s 400] [--compilation_cache_dir DIR]
  python benchmarks/accelerator.py --smoke [--json PATH]    # every row on CPU, tiny shapes (tests/test_accelerator_benchmark.py)

Rows, in the order they run (each section may use its share of --budget_s plus what earlier sections left):
  train     the train step as a one-member run compiles it: train_step.InMemoryBatches (the batch drawn and augmented
            on the device inside the step; SGD with Nesterov momentum and weight decay), one update per call
            (steps_per_dispatch 1). ResNet-110, WRN-32-4 and DenseNet-40 on 32x32x3 (CIFAR) at the paper's batch 64
            and at 512, ResNet-50 on 224x224x3 at 256 (its data device-resident too: the ImageNet trainer's tf.data
            input is not measured), float32 and bfloat16. "vs": bfloat16 against float32.
  dispatch  the same programs with 16 updates per call (dispatch.run_steps, as config.steps_per_dispatch = 16 compiles
            them), the CIFAR models at batch 64, against 1 per call.
  members   K = 1, 2, 4, 8 ResNet-20s at batch 128 each trained side by side (members.MemberBatches, built as
            benchmarks/members.py builds it), member_strategy loop, map and vmap, against K one-member runs one
            after another (the K = 1 row, the one-member program).
  ensemble  snapjax.ensemble_predict with strategy auto, map, loop and vmap on M = 5 ResNet-110 snapshots and a
            1,000-image batch already on the device. "vs": against auto.
  export    the exported ensemble (snapjax.export_ensemble, written to a file, snapjax.load_exported), called on host
            uint8 images: ms per example at batch 1 and 1,000.

Timing: one warm-up call (compilation and the first run), then timed repeats of --steps updates (or calls) each,
until --repeats of them or --row_budget_s; the table gives the median (min-max in the JSON). "compile s" is the
warm-up minus one timed repeat. A row that raises (out of memory, unsupported) is reported as failed and the run goes
on; a row that would start after its section's deadline is reported as skipped.

FLOPs: XLA's cost_analysis() of the row's compiled program, read once when it compiles (train_step.AotUpdate and
snapjax/utilisation.py, as the training loop's progress line): the one-update program of the train rows (the in-step
batch draw included), a single snapshot's forward
pass times M for the ensemble and export rows. XLA counts a loop body once whatever its trip count, so the 16-per-call,
map and member programs use the one-member, one-update count (x K members). `program_flops` and `update_flops` are
the only places here that read FLOPs. MFU = achieved FLOP/s / the peak of the device `jax.devices()[0].device_kind`
names (snapjax.utilisation.PEAK_FLOPS: float32 at JAX's default precision, TF32 on NVIDIA GPUs), or
--peak_flops; "n/a" where neither gives one (e.g. on CPU).

--smoke runs every row kind on the CPU with tiny shapes: ResNet-8 on 8x8x3 images at batch 8 stands in for every model
and batch, 4 updates per call in the dispatch rows, K = 1 and 2, one timed repeat of 4; XLA:CPU's slower optimisation
passes are off, and programs identical across rows come from a persistent compilation cache (a temporary one unless
JAX_COMPILATION_CACHE_DIR is set); a train or dispatch row whose program an earlier row ran already (ResNet-8 stands
for every model, so all but the first of each dtype and data set) copies that row's numbers and names it in
`same_program_as`. It checks that every row still runs, not how fast.
"""
import argparse
import gc
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time

SMOKE = "--smoke" in sys.argv
if SMOKE and "jax" not in sys.modules:  # Before JAX starts: faster XLA:CPU compiles (the smoke run times nothing).
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                      "--xla_llvm_disable_expensive_passes=true"]).strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # This checkout's snapjax and benchmarks.

import jax  # noqa: E402
import numpy as np  # noqa: E402

import snapjax  # noqa: E402
from benchmarks import members as members_bench  # noqa: E402
from snapjax import config as config_lib, data, dispatch, experiment, train_step, utilisation  # noqa: E402

KINDS = ("train", "dispatch", "members", "ensemble", "export")
SHARES = {"train": 0.45, "dispatch": 0.15, "members": 0.22, "ensemble": 0.12, "export": 0.06}  # Of --budget_s.
# (model, dataset, image size, (paper batch, large batch)); imagenet2012 has 1,000 classes.
TRAIN_MODELS = (("resnet110", "cifar10", 32, (64, 512)), ("wrn32_4", "cifar10", 32, (64, 512)),
                ("densenet40", "cifar10", 32, (64, 512)), ("resnet50", "imagenet2012", 224, (256,)))
DISPATCH = 16  # Updates per call of the dispatch rows (config.steps_per_dispatch's default); 4 in the smoke run.
EPOCH_STEPS = 16  # Steps per epoch of the random training split: a dispatch of 16 never crosses an epoch's end.
SMOKE_MODEL, SMOKE_SIZE = "resnet8", 8


def _parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", metavar="PATH", help="also write the table as JSON (rewritten after every row)")
  p.add_argument("--peak_flops", type=float, default=None,
                 help="the device's peak FLOP/s for MFU (default: snapjax.utilisation.PEAK_FLOPS by device_kind)")
  p.add_argument("--smoke", action="store_true", help="every row on CPU with tiny shapes, one timed repeat")
  p.add_argument("--sections", default=",".join(KINDS), help=f"comma-separated: {', '.join(KINDS)}")
  p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes of the train and dispatch rows")
  p.add_argument("--members", default=None, help="comma-separated K of the members rows (default 1,2,4,8; smoke 1,2)")
  p.add_argument("--strategies", default="loop,map,vmap", help="member_strategy of the members rows")
  p.add_argument("--members_model", default="resnet20")
  p.add_argument("--members_batch", type=int, default=128, help="batch of each member")
  p.add_argument("--ensemble_model", default="resnet110")
  p.add_argument("--ensemble_members", type=int, default=5, help="M snapshots of the ensemble and export rows")
  p.add_argument("--eval_batch", type=int, default=1000, help="batch of the ensemble rows and the large export row")
  p.add_argument("--steps", type=int, default=None, help="updates (calls) per timed repeat (default 16; smoke 4)")
  p.add_argument("--repeats", type=int, default=None, help="timed repeats per row at most (default 5; smoke 1)")
  p.add_argument("--row_budget_s", type=float, default=None, help="timed seconds per row at most (default 4; smoke 1)")
  p.add_argument("--budget_s", type=float, default=400.0,
                 help="seconds for all rows (on a GPU, plus ~20 s of start-up: under 8 minutes)")
  p.add_argument("--compilation_cache_dir", default=None,
                 help="JAX's persistent compilation cache: a rerun on the same machine skips the compiles")
  args = p.parse_args(argv)
  args.sections = [s for s in args.sections.split(",") if s]
  args.dtypes = [d for d in args.dtypes.split(",") if d]
  args.strategies = [s for s in args.strategies.split(",") if s]
  if unknown := sorted(set(args.sections) - set(KINDS)):
    p.error(f"--sections: unknown {unknown}; allowed: {', '.join(KINDS)}")
  if unknown := sorted(set(args.dtypes) - set(config_lib.DTYPES)):
    p.error(f"--dtypes: unknown {unknown}; allowed: {', '.join(config_lib.DTYPES)}")
  args.members = [int(k) for k in (args.members or ("1,2" if args.smoke else "1,2,4,8")).split(",") if k]
  args.repeats = args.repeats or (1 if args.smoke else 5)
  args.row_budget_s = args.row_budget_s if args.row_budget_s is not None else (1.0 if args.smoke else 4.0)
  args.dispatch = 4 if args.smoke else DISPATCH
  args.steps = args.steps or args.dispatch
  if args.steps < args.dispatch or args.steps % args.dispatch:
    p.error(f"--steps must be a multiple of {args.dispatch} (the dispatch rows' updates per call), got {args.steps}")
  return args


# ----------------------------------------------------------------------------- FLOPs and peaks

def program_flops(jitted, *args) -> float | None:
  """FLOPs of jitted(*args): XLA's cost_analysis() of its compiled program (a cache hit once it has run), or None.

  """
  flops = utilisation.cost_flops(jitted.lower(*args).compile()) or 0.0
  return flops if flops > 0 else None


def update_flops(update, first_call) -> float | None:
  """FLOPs of one update of one device's program, read by the batch source's own update (train_step.AotUpdate:
  XLA's cost analysis when its first call, first_call(), compiles it; snapjax/utilisation.py), or None."""
  first_call()
  total = getattr(update, "flops_per_step", None)  # Every device's FLOPs of one update.
  return total / jax.device_count() if total else None


def peak(args, dtype: str) -> tuple[float | None, str]:
  """(peak FLOP/s of this device in dtype or None, where it came from)."""
  if args.peak_flops:
    return args.peak_flops, "--peak_flops"
  found = utilisation.find_peak(jax.devices()[0].device_kind)
  return (getattr(found, dtype), f"snapjax.utilisation.PEAK_FLOPS[{found.name!r}]") if found else (None, "unknown")


# ----------------------------------------------------------------------------- timing

def measure(call, units: int, args, first=None) -> tuple[list[float], float]:
  """(seconds per unit of each timed repeat of call(), warm-up seconds); first() (default call) is the warm-up."""
  t0 = time.perf_counter()
  (first or call)()
  warm = time.perf_counter() - t0
  times, start = [], time.perf_counter()
  while len(times) < args.repeats and (not times or time.perf_counter() - start < args.row_budget_s):
    t0 = time.perf_counter()
    call()
    times.append((time.perf_counter() - t0) / units)
  return times, warm


def stepper(update, state, steps: int, per_call: int):
  """call() that runs `steps` more updates through update(state, done, n), at most per_call a dispatch and never across
  an epoch's end (dispatch.dispatch_end, as the training loop), and waits for them."""
  box = {"state": state, "done": 0}

  def call():
    state, done, metrics = box["state"], box["done"], None
    end_total = done + steps
    while done < end_total:
      end = dispatch.dispatch_end(done, per_call, end_total, every=(EPOCH_STEPS,))
      state, metrics = update(state, done, end - done)
      done = end
    jax.block_until_ready(metrics)
    box.update(state=state, done=done)

  return call


def fill(row: dict, times: list[float], warm: float, units: int, images_per_unit: int, flops_per_unit: float | None,
         args) -> None:
  """The row's timing, throughput and utilisation columns from measure()'s result."""
  med = statistics.median(times)
  flops_per_s = flops_per_unit / med if flops_per_unit else None
  top, _ = peak(args, row["dtype"])
  row.update(ms=1e3 * med, ms_min=1e3 * min(times), ms_max=1e3 * max(times), repeats=len(times),
             units_per_repeat=units, images_per_s=images_per_unit / med, ms_per_image=1e3 * med / images_per_unit,
             flops_per_unit=flops_per_unit, tflops_per_s=flops_per_s / 1e12 if flops_per_s else None,
             mfu=flops_per_s / top if flops_per_s and top else "n/a",
             compile_s=max(warm - med * units, 0.0))


# ----------------------------------------------------------------------------- the rows

def _shape(size: int) -> str:
  return f"{size}x{size}x3"


def train_rows(args) -> list[dict]:
  """The train rows (steps_per_dispatch 1) and dispatch rows (16), paper batches before large ones."""
  rows = {"train": [], "dispatch": []}
  for i in range(2):
    for model, dataset, size, batches in TRAIN_MODELS:
      if i >= len(batches):
        continue
      for dtype in args.dtypes:
        row = {"model": model, "dataset": dataset, "input": _shape(size), "batch": batches[i], "dtype": dtype,
               "size": size, "key": f"{model} {_shape(size)} batch {batches[i]}"}
        if args.smoke:
          row.update(model=SMOKE_MODEL, stands_for=row["key"], input=_shape(SMOKE_SIZE), size=SMOKE_SIZE, batch=8)
        rows["train"].append({**row, "kind": "train", "steps_per_dispatch": 1, "variant": "1 update / call"})
        if i == 0 and dataset == "cifar10":
          rows["dispatch"].append({**row, "kind": "dispatch", "steps_per_dispatch": args.dispatch,
                                   "variant": f"{args.dispatch} updates / call"})
  return rows["train"] + rows["dispatch"]


def _config(model: str, dataset: str, size: int, batch: int, dtype: str):
  c = config_lib.base_config()
  c.model, c.dataset, c.batch_size, c.dtype, c.init_lr = model, dataset, batch, dtype, 0.1
  if dataset == "imagenet2012":
    c.image_size = size
  return c


def _training(c, size: int):
  """(experiment, random training split of EPOCH_STEPS batches, plan, schedule, optimiser) of config c."""
  exp = experiment.build(c)
  arrays = members_bench.random_split(c.batch_size * EPOCH_STEPS, size)
  plan = train_step.Plan(steps_per_epoch=EPOCH_STEPS, total_steps=10 ** 6, snapshot_steps=(10 ** 6,))
  schedule = train_step.make_schedule(c, plan.total_steps)
  return exp, arrays, plan, schedule, train_step.make_optimizer(c, schedule)


def row_key(row: dict) -> tuple:
  """How later rows find this one in `done`: train and dispatch by the row they stand for and dtype."""
  if row["kind"] in ("train", "dispatch"):
    return row["kind"], row["key"], row["dtype"]
  if row["kind"] == "members":
    return "members", row["members"], row["strategy"]
  return row["kind"], row.get("strategy"), row["batch"] if row["kind"] == "export" else None


def _program(row: dict) -> tuple:
  """What a train or dispatch row compiles and times: rows equal in it run the same program."""
  return tuple(row.get(k) for k in ("kind", "model", "dataset", "size", "batch", "dtype", "steps_per_dispatch"))


def run_train(row: dict, args, done: dict) -> None:
  c = _config(row["model"], row["dataset"], row["size"], row["batch"], row["dtype"])
  exp, arrays, plan, schedule, tx = _training(c, row["size"])
  k = row["steps_per_dispatch"]
  update, state = members_bench.one_member_update(exp, tx, schedule, arrays, plan, k)
  call = stepper(update, state, args.steps, k)
  flops = {}
  if k == 1:
    first = lambda: flops.update(f=update_flops(update, call))  # noqa: E731
  else:  # A loop program's cost counts its body once: the one-update program's count (the train row's).
    first = None
    flops["f"] = done.get(("train", row["key"], row["dtype"]), {}).get("flops_per_unit")
  times, warm = measure(call, args.steps, args, first)
  fill(row, times, warm, args.steps, row["batch"], flops.get("f"), args)
  base = done.get(("train", row["key"], row["dtype"] if k > 1 else "float32"))
  if base and base.get("status") == "ok":
    row["vs"] = base["ms"] / row["ms"]
    row["vs_what"] = "1 update / call" if k > 1 else "float32"


def member_rows(args) -> list[dict]:
  model, batch = (SMOKE_MODEL, 8) if args.smoke else (args.members_model, args.members_batch)
  size = SMOKE_SIZE if args.smoke else 32
  rows = []
  for k in args.members:
    for strategy in ([None] if k == 1 else args.strategies):
      rows.append({"kind": "members", "model": model, "dataset": "cifar10", "input": _shape(size), "size": size,
                   "batch": batch, "dtype": "float32", "members": k, "strategy": strategy,
                   "steps_per_dispatch": 1, "variant": f"K={k} {strategy}" if strategy else "K=1 one-member program"})
  return rows


def run_members(row: dict, args, done: dict) -> None:
  c = _config(row["model"], row["dataset"], row["size"], row["batch"], row["dtype"])
  exp, arrays, plan, schedule, tx = _training(c, row["size"])
  k = row["members"]
  flops = {}
  if k == 1:
    update, state = members_bench.one_member_update(exp, tx, schedule, arrays, plan)
    call = stepper(update, state, args.steps, 1)
    first = lambda: flops.update(f=update_flops(update, call))  # noqa: E731
  else:
    c.num_members, c.member_groups, c.member_strategy = k, 0, row["strategy"]
    update, state = members_bench.member_update(exp, tx, schedule, arrays, plan, c)
    call, first = stepper(update, state, args.steps, 1), None
    one = done.get(("members", 1, None))
    flops["f"] = k * one["flops_per_unit"] if one and one.get("flops_per_unit") else None
  times, warm = measure(call, args.steps, args, first)
  fill(row, times, warm, args.steps, k * row["batch"], flops.get("f"), args)
  one = row if k == 1 else done.get(("members", 1, None))
  if one and one.get("status", "ok") == "ok" and "ms" in one:
    row["vs"] = k * one["ms"] / row["ms"]
    row["vs_what"] = "K one-member runs"


def predict_rows(args) -> list[dict]:
  model, size, batch = (SMOKE_MODEL, SMOKE_SIZE, 8) if args.smoke else (args.ensemble_model, 32, args.eval_batch)
  common = {"model": model, "dataset": "cifar10", "input": _shape(size), "size": size, "dtype": "float32",
            "members": args.ensemble_members}
  rows = [{**common, "kind": "ensemble", "batch": batch, "strategy": s, "variant": f"M={args.ensemble_members} {s}"}
          for s in ("auto", "map", "loop", "vmap")]
  rows += [{**common, "kind": "export", "batch": b, "variant": f"exported M={args.ensemble_members}, batch {b}"}
           for b in (1, batch)]
  return rows


def _snapshots(row: dict, cache: dict):
  """(experiment, stacked M snapshots, device batch, FLOPs of one snapshot's forward pass on it), made once."""
  if "stacked" not in cache:
    c = _config(row["model"], row["dataset"], row["size"], 8, row["dtype"])
    exp = experiment.build(c)
    init = jax.jit(exp.init_variables)
    snaps = [init(jax.random.key(i)) for i in range(row["members"])]
    x = data.normalize(members_bench.random_split(row["batch"], row["size"])[0], exp.spec)
    forward = jax.jit(exp.apply_fn)
    jax.block_until_ready(forward(snaps[0], x))
    cache.update(exp=exp, stacked=snapjax.stack_snapshots(snaps), x=x, batch=row["batch"],
                 forward_flops=program_flops(forward, snaps[0], x))
  return cache["exp"], cache["stacked"], cache["x"], cache["forward_flops"]


def run_ensemble(row: dict, args, done: dict, cache: dict) -> None:
  exp, stacked, x, forward = _snapshots(row, cache)

  def call():
    for _ in range(args.steps):
      out = snapjax.ensemble_predict(exp.apply_fn, stacked, x, strategy=row["strategy"])
    jax.block_until_ready(out)

  row["resolved"] = snapjax.ensemble.resolve_strategy(row["strategy"], x)
  times, warm = measure(call, args.steps, args)
  fill(row, times, warm, args.steps, row["batch"], row["members"] * forward if forward else None, args)
  auto = done.get(("ensemble", "auto", None))
  if auto and auto.get("status") == "ok":
    row["vs"], row["vs_what"] = auto["ms"] / row["ms"], "auto"


def run_export(row: dict, args, done: dict, cache: dict) -> None:
  exp, stacked, _, forward = _snapshots(row, cache)
  if "exported" not in cache:
    t0 = time.perf_counter()
    example = jax.ShapeDtypeStruct((1, row["size"], row["size"], 3), np.uint8)
    blob = snapjax.export_ensemble(exp.apply_fn, stacked, example, preprocess=lambda x: data.normalize(x, exp.spec))
    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "ensemble.jax")
      with open(path, "wb") as f:
        f.write(blob)
      cache["exported"] = snapjax.load_exported(path)
    cache["export_s"] = time.perf_counter() - t0
  model = cache["exported"]
  x = members_bench.random_split(row["batch"], row["size"])[0]  # Host uint8 images, as a server receives them.

  def call():
    for _ in range(args.steps):
      out = model(x)
    jax.block_until_ready(out)

  times, warm = measure(call, args.steps, args)
  per_image = row["members"] * forward / cache["batch"] if forward else None
  fill(row, times, warm, args.steps, row["batch"], per_image * row["batch"] if per_image else None, args)
  row.update(export_s=cache["export_s"], platforms=list(model.platforms))


# ----------------------------------------------------------------------------- the run

def _error(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _fmt(v, spec: str, missing: str = "-") -> str:
  if v is None:
    return missing
  if isinstance(v, str):
    return v
  return format(v, spec) if math.isfinite(v) else str(v)


def table(rows: list[dict]) -> str:
  lines = ["| kind | model | input | batch | dtype | variant | ms / step or call | images/s | ms / image | TFLOP/s | "
           "MFU | vs | compile s | repeats | status |", "|" + "---|" * 15]
  for r in rows:
    ok = r.get("status") == "ok"
    mfu = r.get("mfu")
    mfu = f"{100 * mfu:.1f}%" if isinstance(mfu, float) else (mfu or "-")
    vs = f"{r['vs']:.2f}x {r['vs_what']}" if ok and "vs" in r else "-"
    model = r["model"] + (f" (for {r['stands_for']})" if "stands_for" in r else "")
    status = "ok" if ok else f"{r.get('status', '?')}: {r.get('error', '')}"
    lines.append(
        f"| {r['kind']} | {model} | {r['input']} | {r['batch']} | {r['dtype']} | {r['variant']} | "
        f"{_fmt(r.get('ms'), '.2f')} | {_fmt(r.get('images_per_s'), ',.0f')} | {_fmt(r.get('ms_per_image'), '.4f')} | "
        f"{_fmt(r.get('tflops_per_s'), '.3g')} | {mfu if ok else '-'} | {vs} | {_fmt(r.get('compile_s'), '.1f')} | "
        f"{r.get('repeats', '-')} | {status} |")
  return "\n".join(lines)


def _write(path: str | None, doc: dict) -> None:
  if not path:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=1)
  os.replace(tmp, path)


def main(argv=None) -> int:
  args = _parse(argv)
  t_start = time.monotonic()
  if args.compilation_cache_dir or (args.smoke and not jax.config.jax_compilation_cache_dir):
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir or tempfile.mkdtemp(prefix="jaxcache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  device = jax.devices()[0]
  peaks = {d: peak(args, d) for d in config_lib.DTYPES}
  command = shlex.join(["python", "benchmarks/accelerator.py", *(sys.argv[1:] if argv is None else argv)])
  doc = {"command": command, "device_kind": device.device_kind, "platform": device.platform,
         "num_devices": jax.device_count(), "jax_version": jax.__version__, "smoke": args.smoke,
         "peak_flops": {d: p[0] for d, p in peaks.items()}, "peak_source": peaks["float32"][1],
         "budget_s": args.budget_s, "row_budget_s": args.row_budget_s, "repeats": args.repeats,
         "steps_per_repeat": args.steps, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rows": []}
  print(f"command: {command}\ndevice: {device.device_kind} ({jax.device_count()} x {device.platform}), "
        f"jax {jax.__version__}\npeak FLOP/s: " + ", ".join(
            f"{d} {p[0]:.3g}" if p[0] else f"{d} unknown" for d, p in peaks.items()) +
        f" ({peaks['float32'][1]}{'; MFU n/a, give --peak_flops' if not peaks['float32'][0] else ''})\n"
        f"budget {args.budget_s:.0f} s for all rows; per row at most {args.repeats} timed repeats of {args.steps} "
        f"updates or calls, {args.row_budget_s:g} s of them", flush=True)

  plans = {"train": [r for r in train_rows(args) if r["kind"] == "train"],
           "dispatch": [r for r in train_rows(args) if r["kind"] == "dispatch"],
           "members": member_rows(args), "ensemble": predict_rows(args)[:4], "export": predict_rows(args)[4:]}
  runners = {"train": run_train, "dispatch": run_train, "members": run_members}
  done, cache, share, programs = {}, {}, 0.0, {}
  for kind in KINDS:
    share += SHARES[kind]
    if kind not in args.sections:
      continue
    deadline = t_start + args.budget_s * share
    for row in plans[kind]:
      doc["rows"].append(row)
      same = programs.get(_program(row)) if args.smoke else None
      if time.monotonic() >= deadline:
        row.update(status="skipped", error=f"past the {kind} rows' share of --budget_s")
      elif same is not None:  # --smoke: resnet8 stands for every model, so most train rows are one program.
        row.update({k: v for k, v in same.items() if k not in row}, same_program_as=same["stands_for"])
      else:
        try:
          if kind in runners:
            runners[kind](row, args, done)
          else:
            (run_ensemble if kind == "ensemble" else run_export)(row, args, done, cache)
          row["status"] = "ok"
        except Exception as e:  # noqa: BLE001  Out of memory, unsupported: report it and go on.
          row.update(status="failed", error=_error(e))
      done[row_key(row)] = row
      if row["status"] == "ok" and kind in ("train", "dispatch"):
        programs.setdefault(_program(row), row)
      # Frees the row's buffers (a copied row has none); a full collection of a large heap takes seconds.
      if row["status"] != "skipped" and "same_program_as" not in row:
        gc.collect()
      status = row["status"] if row["status"] != "ok" else (
          f"{row['ms']:.2f} ms, {row['images_per_s']:,.0f} images/s, MFU "
          f"{row['mfu'] if isinstance(row['mfu'], str) else format(row['mfu'], '.1%')}, compile {row['compile_s']:.1f} s")
      if "same_program_as" in row:
        status += f" (the program of the row for {row['same_program_as']}: not timed again)"
      print(f"[{time.monotonic() - t_start:5.0f} s] {kind} {row['model']} {row['input']} batch {row['batch']} "
            f"{row['dtype']} {row['variant']}: {status}{' (' + row['error'] + ')' if 'error' in row else ''}",
            flush=True)
      doc["wall_s"] = time.monotonic() - t_start
      _write(args.json, doc)
  doc["wall_s"] = time.monotonic() - t_start
  _write(args.json, doc)
  print(f"\n{device.device_kind}, jax {jax.__version__}; {doc['wall_s']:.0f} s; ms / step or call: median of the timed "
        f"repeats (train, dispatch: one update; members: one update of all K; ensemble, export: one call on the "
        f"batch)\n")
  print(table(doc["rows"]))
  if args.json:
    print(f"\nwrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
