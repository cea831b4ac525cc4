"""What serving costs: a run's single snapshot, its M-snapshot ensemble (fused evaluator and exported file) and its
distilled student, by ms per example at batch 1 and at a large batch and MB of weights, beside their test scores.

  python benchmarks/serving.py --ensemble runs/quickstart --student runs/quickstart-distill \\
      [--single runs/quickstart-single] [--last_m 5] [--large_batch 1000] [--repeats 7] [--calls 50] [--json F]

Every row serves raw test images from host memory (uint8 for the in-memory datasets) and returns the mean softmax
on the device, the run's normalisation inside: "fused" is `snapjax.ensemble_predict` of the stacked snapshots in
one jitted program (the variables an input, as eval.py runs it), "exported" is the `jax.export` file eval.py
--export writes (`snapjax.evaluation.export_run`, the variables baked in), loaded and called. Batch 1: the median
over repeats of `--calls` calls, one example each, divided by the calls; large batch: the median over repeats of
one call on `--large_batch` examples, divided by them. Rows run round-robin within each repeat, so load from other
processes hits them alike. Weights MB: float32 bytes of the variables a row serves (params and BatchNorm
statistics); file MB: the exported file's size.

Test error "this pass": the row's own predictions on the whole test split (a second path to eval.py's scores).
Error, NLL and calibrated NLL "eval.py": from each run's eval/report.json (run `python eval.py --workdir RUN`
first; "n/a" otherwise): the snapshot's or last-m ensemble's, calibrated NLL by temperature scaling with 10-fold
cross-validation on the test split (Ashukha et al. 2020; report.json "temperature" ... "test_cv").
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # This checkout's snapjax.

import jax  # noqa: E402
import numpy as np  # noqa: E402

from snapjax import data, ensemble, evaluation, experiment, export, runs  # noqa: E402

PAUSE_S = 0.05


def _parse() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ensemble", required=True, help="workdir of the Snapshot Ensemble run (the teacher)")
  p.add_argument("--student", default="", help="workdir of its distilled student (method=distill)")
  p.add_argument("--single", default="", help="optional: workdir of a single model trained alone, another row")
  p.add_argument("--last_m", type=int, default=0, help="ensemble size m, its last m snapshots (0: all)")
  p.add_argument("--large_batch", type=int, default=1000, help="examples per call of the large-batch column")
  p.add_argument("--repeats", type=int, default=7, help="timed repeats of every row (after a warm-up)")
  p.add_argument("--calls", type=int, default=50, help="batch-1 calls per repeat")
  p.add_argument("--json", default="", help="also write the table as JSON here")
  args = p.parse_args()
  for name in ("large_batch", "repeats", "calls"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.last_m < 0:
    p.error(f"--last_m must be >= 0 (0: all snapshots), got {args.last_m}")
  return args


def _report(workdir: str) -> dict | None:
  path = os.path.join(workdir, "eval", "report.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _scores(report: dict | None, m: int | None) -> dict:
  """error, nll, calibrated nll of eval.py's report: the last snapshot (m None) or the last-m ensemble."""
  if report is None:
    return {"error": None, "nll": None, "calibrated_nll": None}
  if m is None:
    plain = report["snapshots"][-1]
    temp = (report.get("temperature") or {}).get("snapshots", [])
    temp = temp[-1] if temp else None
  else:
    plain = next(e for e in report["ensembles"] if e["m"] == m)
    temp = next((e for e in (report.get("temperature") or {}).get("ensembles", []) if e["m"] == m), None)
  calibrated = temp["test_cv"]["nll"] if temp and "test_cv" in temp else None
  return {"error": plain["error"], "nll": plain["nll"], "calibrated_nll": calibrated}


class Row:
  """One served model: fn(raw host batch) -> device probabilities, and what it serves."""

  def __init__(self, name, fn, num_snapshots, weights_mb, file_mb, scores):
    self.name, self.fn, self.num_snapshots = name, fn, num_snapshots
    self.weights_mb, self.file_mb, self.scores = weights_mb, file_mb, scores
    self.times = {"batch1": [], "large": []}
    self.error = None


def _mb(tree) -> float:
  return sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree)) / 2 ** 20


def _load(workdir: str):
  config = runs.load_run_config(workdir)
  exp = experiment.build(config)
  members = runs.restore_members([workdir], exp)
  return config, exp, members


def _fused(exp, stacked):
  apply_fn = exp.apply_fn
  spec = exp.spec
  fn = jax.jit(lambda v, raw: ensemble.ensemble_predict(apply_fn, v, data.normalize(raw, spec)))
  return lambda raw: fn(stacked, raw)


def _exported(exp, stacked, members, last_m, test, tmp, tag):
  path = os.path.join(tmp, f"{tag}.jax")
  steps = [(m.workdir, m.step) for m in members]
  meta = evaluation.export_run(path, exp, stacked, steps, last_m, test, exp.config.eval_batch_size)
  model = export.load_exported(path)
  return (lambda raw: model(raw)), os.path.getsize(path) / 2 ** 20, meta["test"]["error"]


