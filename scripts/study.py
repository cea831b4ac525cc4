"""Issues 9 and 23's study: every Table 1 arm and the methods that followed on real Fashion-MNIST, 3 seeds each, one
budget; writes the results page.

    python scripts/study.py --out runs/study --seeds 0,1,2 --jobs 2   # The study (hours: --dry_run estimates them).
    python scripts/study.py --dry_run                                 # The plan: every command, what is done, the ETA.
    python scripts/study.py --tiny DATA_DIR --out /tmp/s --seeds 0,1  # The whole pipeline on tiny data, in minutes.

Training arms (configs/study_fashion_mnist.py:ARM): Snapshot Ensemble alpha0 = 0.2 and 0.1, Single model, NoCycle,
SingleCycle, Snapshot Ensemble + AdaSmoothOut, FGE, SWA, SWAG, and the distilled student of the same seed's
Snapshot Ensemble (trained after its teacher). Eval-side arms: the weight-averaged snapshots of the alpha0 = 0.2
runs (eval.py --analyses=weight_average on them), the true ensemble of the Single runs (eval.py over their
workdirs), and the deep ensemble of the Single runs of seeds 0..N-1 (--deep_ensemble_size N, default 5: the
seeds the study lacks are trained for it alone), the reference of the deep-ensemble equivalent. Every evaluation
also runs --analyses=ood,shift. Each run is `python train.py ...` then `python eval.py ...` in a subprocess (the
command the page shows is the one that ran; --in_process runs them in this process instead, as the tests do); the
last step measures one network's serving cost (`python -m snapjax.study.serving`).

Resumable: a run whose workdir holds its last snapshot, or an eval whose report matches the workdirs' snapshots,
is skipped; an interrupted run resumes (train.py resumes its workdir). Progress lines name each run and an ETA.
The work is done by snapjax.study (plan, stats, runner, results, page, serving); this file is its command line.
"""
import argparse
import json
import os
import shlex
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # This checkout's snapjax (and configs), whatever else is installed.

from snapjax.study import page, plan, records, results, runner, stats  # noqa: E402
from snapjax.study.stats import duration  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", default="runs/study", help="workdirs root (default runs/study)")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
  p.add_argument("--arms", default=",".join(plan.ALL_ARMS),
                 help=f"comma-separated subset of: {', '.join(plan.ALL_ARMS)} (an eval-side arm trains its source arm)")
  p.add_argument("--results_dir", default=None,
                 help="where fashion_mnist.md/.json and the figures go (default docs/results; OUT/results with "
                      "--tiny)")
  p.add_argument("--dry_run", action="store_true", help="print the plan (every command and its status), run nothing")
  p.add_argument("--tiny", metavar="DATA_DIR", default=None,
                 help="the whole pipeline on tests/helpers.py's tiny generated data in DATA_DIR, a few updates per "
                      "run (the tests' budget)")
  p.add_argument("--in_process", action="store_true",
                 help="train and evaluate in this process instead of train.py / eval.py subprocesses")
  p.add_argument("--records", default=None, metavar="DIR",
                 help="keep each finished step's outputs in DIR (snapjax.study.records: a directory that outlives "
                      "this machine, such as docs/results/study_records) and start from what DIR holds")
  p.add_argument("--page_only", action="store_true", help="only write the page from the finished runs")
  p.add_argument("--deep_ensemble_size", type=int, default=plan.DEEP_ENSEMBLE_SIZE,
                 help=f"networks of the deep ensemble, the Single runs of seeds 0..N-1 (default "
                      f"{plan.DEEP_ENSEMBLE_SIZE}; at least 2)")
  p.add_argument("--jobs", type=int, default=1,
                 help="runs at once (default 1): 2 finished the study sooner on a 2-core CPU, where one small-model "
                      "run keeps about 1.3 cores busy; each run's reported minutes are then those of a shared machine")
  args = p.parse_args(argv)
  if args.jobs < 1 or (args.jobs > 1 and args.in_process):
    p.error(f"--jobs={args.jobs}: allowed values are integers >= 1, and 1 with --in_process")
  if args.deep_ensemble_size < 2:
    p.error(f"--deep_ensemble_size={args.deep_ensemble_size}: allowed values are integers >= 2 (an ensemble)")
  try:
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    p.error(f"--seeds={args.seeds!r}: expected comma-separated integers such as 0,1,2")
  if not args.seeds or len(set(args.seeds)) != len(args.seeds):
    p.error("--seeds needs at least one seed, each once")
  args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
  unknown = [a for a in args.arms if a not in plan.ALL_ARMS]
  if unknown or not args.arms:
    p.error(f"--arms: unknown {unknown}; allowed: {', '.join(plan.ALL_ARMS)}")
  if args.results_dir is None:
    args.results_dir = os.path.join(args.out, "results") if args.tiny else os.path.join(ROOT, "docs", "results")
  # The page shows the command that runs the study: --page_only only rewrites the page from it.
  args.command = shlex.join(["python", "scripts/study.py", *[a for a in argv if a != "--page_only"]])
  return args


