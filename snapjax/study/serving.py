"""The serving cost on the study's page: one network's ms per example at a large batch and its weights MB, measured
in this process on one finished run, with the fused ensemble of all that run's snapshots beside it.

    python -m snapjax.study.serving --workdir RUN --out FILE   # The study's last step, "serve/network".

`measure` restores RUN's snapshots (snapjax.runs, checksums checked), serves raw test images from host memory
through the fused evaluator (`snapjax.ensemble.ensemble_predict` in one jitted program, the run's normalisation
inside, as eval.py scores them) and writes FILE: {"workdir", "steps", "large_batch", "repeats", "load_average",
"single", "ensemble"}, the last two each {"networks", "ms_per_example" (the median over `repeats` timed calls on
`large_batch` test images, after a warm-up call that compiles, divided by the images), "times_s", "weights_mb"
(float32 bytes of the variables served: parameters and BatchNorm statistics, / 2**20)}.

The page derives each arm's serving cost from it: the networks the arm serves x the single network's measurement
(every arm serves ResNet-8s; the measured ensemble, beside the derivation, checks that the cost is linear in them).
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from snapjax import checkpoints

LARGE_BATCH = 1000
REPEATS = 7


def weights_mb(tree: Any) -> float:
  """MB (2**20 bytes) of the arrays of a pytree."""
  import jax
  import numpy as np
  return sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree)) / 2 ** 20


def _timed(fn, images, repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls of fn on images, after one warm-up call (its compilation)."""
  import jax
  jax.block_until_ready(fn(images))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(images))
    times.append(time.perf_counter() - t0)
  return times


def measure(workdir: str, out_file: str, large_batch: int = LARGE_BATCH, repeats: int = REPEATS) -> dict[str, Any]:
  """Times the last snapshot of `workdir` alone and the ensemble of all its snapshots; writes and returns FILE's
  dict (module docstring). Raises snapjax.errors.UserError for a workdir that is not a finished run."""
  import jax
  from snapjax import data, ensemble, experiment, runs
  exp = experiment.build(runs.load_run_config(workdir))
  members = runs.restore_members([workdir], exp)
  images = exp.load_test_data()[0][:large_batch]
  predict = jax.jit(lambda v, raw: ensemble.ensemble_predict(exp.apply_fn, v, data.normalize(raw, exp.spec)))
  out = {"workdir": os.path.abspath(workdir), "steps": [m.step for m in members], "large_batch": int(len(images)),
         "repeats": repeats, "backend": jax.default_backend(), "load_average": list(os.getloadavg())}
  for name, group in (("single", members[-1:]), ("ensemble", members)):
    stacked = ensemble.stack_snapshots([m.variables for m in group])
    times = _timed(lambda raw, stacked=stacked: predict(stacked, raw), images, repeats)
    out[name] = {"networks": len(group), "ms_per_example": 1e3 * statistics.median(times) / len(images),
                 "times_s": times, "weights_mb": weights_mb(stacked)}
  os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
  tmp = out_file + ".tmp"
  with open(tmp, "w") as f:
    json.dump(out, f, indent=1)
  os.replace(tmp, out_file)
  return out


def read(out_file: str) -> dict[str, Any] | None:
  """FILE's dict, or None when it is missing."""
  if not os.path.exists(out_file):
    return None
  with open(out_file) as f:
    return json.load(f)


def is_fresh(out_file: str, workdir: str) -> bool:
  """Does FILE hold a measurement of `workdir`'s snapshots as they are now?"""
  got = read(out_file)
  return bool(got) and got.get("workdir") == os.path.abspath(workdir) and got.get("steps") == list(
      checkpoints.saved_snapshot_steps(workdir))


def main(argv: list[str] | None = None) -> int:
  """The command line: measure, print one line, exit 0; bad flags or a workdir that is not a finished run are a
  one-line error and exit code 2."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a finished train.py run")
  p.add_argument("--out", required=True, help="the JSON file to write")
  p.add_argument("--large_batch", type=int, default=LARGE_BATCH, help=f"test images per call (default {LARGE_BATCH})")
  p.add_argument("--repeats", type=int, default=REPEATS, help=f"timed calls (default {REPEATS})")
  args = p.parse_args(argv)
  for name in ("large_batch", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)}: allowed values are integers >= 1")
  from snapjax import cli
  got = cli.run_guarded(lambda: measure(args.workdir, args.out, args.large_batch, args.repeats))
  print(f"one network: {got['single']['ms_per_example']:.4f} ms/example at batch {got['large_batch']}, "
        f"{got['single']['weights_mb']:.3f} MB; {got['ensemble']['networks']} fused: "
        f"{got['ensemble']['ms_per_example']:.4f} ms/example, {got['ensemble']['weights_mb']:.3f} MB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
