"""The quickstart's whole job, train + evaluate, in snapjax and in PyTorch, side by side in one run on this CPU.

  python benchmarks/end_to_end.py [--epochs 30] [--cycles 5] [--one_core] [--threads N] [--json PATH] [--skip_torch]

The job (snapjax.methods.quickstart_config(), --epochs and --cycles shorten it): ResNet-8 (option-A shortcuts) on the
first 10,000 Fashion-MNIST training images from Debian's IDX files (--fashion_mnist_dir), no augmentation, normalised
with the dataset's mean and std, batch 128 (78 steps an epoch, the remainder dropped), SGD with Nesterov momentum 0.9
and weight decay 1e-4 added to the gradient at the learning rate of snapjax.snapshot_schedule (alpha0 = 0.2, M cosine
cycles), a snapshot at the end of every cycle, scored on the 10,000 test images when it is taken and saved to disk,
the train state saved every 234 steps; then the evaluation: every snapshot read back from disk and the ensemble of
the M snapshots' mean softmax scored on the test set.

  snapjax: snapjax.training.train_and_evaluate(config, workdir) then snapjax.evaluation.evaluate_runs([workdir],
           plot=False) (eval.py without its figures), as `bash scripts/quickstart.sh` runs them.
  PyTorch: the same steps in eager mode (benchmarks/torch_models.py's twin of the network, channels_last,
           torch.optim.SGD(nesterov=True, weight_decay=1e-4, foreach=True), the learning rate of every step from
           the same schedule), starting from the very weights snapjax's run starts from (copied); torch.save for
           snapshots and train state.

Both see the same images, but in another order (each its own random permutation per epoch) and with their own
floating-point arithmetic, so their test errors differ as two seeds' would. Images/s: the training images (steps x
128) over the wall time of the training call, compilation included, and over that time less XLA's compile time
(jax.monitoring's backend-compile events); the whole job's seconds include the evaluation.
"""
import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time

if "--one_core" in sys.argv:  # Before JAX and PyTorch size their thread pools.
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # This checkout's snapjax and benchmarks.

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

