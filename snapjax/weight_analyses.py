"""eval.py's analyses in weight space (--analyses): weight-averaged snapshots and the paper's interpolation (Fig. 5).

Both evaluate networks that no training run produced, so both first measure their BatchNorm statistics again on
training batches (`weight_space.recompute_batch_stats`), then score them on the test split:

  weight_average: the weights of the last m snapshots averaged (SWA-style), m = 2..M.
  interpolation: for each earlier snapshot i, theta(lambda) = lambda * theta_M + (1 - lambda) * theta_i at
    `interpolation_points` evenly spaced lambdas in [0, 1] (default 11: 0, 0.1, ..., 1). lambda = 1 is theta_M
    for every i and is evaluated once.

All the points of every requested analysis are stacked (P of them) and go through two passes: one over the
BatchNorm batches (each batch runs every point, one at a time), one over the test split. Every point sees the same
BatchNorm batches, so lambda = 0 is snapshot i and lambda = 1 the last snapshot, each with its statistics measured
the same way as every point between them.

The BatchNorm batches: `bn_batches` batches (default 50; 0 = one epoch) of the run's global batch size, drawn
from the run's training split (config.train_split, else the dataset's) with the run's training augmentation,
since that is what the snapshots' running statistics averaged over in training. In-memory datasets: a fixed
random subset (seed 0, no example twice) through the run's on-device augmentation with fixed keys. Streamed
datasets (ImageNet): the first `bn_batches` batches of the training stream with seed 0 (its random-resized crops
and flips). The same batches every time, so the analyses are deterministic.
"""
import time
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from snapjax import experiment, scoring, weight_space
from snapjax import progress as progress_lib
# The BatchNorm batches, here under their old names too (snapjax/bn_data.py).
from snapjax.bn_data import (  # noqa: F401
    BN_SEED, bn_batch_size, bn_batches, load_bn_data, num_bn_batches, train_apply_fn, train_split)
from snapjax.errors import ConfigError

PyTree = Any
ANALYSES = ("weight_average", "interpolation")
DEFAULT_BN_BATCHES = 50
DEFAULT_INTERPOLATION_POINTS = 11


def check_args(analyses: Sequence[str] | None, bn_batches: int, interpolation_points: int) -> tuple[str, ...]:
  """The requested analyses (known names, in ANALYSES order, no repeats), or a one-line ConfigError."""
  names = [str(a).strip() for a in (analyses or ()) if str(a).strip()]
  for name in names:
    if name not in ANALYSES:
      raise ConfigError(f"--analyses: unknown analysis {name!r}; allowed: {', '.join(ANALYSES)} (comma-separated; "
                        f"calibration and diversity are always in the report)")
  if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
    raise ConfigError(f"--bn_batches={bn_batches!r}; allowed: an integer >= 0 (0: one epoch of the training split)")
  if isinstance(interpolation_points, bool) or not isinstance(interpolation_points, int) or interpolation_points < 2:
    raise ConfigError(f"--interpolation_points={interpolation_points!r}; allowed: an integer >= 2 "
                      f"(lambdas 0, 1/(n-1), ..., 1)")
  return tuple(a for a in ANALYSES if a in names)


def _counted(batches: Iterable[Any], progress: progress_lib.BatchProgress) -> Iterator[Any]:
  """Yields the batches; reports each one done when the consumer asks for the next (scoring syncs per batch)."""
  done = 0
  for b in batches:
    yield b
    done += 1
    progress(done)


def _concat(parts: list[PyTree]) -> PyTree:
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def _take(stacked: PyTree, i: int) -> PyTree:
  return jax.tree.map(lambda a: a[i], stacked)


