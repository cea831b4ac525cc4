"""Score a run's snapshots, their last-m and first-m ensembles and the paper's analyses (the logic of eval.py).

Calibration, diversity and the first-m ensembles come from the same single pass over the test split as the scores;
the weight-space analyses (`weight_analyses`: weight averages, interpolation) run only when asked for.
"""
import hashlib
import json
import os
from typing import Any, Iterator

from absl import logging
import jax
import numpy as np

import snapjax
from snapjax import analysis, checkpoints, data, ensemble, experiment, export, progress, report as report_lib, scoring
from snapjax import swag_eval, uncertainty_analyses, weight_analyses
from snapjax import workdir as workdir_lib
from snapjax.errors import ConfigError
# Read back from the runs' workdirs (snapjax/runs.py); still importable from here, as eval.py's tools name them.
from snapjax.runs import Member, check_compatible, load_run_config, member_groups, num_members, restore_members


def _count_snapshots(workdirs: list[str]) -> int:
  num = 0
  for wd in workdirs:
    ckpt = checkpoints.RunCheckpoints(wd, read_only=True)
    num += len(ckpt.snapshot_steps()) * num_members(wd)
    ckpt.close()
  return num


def member_entries(keys, groups, finals, steps, scores: scoring.Scores) -> dict[str, Any]:
  """The report's "members" (each member's last-m ensembles) and "true_ensemble" (its K final snapshots).

  scores.groups holds, in order, each member's last-m ensembles (m = 1..its snapshot count), then the finals'.
  """
  out, g = [], 0
  for (wd, member, seed), idx in zip(keys, groups):
    out.append({"workdir": wd, "member": member, "seed": seed, "steps": [steps[i][1] for i in idx],
                "ensembles": [{"m": m + 1, **scores.groups[g + m].as_dict()} for m in range(len(idx))]})
    g += len(idx)
  true = {"size": len(finals), "members": [{"workdir": steps[i][0], "member": keys[n][1], "step": steps[i][1]}
                                           for n, i in enumerate(finals)], **scores.groups[g].as_dict()}
  return {"members": out, "true_ensemble": true}


def member_score_groups(groups: list[list[int]], finals: list[int]) -> list[list[int]]:
  """score_snapshots' groups for member_entries: each member's last-m snapshots, then every member's final."""
  return [idx[len(idx) - m - 1:] for idx in groups for m in range(len(idx))] + [finals]


def check_export_path(path: str) -> None:
  """A one-line ConfigError unless --export names a new or existing file in an existing, writable local directory."""
  if not str(path).strip():
    raise ConfigError(f"--export is empty ({path!r}); allowed: a file path such as runs/quickstart/ensemble.jax")
  if "://" in str(path):
    raise ConfigError(f"--export={path}: bucket URLs are not supported; write a local file and copy it")
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise ConfigError(f"--export={path}: directory {directory} does not exist; create it first")
  if not os.access(directory, os.W_OK | os.X_OK):
    raise ConfigError(f"--export={path}: directory {directory} is not writable")
  if os.path.isdir(path):
    raise ConfigError(f"--export={path} is an existing directory; allowed: a file path in {directory}")
  if jax.process_count() > 1:
    raise ConfigError(f"--export={path}: run eval.py --export in one process (it writes one local file), "
                      f"not in {jax.process_count()}")