import snapjax  # noqa: E402
from snapjax import cli, data, evaluation, experiment, methods, train_step, training  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _parse(argv=None) -> argparse.Namespace:
  c = methods.quickstart_config()
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--epochs", type=float, default=c.num_epochs, help="training epochs (the quickstart's: 30)")
  p.add_argument("--cycles", type=int, default=c.num_cycles, help="cosine cycles = snapshots (the quickstart's: 5)")
  p.add_argument("--fashion_mnist_dir", default=c.fashion_mnist_dir, help="the four IDX files")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
  p.add_argument("--one_core", action="store_true",
                 help="pin the process to one core (PyTorch 1 thread, XLA sizes its pools from the affinity)")
  p.add_argument("--skip_torch", action="store_true", help="run the snapjax side only")
  p.add_argument("--workdir", default=None, help="snapjax's run and PyTorch's files (default: a temporary folder)")
  p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  args = p.parse_args(argv)
  if args.one_core:
    args.threads = 1
  return args


def quickstart(args):
  """The quickstart's config at --epochs and --cycles."""
  c = methods.quickstart_config()
  c.num_epochs, c.num_cycles, c.fashion_mnist_dir = float(args.epochs), args.cycles, args.fashion_mnist_dir
  return c


@contextlib.contextmanager
def compile_seconds():
  """A dict whose 's' adds up XLA's backend compile time inside the block."""
  total = {"s": 0.0}

  def listener(event, duration, **_):
    if event == COMPILE_EVENT:
      total["s"] += duration

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield total
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def run_snapjax(c, workdir: str) -> dict:
  t0 = time.perf_counter()
  with compile_seconds() as compiled:
    result = training.train_and_evaluate(c, workdir)
  train_s, train_compile_s = time.perf_counter() - t0, compiled["s"]
  t0 = time.perf_counter()
  with compile_seconds() as compiled:
    report = evaluation.evaluate_runs([workdir], plot=False)
  return {"train_s": train_s, "compile_s": train_compile_s, "eval_s": time.perf_counter() - t0,
          "eval_compile_s": compiled["s"], "steps": result.step,
          "snapshot_errors": [s["error"] for s in report["snapshots"]], "ensemble_error": report["ensemble"]["error"]}


def run_torch(c, args, workdir: str, init_variables) -> dict:
  import torch
  import torch.nn.functional as F
  from benchmarks import torch_models
  torch.set_num_threads(args.threads)
  torch.manual_seed(c.seed)
  exp = experiment.build(c)
  images, labels = exp.load_split(c.train_split)
  test_images, test_labels = exp.load_split(exp.spec.eval_split)
  plan = train_step.make_plan(c, len(labels))
  lrs = np.asarray(snapjax.snapshot_schedule(c.init_lr, plan.total_steps, c.num_cycles)(np.arange(plan.total_steps)))

  def tensor(x):  # uint8 N x H x W x C -> normalised float32 N x C x H x W, channels_last.
    x = np.asarray(data.normalize(x, exp.spec))
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=torch.channels_last)

  x_train, y_train = tensor(images), torch.from_numpy(labels.astype(np.int64))
  x_test, y_test = tensor(test_images), torch.from_numpy(test_labels.astype(np.int64))
  model = torch_models.get(c.model, exp.spec.num_classes, in_channels=exp.spec.image_shape[-1])
  torch_models.load_flax_variables(model, init_variables)
  model = model.to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=c.init_lr, momentum=c.momentum, nesterov=c.nesterov,
                        weight_decay=c.weight_decay, foreach=True)

  @torch.inference_mode()
  def test_probs(net):
    net.eval()
    out = torch.cat([F.softmax(net(x_test[i:i + c.eval_batch_size]), -1)
                     for i in range(0, len(x_test), c.eval_batch_size)])
    net.train()
    return out

  def error(probs):
    return float((probs.argmax(-1) != y_test).float().mean())

  rng = np.random.default_rng(c.seed)
  snaps, errors, b = [], [], c.batch_size
  t0 = time.perf_counter()
  model.train()
  for step in range(plan.total_steps):
    epoch, i = divmod(step, plan.steps_per_epoch)
    if i == 0:
      perm = torch.from_numpy(rng.permutation(len(labels)))
    idx = perm[i * b:(i + 1) * b]
    for group in opt.param_groups:
      group["lr"] = float(lrs[step])
    loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    done = step + 1
    if done % c.log_every_steps == 0 or done == plan.total_steps:
      print(f"pytorch step {done}/{plan.total_steps} epoch {done / plan.steps_per_epoch:.2f} loss {loss.item():.4f} "
            f"{done * b / (time.perf_counter() - t0):.0f} img/s", flush=True)
    if done in plan.snapshot_steps:  # Scored when taken (eval_snapshots) and saved.
      errors.append(error(test_probs(model)))
      path = os.path.join(workdir, f"snapshot_{done}.pt")
      torch.save(model.state_dict(), path)
      snaps.append(path)
    if done % c.checkpoint_every_steps == 0:
      torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": done},
                 os.path.join(workdir, "state.pt"))
  train_s = time.perf_counter() - t0
  t0 = time.perf_counter()  # The evaluation: every snapshot read back, scored, and the ensemble's mean softmax.
  probs = []
  for path in snaps:
    model.load_state_dict(torch.load(path))
    probs.append(test_probs(model))
  eval_errors = [error(p) for p in probs]
  ensemble_error = error(torch.stack(probs).mean(0))
  return {"train_s": train_s, "compile_s": 0.0, "eval_s": time.perf_counter() - t0, "eval_compile_s": 0.0,
          "steps": plan.total_steps, "snapshot_errors": eval_errors, "snapshot_errors_when_taken": errors,
          "ensemble_error": ensemble_error, "threads": torch.get_num_threads(), "torch_version": torch.__version__}