def print_plan(steps: list[dict[str, Any]], args: argparse.Namespace) -> None:
  """--dry_run: every command and its status, each run's updates and snapshot steps, the training images in all."""
  train = [s for s in steps if s["kind"] == "train"]
  images = {s["key"]: s["plan"].total_steps * s["config"].batch_size for s in train}
  evals = sum(s["kind"] == "eval" for s in steps)
  print(f"Plan: {len(train)} training runs and {evals} evaluations under {args.out}, then the serving measurement; "
        f"page and JSON in {args.results_dir}")
  for s in steps:
    extra = ""
    if s["kind"] == "train":
      extra = (f"  [{s['plan'].total_steps} updates x batch {s['config'].batch_size} = {images[s['key']]:,} "
               f"images; snapshots at {', '.join(str(x) for x in s['plan'].snapshot_steps)}]")
    print(f"  {plan.status(s):8s} {shlex.join(s['argv'])}{extra}")
  total = sum(images.values())
  print(f"Training images in all: {total:,}; at the quickstart's 1,850 img/s that is {duration(total / 1850)} of "
        f"training, plus start-up, compilation, per-snapshot scoring and the evaluations.")
  reference = os.path.join(args.results_dir, page.RESULTS_NAME + ".json")
  if args.tiny or not os.path.exists(reference):
    print(f"Wall time: no estimate ({'--tiny' if args.tiny else f'no finished study at {reference}'}).")
    return
  with open(reference) as f:
    ref = json.load(f)
  from snapjax import corruptions, ood_data
  todo = [s for s in steps if plan.status(s) != "done"]
  est = stats.estimate_wall(todo, ref, num_test=ref["num_test_examples"],
                            ood_images=stats.DIGITS_IMAGES + 2 * ood_data.NUM_NOISE,
                            shift_cells=len(corruptions.CORRUPTIONS) * len(corruptions.SEVERITIES))
  print(f"Estimated wall time on this machine of the {len(todo)} steps not done yet"
        f"{f' ({len(steps) - len(todo)} done)' if len(todo) < len(steps) else ''}: {duration(est['seconds'])} at "
        f"--jobs {est['jobs']} "
        f"(training {duration(est['train_seconds'])} + evaluations {duration(est['eval_seconds'])} of step time, "
        f"divided by the parallelism {est['parallelism']:.2f} the reference reached), scaled from "
        f"{plan.shown(reference)}: {est['reference_train_runs']} runs and {est['reference_evals']} evaluations in "
        f"{duration(est['reference_seconds'])}, {est['per_update']:.3f} s per update (median), evaluations "
        f"{est['eval_fit'][0]:.1f} s + {1e6 * est['eval_fit'][1]:.2f} s per million network-images; a distill "
        f"student adds {stats.FORWARD_FRACTION:.2f} of a step per teacher snapshot and image (once per training "
        f"image without augmentation, on every batch with it).")


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.tiny:
    args.tiny = os.path.abspath(args.tiny)
  args.out = plan.abs_path(os.path.abspath(args.out))  # Given relative to the current directory; held absolute.
  args.results_dir = os.path.abspath(args.results_dir)
  steps = plan.make_plan(args.out, args.arms, args.seeds, args.tiny, args.deep_ensemble_size)
  for s in steps:
    if s["kind"] == "train":
      plan.check_workdir(s)
  if args.dry_run:
    print_plan(steps, args)
    return 0
  if args.records:
    restored = records.restore(os.path.abspath(args.records), args.out, steps, runner.STATE_FILE)
    saved = records.record_done(args.out, os.path.abspath(args.records), steps, runner.STATE_FILE)
    for n, what in ((len(restored), "restored from"), (len(saved), "copied into")):
      if n:
        runner.log(f"{n} finished step(s) {what} the records in {args.records}")
  if args.in_process:
    from snapjax import cli
    cli.setup_logging()
  code = 0 if args.page_only else runner.run_study(
      args.out, steps, jobs=args.jobs, in_process=args.in_process,
      records=os.path.abspath(args.records) if args.records else None)
  if code == 3:
    return code
  summary = page.write_results(results.collect_results(args, steps, args.arms), args.results_dir)
  runner.log(f"wrote {os.path.join(args.results_dir, page.RESULTS_NAME + '.md')} and .json")
  for c in summary["comparisons"]:
    runner.log(f"{c['label_a']} vs {c['label_b']} ({c['metric'].replace('_', ' ')}): {c['verdict']}")
  return code


if __name__ == "__main__":
  sys.exit(main())