def _raw_test_batches(exp: experiment.Experiment, arrays: tuple[np.ndarray, np.ndarray] | None,
                      batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(x, y, mask) host batches of the test split as the dataset provides them, the last one padded (mask 0)."""
  if arrays is not None:
    yield from data.eval_batches(*arrays, batch_size)
    return
  stream = exp.stream(exp.spec.eval_split, batch_size_per_host=batch_size, train=False, seed=0)
  for b in stream:
    yield b["image"], b["label"], b["mask"]


def score_exported(model: export.ExportedEnsemble,
                   batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> scoring.Score:
  """Test error and NLL of an exported ensemble, run on raw batches; exact counts over padded batches."""
  total = np.zeros(3, np.float64)
  for x, y, mask in batches:
    total += scoring.batch_counts(model(x), y, mask)
  return scoring.Score.from_totals(total)


def export_run(path: str, exp: experiment.Experiment, stacked: Any, steps: list[tuple[str, int]], last_m: int,
               test_arrays: tuple[np.ndarray, np.ndarray] | None, batch_size: int) -> dict[str, Any]:
  """Writes the last-m ensemble to path (`export.export_ensemble`) and its description to path + '.json'.

  The description's test error and NLL come from running the written artifact on the test split.
  """
  shape = exp.input_shape
  if exp.spec.in_memory:  # Raw images as the dataset provides them; the run's normalisation goes inside.
    example = jax.ShapeDtypeStruct((1, *shape), test_arrays[0].dtype)
    preprocess, described = (lambda x: data.normalize(x, exp.spec),
                             f"(x - mean) / std with mean={list(exp.spec.mean)}, std={list(exp.spec.std)}, "
                             f"then a cast to {np.dtype(exp.compute_dtype).name}")
  else:  # A streamed dataset's decoding and resizing run in tf.data: the input is its normalised float32 crop.
    example = jax.ShapeDtypeStruct((1, *shape), np.float32)
    preprocess, described = None, (f"none: the input is the {exp.spec.name} eval crop already normalised, "
                                   f"(x - mean) / std with mean={list(exp.spec.mean)}, std={list(exp.spec.std)}")
  platforms = list(export.DEFAULT_PLATFORMS)
  blob = export.export_ensemble(exp.apply_fn, stacked, example, last_m=last_m, preprocess=preprocess,
                                platforms=platforms)
  model = export.load_exported(blob)
  score = score_exported(model, _raw_test_batches(exp, test_arrays, batch_size))
  meta = {
      "file": os.path.basename(path), "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
      "input": {"shape": [export.BATCH_DIM, *shape], "dtype": np.dtype(example.dtype).name},
      "output": {"shape": [export.BATCH_DIM, exp.spec.num_classes], "dtype": "float32",
                 "what": "the ensemble's mean softmax probabilities"},
      "preprocess": described, "num_classes": exp.spec.num_classes,
      "dataset": exp.config.dataset, "model": exp.config.model,
      "members": [{"workdir": wd, "step": st} for wd, st in steps[len(steps) - last_m:]], "last_m": last_m,
      "platforms": platforms, "snapjax_version": snapjax.__version__, "jax_version": jax.__version__,
      "test": {"split": exp.spec.eval_split, **score.as_dict()},
  }
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(blob)
  os.replace(tmp, path)
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, path + ".json")
  return meta


def log_throughput(batches: progress.Throughput, num: int) -> None:
  """The test pass's images/s (each image through every snapshot; the last batch's padding counts), after the first
  batch and its compilation where there are more (host 0)."""
  rate, with_first = batches.rate()
  if jax.process_index() == 0:
    logging.info("Test pass: %d snapshots x %d images in %d batches: %.0f images/s, %.0f snapshot evaluations/s (%s)",
                 num, batches.items, batches.batches, rate, rate * num,
                 "one batch: compilation included" if with_first else "after the first batch, which compiles")


def _finite(values: Any) -> Any:
  """Nested lists of floats for JSON, nan (an empty bin, a constant softmax) as None."""
  return [_finite(v) for v in values] if np.ndim(values) else (None if np.isnan(values) else float(values))


def _calibration(score: scoring.Score, counts: analysis.CalibrationCounts) -> dict[str, Any]:
  conf_K, acc_K, count_K = counts.reliability()
  return {"ece": float(counts.ece()), "brier": float(counts.brier()), "nll": score.nll,
          "reliability": {"confidence": _finite(conf_K), "accuracy": _finite(acc_K), "count": count_K.tolist()}}


def analysis_entries(scores: scoring.Scores, steps: list[tuple[str, int]]) -> dict[str, Any]:
  """The report's "calibration", "diversity" and "ensembles_first_m" entries, from one scoring pass."""
  return {
      "calibration": {
          "num_bins": int(np.shape(scores.member_calibration[0].bin_count_K)[0]),
          "snapshots": [{"workdir": wd, "step": st, **_calibration(s, c)}
                        for (wd, st), s, c in zip(steps, scores.members, scores.member_calibration)],
          "ensembles": [{"m": i + 1, **_calibration(s, c)}
                        for i, (s, c) in enumerate(zip(scores.last_m, scores.last_m_calibration))],
      },
      "diversity": {"disagreement": _finite(scores.diversity.disagreement()),
                    "correlation": _finite(scores.diversity.correlation())},
      "ensembles_first_m": [{"m": i + 1, **s.as_dict(), "ece": float(c.ece())}
                            for i, (s, c) in enumerate(zip(scores.first_m, scores.first_m_calibration))],
  }