def _rows(args, tmp):
  config, exp, members = _load(args.ensemble)
  if not exp.spec.in_memory:
    raise SystemExit(f"error: --ensemble {args.ensemble!r} is a {exp.spec.name} run (streamed); serving.py serves "
                     f"in-memory datasets' raw test images")
  test = exp.load_test_data()
  m = args.last_m or len(members)
  if m > len(members):
    raise SystemExit(f"error: --last_m={m} is more than the {len(members)} snapshots of {args.ensemble!r}")
  report = _report(args.ensemble)
  last = ensemble.stack_snapshots([members[-1].variables])
  stacked = ensemble.stack_snapshots([x.variables for x in members[len(members) - m:]])
  rows = [Row(f"single snapshot (the last of {args.ensemble})", _fused(exp, last), 1, _mb(last), None,
              _scores(report, None)),
          Row(f"ensemble of the last {m}, fused evaluator", _fused(exp, stacked), m, _mb(stacked), None,
              _scores(report, m))]
  fn, file_mb, _ = _exported(exp, stacked, members[len(members) - m:], m, test, tmp, "ensemble")
  rows.append(Row(f"ensemble of the last {m}, exported file", fn, m, _mb(stacked), file_mb, _scores(report, m)))
  for flag, label in ((args.student, "distilled student"), (args.single, "single model trained alone")):
    if not flag:
      continue
    s_config, s_exp, s_members = _load(flag)
    if s_config.dataset != config.dataset:
      raise SystemExit(f"error: {flag!r} is a {s_config.dataset} run, --ensemble a {config.dataset} run")
    one = ensemble.stack_snapshots([s_members[-1].variables])
    scores = _scores(_report(flag), 1 if len(s_members) == 1 else None)
    rows.append(Row(f"{label} ({s_config.model}), fused evaluator", _fused(s_exp, one), 1, _mb(one), None, scores))
    if flag == args.student:
      fn, file_mb, _ = _exported(s_exp, one, s_members[-1:], 1, test, tmp, "student")
      rows.append(Row(f"{label} ({s_config.model}), exported file", fn, 1, _mb(one), file_mb, scores))
  return rows, test, config


def _test_error(row: Row, images: np.ndarray, labels: np.ndarray, batch: int) -> float:
  wrong = 0
  for i in range(0, len(labels), batch):
    probs = np.asarray(jax.block_until_ready(row.fn(images[i:i + batch])))
    wrong += int(np.sum(np.argmax(probs, -1) != labels[i:i + batch]))
  return wrong / len(labels)


def main() -> None:
  args = _parse()
  with tempfile.TemporaryDirectory() as tmp:
    rows, (images, labels), config = _rows(args, tmp)
    big = images[:args.large_batch]
    one = images[:1]
    for row in rows:  # Warm-up (compiles both shapes) and the row's test error.
      t0 = time.perf_counter()
      jax.block_until_ready(row.fn(one))
      jax.block_until_ready(row.fn(big))
      row.error = _test_error(row, images, labels, args.large_batch)
      print(f"warm-up {row.name}: {time.perf_counter() - t0:.1f} s (compiles, and the test pass)", flush=True)
    for r in range(args.repeats):
      for row in rows:
        time.sleep(PAUSE_S)
        t0 = time.perf_counter()
        for i in range(args.calls):
          jax.block_until_ready(row.fn(images[i:i + 1]))
        row.times["batch1"].append((time.perf_counter() - t0) / args.calls)
        time.sleep(PAUSE_S)
        t0 = time.perf_counter()
        jax.block_until_ready(row.fn(big))
        row.times["large"].append((time.perf_counter() - t0) / len(big))
      print(f"repeat {r + 1}/{args.repeats} done", flush=True)
  _print(args, rows, config, len(big), len(labels))


def _fmt(v, spec):
  return "n/a" if v is None else format(v, spec)


def _print(args, rows, config, large, num_test) -> None:
  ens = next(r for r in rows if "fused" in r.name and r.num_snapshots > 1)
  ens_large = statistics.median(ens.times["large"])
  print(f"\n{config.dataset}, {config.model} ensemble, {num_test} test images; median of {args.repeats} repeats "
        f"({args.calls} calls at batch 1, one call at batch {large}); jax {jax.__version__}, backend "
        f"{jax.default_backend()}, {len(jax.devices())} device(s), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; load average at end {os.getloadavg()[0]:.1f}\n")
  print(f"| served model | snapshots | weights MB | file MB | ms/example, batch 1 | ms/example, batch {large} | "
        f"cost vs the ensemble (batch {large}) | test error, this pass | test error, eval.py | NLL | "
        "calibrated NLL |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  out = []
  for row in rows:
    b1, bl = statistics.median(row.times["batch1"]) * 1e3, statistics.median(row.times["large"]) * 1e3
    s = row.scores
    print(f"| {row.name} | {row.num_snapshots} | {row.weights_mb:.2f} | {_fmt(row.file_mb, '.2f')} | {b1:.3f} | "
          f"{bl:.4f} | {bl / (ens_large * 1e3):.2f}x | {100 * row.error:.2f}% | "
          f"{_fmt(None if s['error'] is None else 100 * s['error'], '.2f')}{'' if s['error'] is None else '%'} | "
          f"{_fmt(s['nll'], '.4f')} | {_fmt(s['calibrated_nll'], '.4f')} |")
    out.append({"row": row.name, "snapshots": row.num_snapshots, "weights_mb": row.weights_mb,
                "file_mb": row.file_mb, "ms_per_example_batch1": b1, "ms_per_example_large": bl,
                "large_batch": large, "times_s": row.times, "test_error_this_pass": row.error, **s})
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"command": "python " + " ".join(sys.argv), "rows": out}, f, indent=1)


if __name__ == "__main__":
  main()
