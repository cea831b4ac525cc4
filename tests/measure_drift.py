"""How far apart do two device layouts of one run drift, step by step, and why? Prints a table.

  python tests/measure_drift.py [--isa AVX2] [--lr 1e-4] [--steps 8] [--every 1]

Runs the multi-host tests' tiny config (resnet8, batch 32, half an epoch, 2 cycles) several ways, each in its own
process (tests/multihost_worker.py), saving the train state after every step, and prints per step the largest
|difference| from the 1-process x 4-device run over params, batch_stats and the momentum traces (the gradients):

  1x4 -O      1 process x 4 devices again: 0 shows that a run is bitwise deterministic.
  2x2         2 processes x 2 devices over gloo: the same mesh of 4 devices, the same data rows per device, the
              same RNG folds; only the order in which the cross-process all-reduces sum differs.
  2x2 again   the same, again.
  1x4 +1ulp   1 process x 4 devices with every initial parameter moved by one float32 ulp (random signs): a
              rounding-sized change of every weight, which can move activations across ReLU kinks.
  1x4 native  (with --isa) 1 process x 4 devices compiled for this machine's own ISA.

`--isa AVX2` passes --xla_cpu_max_isa=AVX2 to XLA in every leg, so an AVX-512 machine generates the code an
AVX2-only machine runs, with its own order of sums. At the tiny config's init_lr=0.1, training amplifies the 2x2
legs' rounding differences step by step; at --lr 1e-4 it does not, which is what tests/test_multihost.py uses.
"""
import argparse
import os
import sys
import tempfile

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)

import helpers  # noqa: E402


def _leg(name, data_dir, out, steps, num_processes, devices_per_process, isa, every=1, **env_extra):
  workdir = os.path.join(out, name, "run")
  os.makedirs(os.path.join(out, name))
  dump = os.path.join(out, name, "state")  # The worker adds ".<step>.npz"; several processes add their index.
  extra_flags = [f"--xla_cpu_max_isa={isa}"] if isa else []
  env = helpers.subprocess_env(devices_per_process, extra_flags, SNAPJAX_WORKER_SAVED=dump, **env_extra)
  overrides = {"num_epochs": steps / 16, "checkpoint_every_steps": every, "init_lr": LR}
  argv = helpers.train_argv(helpers.WORKER, data_dir, workdir, overrides)
  if num_processes == 1:
    argvs = [argv]
  else:
    port = helpers.free_port()
    argvs = [argv + ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(num_processes),
                     "--process_id", str(i), "--cpu_collectives", "gloo"] for i in range(num_processes)]
  helpers.launch(argvs, env, os.path.join(out, name))
  return {s: _variables(np.load(f"{dump}.{s}.npz")) for s in range(1, steps + 1)
          if os.path.exists(f"{dump}.{s}.npz")}


def _variables(npz):
  return {k: npz[k] for k in npz.files if k.startswith(("['params']", "['batch_stats']", "['opt_state']"))
          and npz[k].dtype.kind == "f"}


def _max_diff(a, b):
  """(largest |a - b|, its leaf, |a| there) over the leaves."""
  worst = (0.0, "", 0.0)
  for k in a:
    d = np.abs(a[k] - b[k])
    i = np.unravel_index(np.argmax(d), d.shape) if d.size else ()
    if d.size and d[i] > worst[0]:
      worst = (float(d[i]), k, float(abs(a[k][i])))
  return worst


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--isa", default="", help="XLA's --xla_cpu_max_isa for every leg (e.g. AVX2); default: the CPU's")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--every", type=int, default=1, help="checkpoint_every_steps (the state is dumped when saved)")
  parser.add_argument("--lr", type=float, default=0.1, help="init_lr")
  args = parser.parse_args()
  global LR
  LR = args.lr
  with tempfile.TemporaryDirectory() as out:
    data_dir = helpers.make_tiny_fashion_mnist(os.path.join(out, "data"))
    legs = {"1x4": _leg("ref", data_dir, out, args.steps, 1, 4, args.isa, args.every),
            "1x4 -O": _leg("again", data_dir, out, args.steps, 1, 4, args.isa, args.every),
            "2x2": _leg("2x2", data_dir, out, args.steps, 2, 2, args.isa, args.every),
            "2x2 again": _leg("2x2again", data_dir, out, args.steps, 2, 2, args.isa, args.every),
            "1x4 +1ulp": _leg("ulp", data_dir, out, args.steps, 1, 4, args.isa, args.every, SNAPJAX_WORKER_PERTURB_ULPS="1")}
    if args.isa:  # The same layout, compiled for the machine's own ISA.
      legs["1x4 native"] = _leg("native", data_dir, out, args.steps, 1, 4, "", args.every)
  ref = legs.pop("1x4")
  two = legs["2x2"]
  print("2x2 again vs 2x2: " + " ".join(f"{_max_diff(legs['2x2 again'][s], two[s])[0]:.2e}" for s in sorted(two)))
  print(f"max |leg - 1x4| over params and batch_stats after each step (isa: {args.isa or 'native'})")
  print("| step | " + " | ".join(legs) + " | where (2x2): leaf, |value| |")
  print("|---|" + "---|" * len(legs) + "---|")
  for s in sorted(ref):
    cells = [_max_diff(legs[name][s], ref[s]) for name in legs]
    where = _max_diff(legs["2x2"][s], ref[s])
    print(f"| {s} | " + " | ".join(f"{c[0]:.2e}" for c in cells) + f" | {where[1]}, {where[2]:.3g} |")


if __name__ == "__main__":
  main()