def evaluate_runs(workdirs: list[str], *, last_m: int | None = None, out_dir: str | None = None,
                  data_overrides: dict[str, str] | None = None, eval_batch_size: int | None = None,
                  plot: bool = True, export_path: str | None = None, analyses: list[str] | None = None,
                  bn_batches: int = weight_analyses.DEFAULT_BN_BATCHES,
                  interpolation_points: int = weight_analyses.DEFAULT_INTERPOLATION_POINTS,
                  swag_samples: int = swag_eval.DEFAULT_SAMPLES, swag_seed: int = 0,
                  shift_examples: int = uncertainty_analyses.DEFAULT_SHIFT_EXAMPLES) -> dict[str, Any]:
  """Scores each snapshot of the runs, every last-m and first-m ensemble and the analyses; writes the report.

  report.json, report.md and (with plot) error_vs_m.png, reliability.png, diversity.png, and interpolation.png
  when asked for. Every check of the input (runs, last_m, analyses, test and training data) runs before anything
  is restored or compiled.

  Args:
    workdirs: one or more train.py workdirs; the snapshots of several runs (same model and dataset) are
      ensembled in the order given.
    last_m: the headline ensemble's size, the last m snapshots (default: all).
    out_dir: where the report goes (default: WORKDIR/eval of the first run).
    data_overrides: {"data_dir" | "fashion_mnist_dir" | "tiny_imagenet_dir": path} to read the test data
      from elsewhere than the run's config says; {"val_split": split} names the temperature-scaling split.
    eval_batch_size: global test batch size (default: the run's config).
    plot: also write the figures (error_vs_m.png, reliability.png, diversity.png, interpolation.png).
    export_path: also write the headline ensemble as a serving artifact there (`export_run`), with its
      description in export_path + '.json'.
    analyses: analyses to run beyond the default ones: the weight-space `weight_analyses.ANALYSES`
      ("weight_average", "interpolation", which pass over training batches), the uncertainty analyses of
      `uncertainty_analyses.ANALYSES` ("ood", "shift"; "temperature", "selective", "conformal" and "dee" always
      run where they apply), or "all" for every one that applies.
    bn_batches: training batches on which the analyses measure BatchNorm statistics (0: one epoch).
    interpolation_points: lambdas of the interpolation, evenly spaced in [0, 1] with both ends.
    swag_samples, swag_seed: a method="swag" run's snapshot is scored as this many samples of its SWAG
      posterior, keyed by the seed (snapjax/swag_eval.py); their ensemble is SWAG's model average.
    shift_examples: test examples (the first ones) per corruption and severity of the "shift" analysis.

  Returns:
    The report: "snapshots" (each one's workdir, member, step, error, nll, count), "ensembles" (each last-m of
    all snapshots in order), the headline "ensemble" and "num_test_examples"; "members" (each ensemble member's
    own last-m ensembles: member k of a K-member run, seed + k) and "true_ensemble" (the ensemble of every
    member's final snapshot); "calibration" (ece, brier, nll and reliability bins of every
    snapshot and last-m ensemble), "diversity" (M x M "disagreement" and "correlation"), "ensembles_first_m";
    with analyses, "weight_average" and/or "interpolation" and "bn_recompute"; "temperature", "selective",
    "conformal", "dee", "ood", "shift" (keys in `uncertainty_analyses`); with export_path, "export" (the written
    description).

  Raises:
    snapjax.errors.UserError: not a run, incompatible runs, no or corrupt snapshots, bad last_m, unknown
      analyses, missing data, an export path in a missing or read-only directory.

  Example:
    >>> report = evaluate_runs(["runs/quickstart"], last_m=3)  # doctest: +SKIP
    >>> report["ensemble"]["error"]  # doctest: +SKIP
  """
  if not workdirs:
    raise ConfigError("--workdir is required (give it several times to ensemble several runs)")
  if eval_batch_size is not None and (isinstance(eval_batch_size, bool) or eval_batch_size < 1):
    raise ConfigError(f"eval_batch_size={eval_batch_size!r}; allowed: an integer >= 1 (or unset: the run's own)")
  if out_dir is not None:
    workdir_lib.check_path(out_dir, "--out_dir")
  if export_path is not None:
    check_export_path(export_path)
  request = uncertainty_analyses.parse(analyses, shift_examples)
  analyses = weight_analyses.check_args(request.weight, bn_batches, interpolation_points)
  swag_eval.check_args(swag_samples, swag_seed)
  configs = [load_run_config(wd) for wd in workdirs]
  check_compatible(configs, workdirs)
  config = configs[0]
  for k, v in (data_overrides or {}).items():
    if v:
      config[k] = v
  exp = experiment.build(config)

  # Cheap checks first: snapshot lists and last_m, then the test data, before restoring or compiling anything.
  num_snaps = _count_snapshots(workdirs)
  swag_runs = any(swag_eval.is_swag(c) for c in configs)  # Each SWAG snapshot is scored as swag_samples networks.
  num_snaps += sum((swag_samples - 1) * num_members(wd) for c, wd in zip(configs, workdirs) if swag_eval.is_swag(c))
  if request.all and num_snaps < 2:
    analyses = ()  # "all": the weight-space analyses compare snapshots, and there is one.
  if last_m is not None and (isinstance(last_m, bool) or not 1 <= last_m <= max(num_snaps, 1)):
    raise ConfigError(f"last_m={last_m} is out of range; allowed: 1..{num_snaps} (the number of snapshots)")
  if analyses and num_snaps < 2:
    raise ConfigError(f"--analyses={','.join(analyses)} needs at least 2 snapshots (it compares them with the "
                      f"last); found {num_snaps}")
  test_arrays = exp.load_test_data()
  if analyses:
    train_arrays = weight_analyses.load_bn_data(exp)
    num_train = len(train_arrays[1]) if train_arrays is not None else exp.spec.num_train
    num_bn = weight_analyses.num_bn_batches(exp, num_train, bn_batches)
  if swag_runs:  # SWAG's samples need their BatchNorm statistics measured on training batches.
    swag_arrays = train_arrays if analyses else weight_analyses.load_bn_data(exp)
  plan = uncertainty_analyses.prepare(request, exp, num_independent=sum(num_members(wd) for wd in workdirs),
                                      shift_examples=shift_examples)
  members = restore_members(workdirs, exp)
  if swag_runs:
    members, swag_entry = swag_eval.expand(members, exp, configs, list(workdirs), samples=swag_samples,
                                           seed=swag_seed, train_arrays=swag_arrays, member_type=Member)
  num = len(members)
  last_m = last_m or num
  steps = [(m.workdir, m.step) for m in members]
  member_ids = [m.member for m in members]
  keys, groups, finals = member_groups(members)
  stacked = ensemble.stack_snapshots([m.variables for m in members])
  del members[:]  # Only the stack is kept in device memory.

  batches = progress.Throughput(exp.test_batches(eval_batch_size, test_arrays), size=lambda b: b[0].shape[0])
  scores = scoring.score_snapshots(exp.apply_fn, stacked, batches, groups=member_score_groups(groups, finals),
                                   keep_outputs=plan.keep_outputs)
  log_throughput(batches, num)
  headline = scores.ensemble if last_m == num else scores.last_m[last_m - 1]
  report = {
      "dataset": config.dataset, "model": config.model, "workdirs": list(workdirs),
      "num_test_examples": headline.count,
      "snapshots": [{"workdir": wd, "member": k, "step": st, **s.as_dict()}
                    for (wd, st), k, s in zip(steps, member_ids, scores.members)],
      "ensembles": [{"m": i + 1, **s.as_dict()} for i, s in enumerate(scores.last_m)],
      "ensemble": {"m": last_m, **headline.as_dict()},
      **member_entries(keys, groups, finals, steps, scores),
      **analysis_entries(scores, steps),
  }
  if swag_runs:
    report["swag"] = swag_entry
  if analyses:
    report.update(weight_analyses.run(exp, stacked, steps, analyses, train_arrays=train_arrays,
                                      test_arrays=test_arrays, num_batches=num_bn,
                                      interpolation_points=interpolation_points, eval_batch_size=eval_batch_size))
  report.update(uncertainty_analyses.run(
      plan, exp, stacked, scores.outputs, steps=steps, member_ids=member_ids, groups=groups, finals=finals,
      last_m=last_m, test_arrays=test_arrays, eval_batch_size=eval_batch_size))
  if jax.process_index() == 0:
    report_lib.write_report(report, out_dir or workdir_lib.eval_dir(workdirs[0]), plot=plot)
  if export_path is not None:
    report["export"] = export_run(export_path, exp, stacked, steps, last_m, test_arrays,
                                  eval_batch_size or config.eval_batch_size)
  return report
