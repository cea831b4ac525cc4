"""Time to the first training step of train.py, without and with the persistent compilation cache.

  python benchmarks/first_step.py [--config configs/quickstart.py] [--repeats 3] [--steps_per_dispatch K]

Each run is a fresh `python train.py` process on a fresh workdir, stopped right after its first step (log_every_steps
is 1, so the loop has waited for the step before it logs it): the time from the process's start to the end of the
first step, and the XLA compilations it ran (seconds per jitted function; a program loaded from the cache counts as
its load time). Variants, round-robin: no cache (the default), --compilation_cache_dir on an empty directory (cold:
compiles and writes) and on the directory a previous run filled (warm: loads), and the no-cache run's workdir run
again (a resumed run: it restores the state saved after step 1 and stops after step 2).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child: train.py's own flags and code, with a clock and a compile listener; it stops after the first step.
_CHILD = r'''
import time
T0 = time.perf_counter()
import json, os, sys
sys.path.insert(0, os.getcwd())
import jax
compiles, hits = {}, []

def listen(event, duration, **kwargs):
  if event == "/jax/core/compile/backend_compile_duration":
    name = kwargs.get("fun_name", "?")
    compiles[name] = round(compiles.get(name, 0.0) + duration, 3)

jax.monitoring.register_event_duration_secs_listener(listen)
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(1) if event.endswith("/cache_hits") else None)
from absl import app
import train
from snapjax import cli, training
times = {}

def stop_at(step):
  times.setdefault("first_step_s", time.perf_counter() - T0)
  return True

def main(argv):
  train.run(argv, hooks=training.Hooks(stop_at=stop_at))
  print("FIRST_STEP " + json.dumps({**times, "compiles": compiles, "cache_hits": len(hits)}), flush=True)

app.run(main, flags_parser=cli.parse_flags)
'''


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/quickstart.py", help="config file, relative to the repository")
  p.add_argument("--repeats", type=int, default=3, help="runs of every variant")
  p.add_argument("--steps_per_dispatch", type=int, default=None, help="config.steps_per_dispatch of the runs "
                 "(default: the config's)")
  p.add_argument("--fashion_mnist_dir", default=None, help="--config.fashion_mnist_dir of the runs, if set")
  args = p.parse_args()
  if args.repeats < 1 or (args.steps_per_dispatch is not None and args.steps_per_dispatch < 1):
    p.error("--repeats and --steps_per_dispatch must be >= 1")
  return args


def _run(args, workdir: str, cache_dir: str | None) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  argv = [sys.executable, "-c", _CHILD, "--config", args.config, "--workdir", workdir,
          "--config.log_every_steps=1"]
  if args.steps_per_dispatch:
    argv.append(f"--config.steps_per_dispatch={args.steps_per_dispatch}")
  if args.fashion_mnist_dir:
    argv.append(f"--config.fashion_mnist_dir={args.fashion_mnist_dir}")
  if cache_dir:
    argv.append(f"--compilation_cache_dir={cache_dir}")
  out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  lines = [l for l in out.stdout.splitlines() if l.startswith("FIRST_STEP ")]
  if out.returncode or not lines:
    raise SystemExit(f"run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(lines[0].split(" ", 1)[1])


def main() -> None:
  args = _parse()
  print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
  tmp = tempfile.mkdtemp(prefix="first_step_")
  warm_dir = os.path.join(tmp, "warm_cache")
  variants = ("no cache (default)", "cache, cold (empty directory)", "cache, warm (filled by an earlier run)",
              "no cache, resumed run (restores step 1)")
  results = {v: [] for v in variants}
  try:
    _run(args, os.path.join(tmp, "fill"), warm_dir)  # Fills the warm cache; also warms the OS file cache.
    for r in range(args.repeats):
      for i, v in enumerate(variants):
        cache = (None, os.path.join(tmp, f"cold_{r}"), warm_dir, None)[i]
        results[v].append(_run(args, os.path.join(tmp, f"run_{r}_{i % 3}"), cache))  # The last resumes the first.
      print(f"repeat {r + 1}/{args.repeats} done (load {' '.join(f'{x:.2f}' for x in os.getloadavg())})",
            flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

  print(f"\n{args.config}, steps_per_dispatch={args.steps_per_dispatch or 'default'}: seconds from process start "
        f"to the end of "
        f"the first step, median of {args.repeats} (min-max); load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
  names = sorted({n for rs in results.values() for r in rs for n in r["compiles"]},
                 key=lambda n: -statistics.median(r["compiles"].get(n, 0) for r in results[variants[0]]))
  top = [n for n in names if statistics.median(r["compiles"].get(n, 0) for r in results[variants[0]]) >= 0.5]
  print("| variant | first step s | min-max s | compile s, all | " + " | ".join(f"{n} s" for n in top)
        + " | cache hits |")
  print("|---|---|---|---|" + "---|" * len(top) + "---|")
  for v, rs in results.items():
    first = [r["first_step_s"] for r in rs]
    total = statistics.median(sum(r["compiles"].values()) for r in rs)
    per = " | ".join(f"{statistics.median(r['compiles'].get(n, 0) for r in rs):.2f}" for n in top)
    print(f"| {v} | {statistics.median(first):.1f} | {min(first):.1f}-{max(first):.1f} | {total:.1f} | {per} | "
          f"{statistics.median(r['cache_hits'] for r in rs):.0f} |")


if __name__ == "__main__":
  main()