def run(exp: experiment.Experiment, stacked: PyTree, steps: list[tuple[str, int]], analyses: Sequence[str], *,
        train_arrays: tuple[np.ndarray, np.ndarray] | None, test_arrays: tuple[np.ndarray, np.ndarray] | None,
        num_batches: int, interpolation_points: int = DEFAULT_INTERPOLATION_POINTS,
        eval_batch_size: int | None = None) -> dict[str, Any]:
  """The report entries of the requested analyses ('weight_average', 'interpolation', 'bn_recompute').

  Args:
    exp: the run set-up (mesh, apply_fn, test batches).
    stacked: the M snapshots (`stack_snapshots`), M >= 2, in training order.
    steps: (workdir, step) of each snapshot.
    analyses: names from ANALYSES.
    train_arrays: the training split in memory (`load_bn_data`), None for a streamed dataset.
    test_arrays: the test split in memory, None for a streamed dataset.
    num_batches: BatchNorm batches (`num_bn_batches`).
    interpolation_points: lambdas evenly spaced in [0, 1], both ends included.
    eval_batch_size: global test batch size (default: the run's config).

  Returns:
    {"weight_average": [{"m", "error", "nll", "ece", "brier", "count"} for m = 2..M]} and/or
    {"interpolation": [{"snapshot", "workdir", "step", "lambdas", "error", "nll"} for each earlier snapshot]},
    and "bn_recompute": how the BatchNorm statistics were measured.
  """
  num = len(steps)
  if num < 2:
    raise ValueError(f"the weight-space analyses need at least 2 snapshots, got {num}")
  parts, layout = [], {}
  if "weight_average" in analyses:
    layout["weight_average"] = sum(len(jax.tree.leaves(p)[0]) for p in parts)
    parts += [jax.tree.map(lambda a: a[None], weight_space.average_snapshots(stacked, m)) for m in range(2, num + 1)]
  lambdas = np.linspace(0.0, 1.0, interpolation_points)
  if "interpolation" in analyses:
    layout["interpolation"] = sum(len(jax.tree.leaves(p)[0]) for p in parts)
    final = _take(stacked, num - 1)
    parts += [weight_space.interpolate_snapshots(_take(stacked, i), final, lambdas[:-1]) for i in range(num - 1)]
    parts.append(jax.tree.map(lambda a: a[None], final))  # lambda = 1, shared by every i.
  points = _concat(parts)
  num_points = len(jax.tree.leaves(points)[0])
  batch = bn_batch_size(exp)
  if jax.process_index() == 0:
    logging.info("Analyses %s: %d networks in weight space; pass 1/2 measures their BatchNorm statistics on %d "
                 "training batches of %d, pass 2/2 scores them on the test split", ", ".join(analyses), num_points,
                 num_batches, batch)

  start = time.monotonic()
  points = weight_space.recompute_batch_stats(
      train_apply_fn(exp), points, bn_batches(exp, train_arrays, num_batches), stacked=True,
      progress=progress_lib.BatchProgress(f"BatchNorm statistics of {num_points} networks", num_batches))
  bn_seconds = time.monotonic() - start
  test_batch = experiment.round_up(eval_batch_size or exp.config.eval_batch_size, exp.mesh.devices.size)
  num_test = len(test_arrays[1]) if test_arrays is not None else exp.spec.num_eval
  progress = progress_lib.BatchProgress(f"test scores of {num_points} networks", -(-num_test // test_batch))
  scores, calibration = scoring.score_members(
      exp.apply_fn, points, _counted(exp.test_batches(eval_batch_size, test_arrays), progress))
  if jax.process_index() == 0:
    logging.info("Analyses done in %s (BatchNorm statistics %s, test scores %s)",
                 progress_lib.duration(time.monotonic() - start), progress_lib.duration(bn_seconds),
                 progress_lib.duration(time.monotonic() - start - bn_seconds))

  out = {}
  if "weight_average" in analyses:
    first = layout["weight_average"]
    out["weight_average"] = [
        {"m": m, "error": scores[k].error, "nll": scores[k].nll, "ece": float(calibration[k].ece()),
         "brier": float(calibration[k].brier()), "count": scores[k].count}
        for m, k in zip(range(2, num + 1), range(first, first + num - 1))]
  if "interpolation" in analyses:
    first, per = layout["interpolation"], interpolation_points - 1
    last = first + (num - 1) * per  # The shared lambda = 1 point.
    out["interpolation"] = []
    for i in range(num - 1):
      ks = [*range(first + i * per, first + (i + 1) * per), last]
      out["interpolation"].append({
          "snapshot": i + 1, "workdir": steps[i][0], "step": steps[i][1],
          "lambdas": [round(float(l), 12) for l in lambdas],
          "error": [scores[k].error for k in ks], "nll": [scores[k].nll for k in ks]})
  out["bn_recompute"] = {
      "split": train_split(exp), "batches": num_batches, "batch_size": batch, "examples": num_batches * batch,
      "augment": exp.spec.augment, "streamed": not exp.spec.in_memory, "networks": num_points,
      "seconds": round(time.monotonic() - start, 1)}
  return out