def table(c, results: dict) -> str:
  """Markdown: one column per side that ran, and snapjax / PyTorch where both did."""
  sides = [s for s in ("snapjax", "pytorch") if s in results]
  both = len(sides) == 2
  r = {s: results[s] for s in sides}
  images = {s: r[s]["steps"] * c.batch_size for s in sides}
  rate = {s: images[s] / r[s]["train_s"] for s in sides}
  rate_nc = {s: images[s] / (r[s]["train_s"] - r[s]["compile_s"]) for s in sides}
  job = {s: r[s]["train_s"] + r[s]["eval_s"] for s in sides}

  def line(name, cell, ratio=""):
    return "| " + " | ".join([name, *(cell(s) for s in sides), *([ratio] if both else [])]) + " |"

  def ratio(v):
    return f"{v['snapjax'] / v['pytorch']:.2f}x" if both else ""

  header = ["", *({"snapjax": "snapjax", "pytorch": "PyTorch"}[s] for s in sides), *(["snapjax / PyTorch"] if both
                                                                                        else [])]
  return "\n".join([
      "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
      line("training, s (compiles, snapshot scoring and saving included)", lambda s: f"{r[s]['train_s']:.1f}"),
      line("of which XLA compiling, s", lambda s: f"{r[s]['compile_s']:.1f}" if s == "snapjax" else "-"),
      line("training images/s", lambda s: f"{rate[s]:,.0f}", ratio(rate)),
      line("training images/s, compiling left out", lambda s: f"{rate_nc[s]:,.0f}", ratio(rate_nc)),
      line("evaluation, s", lambda s: f"{r[s]['eval_s']:.1f}"),
      line("whole job, s", lambda s: f"{job[s]:.1f}", f"{job['pytorch'] / job['snapjax']:.2f}x as fast" if both else ""),
      line(f"test error of each of the {c.num_cycles} snapshots, %",
           lambda s: " / ".join(f"{100 * e:.2f}" for e in r[s]["snapshot_errors"])),
      line(f"test error of their ensemble, %", lambda s: f"{100 * r[s]['ensemble_error']:.2f}",
           "differ as two seeds would (own data order and arithmetic)" if both else ""),
  ])


def main(argv=None) -> int:
  args = _parse(argv)
  absl_logging.use_absl_handler()  # As under train.py's app.run: the handler setup_logging quiets orbax's INFO in.
  cli.setup_logging()
  c = quickstart(args)
  command = " ".join(["python benchmarks/end_to_end.py", *(sys.argv[1:] if argv is None else argv)])
  workdir = args.workdir or tempfile.mkdtemp(prefix="end_to_end_")
  os.makedirs(workdir, exist_ok=True)
  print(f"command: {command}\njax {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s), "
        f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} core(s) for this process; "
        f"load average {os.getloadavg()[0]:.2f}; workdir {workdir}", flush=True)
  loads, results = [os.getloadavg()[0]], {}
  results["snapjax"] = run_snapjax(c, os.path.join(workdir, "snapjax"))
  loads.append(os.getloadavg()[0])
  print(f"snapjax done: {results['snapjax']}; load average {loads[-1]:.2f}", flush=True)
  if not args.skip_torch:
    init_key = jax.random.split(jax.random.PRNGKey(c.seed), 4)[0]  # As snapjax's run draws it (train/one_member.py).
    init_variables = jax.device_get(experiment.build(c).init_variables(init_key))
    torch_dir = os.path.join(workdir, "pytorch")
    os.makedirs(torch_dir, exist_ok=True)
    results["pytorch"] = run_torch(c, args, torch_dir, init_variables)
    loads.append(os.getloadavg()[0])
    print(f"pytorch done: {results['pytorch']}; load average {loads[-1]:.2f}", flush=True)
  print(f"\n{command}: ResNet-8, {c.num_epochs:g} epochs x {train_step.make_plan(c, 10_000).steps_per_epoch} steps of "
        f"batch {c.batch_size}, {c.num_cycles} cycles; jax {jax.__version__}"
        + (f", PyTorch {results['pytorch']['torch_version']} ({results['pytorch']['threads']} threads)"
           if "pytorch" in results else "") +
        f"; load average {', '.join(f'{v:.1f}' for v in loads)} (start, after each side)\n")
  print(table(c, results))
  print("\nBoth jobs are their train steps, by far: what limits snapjax's step on this CPU (XLA:CPU's convolution "
        "kernels, then BatchNorm) is docs/performance.md, \"What limits the CPU train step\".")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"command": command, "load_average": loads, "results": results}, f, indent=1)
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
