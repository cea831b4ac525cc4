"""Score a run's snapshots and their last-m ensembles on the test split (the logic of eval.py)."""
import dataclasses
import json
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from snapjax import checkpoints, data, ensemble, training
from snapjax.errors import CheckpointError, ConfigError

# Fields that must agree between runs whose snapshots are ensembled together.
_SAME_ACROSS_RUNS = ("model", "dataset", "dtype", "stem_stride", "image_size")


@dataclasses.dataclass
class Member:
  workdir: str
  step: int
  variables: Any


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with; CheckpointError if it is not a snapjax run."""
  saved = checkpoints.read_config(workdir)
  if saved is None:
    raise CheckpointError(f"{workdir!r} is not a snapjax run: {os.path.join(workdir, checkpoints.CONFIG_FILE)} "
                          f"does not exist; pass the --workdir of a train.py run")
  return ml_collections.ConfigDict(saved)


def check_compatible(configs: list[ml_collections.ConfigDict], workdirs: list[str]) -> None:
  """All runs share the architecture and the dataset (class count), or a one-line CheckpointError."""
  for cfg, wd in zip(configs[1:], workdirs[1:]):
    diff = [k for k in _SAME_ACROSS_RUNS if cfg.get(k) != configs[0].get(k)]
    if diff:
      shown = ", ".join(f"{k}: {configs[0].get(k)!r} vs {cfg.get(k)!r}" for k in diff)
      if "dataset" in diff:
        classes = [data.DATASETS[c.dataset].num_classes if c.dataset in data.DATASETS else "?"
                   for c in (configs[0], cfg)]
        shown += f" ({classes[0]} vs {classes[1]} classes)"
      raise CheckpointError(f"runs {workdirs[0]!r} and {wd!r} cannot be ensembled together ({shown})")


def restore_members(workdirs: list[str], model, input_shape, mesh) -> list[Member]:
  """Every snapshot of every run, in the order given and, within a run, in training order."""
  replicated = NamedSharding(mesh, P())
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                                             jnp.zeros((1, *input_shape), jnp.float32), train=False))
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})})
  members = []
  for wd in workdirs:
    ckpt = checkpoints.RunCheckpoints(wd, read_only=True)
    try:
      steps = ckpt.snapshot_steps()
      if not steps:
        raise CheckpointError(f"no snapshots in workdir {wd!r} ({os.path.join(wd, checkpoints.SNAPSHOT_DIR)} "
                              f"is empty): train first")
      for step in steps:
        variables, _ = ckpt.restore_snapshot(step, abstract)
        members.append(Member(wd, step, variables))
    finally:
      ckpt.close()
  return members


@jax.jit
def _member_and_ensemble_counts(members_MxBxC, labels_B, mask_B):
  """Counts (errors, nll_sum, n) of each member and of each last-m ensemble, m = 1..M."""
  m = members_MxBxC.shape[0]
  per_member = jax.vmap(lambda p: jnp.stack(ensemble.counts(p, labels_B, mask_B)))(members_MxBxC)
  last_m = jnp.cumsum(members_MxBxC[::-1], axis=0) / jnp.arange(1, m + 1, dtype=jnp.float32)[:, None, None]
  per_m = jax.vmap(lambda p: jnp.stack(ensemble.counts(p, labels_B, mask_B)))(last_m)
  return per_member, per_m


def _rows(totals_Kx3: np.ndarray) -> list[dict[str, float]]:
  return [{"error": float(e / n), "nll": float(s / n), "count": int(n)} for e, s, n in totals_Kx3]


def evaluate_runs(workdirs: list[str], *, last_m: int | None = None, out_dir: str | None = None,
                  data_overrides: dict[str, str] | None = None, eval_batch_size: int | None = None,
                  plot: bool = True) -> dict[str, Any]:
  """Score each snapshot and every last-m ensemble; write report.json, report.md and a PNG plot."""
  if not workdirs:
    raise ConfigError("--workdir is required (give it several times to ensemble several runs)")
  if eval_batch_size is not None and (isinstance(eval_batch_size, bool) or eval_batch_size < 1):
    raise ConfigError(f"eval_batch_size={eval_batch_size!r}; allowed: an integer >= 1 (or unset: the run's own)")
  configs = [load_run_config(wd) for wd in workdirs]
  check_compatible(configs, workdirs)
  config = configs[0]
  for k, v in (data_overrides or {}).items():
    if v:
      config[k] = v
  spec = training.dataset_spec(config)
  model = training.make_model(config, spec.num_classes)
  mesh = training.make_mesh()
  input_shape = spec.image_shape if spec.in_memory else (config.image_size, config.image_size, spec.image_shape[-1])

  # Cheap checks first: snapshot lists and last_m, before restoring or compiling anything.
  num_snaps = 0
  for wd in workdirs:
    ckpt = checkpoints.RunCheckpoints(wd, read_only=True)
    num_snaps += len(ckpt.snapshot_steps())
    ckpt.close()
  if last_m is not None and (isinstance(last_m, bool) or not 1 <= last_m <= max(num_snaps, 1)):
    raise ConfigError(f"last_m={last_m} is out of range; allowed: 1..{num_snaps} (the number of snapshots)")
  # The test data next (a missing file is a user error), still before restoring or compiling anything.
  if spec.in_memory:
    test_arrays = training.load_split(config, spec, spec.eval_split)
  else:  # Opening the stream checks that the TFDS data is prepared; batches are streamed later.
    test_arrays = None
    data.make_stream(spec, spec.eval_split, batch_size_per_host=1, data_dir=config.data_dir or None,
                     train=False, seed=0, image_size=config.image_size)
  members = restore_members(workdirs, model, input_shape, mesh)
  num = len(members)
  last_m = last_m or num
  steps = [(m.workdir, m.step) for m in members]
  stacked = ensemble.stack_snapshots([m.variables for m in members])
  del members[:]  # Only the stack is kept in device memory.

  compute_dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
  apply_fn = _apply_fn(model, compute_dtype)
  batch_size = eval_batch_size or config.eval_batch_size
  member_tot, ens_tot, head_tot = np.zeros((num, 3)), np.zeros((num, 3)), np.zeros(3)
  for x, y, mask in training.iter_test_batches(config, spec, mesh, batch_size, test_arrays):
    # One pass of every snapshot; the headline last-m ensemble is ensemble_predict's own mean when m = M,
    # else the last-m row of the per-m counts (the same members, so no second pass over the models).
    mean_BxC, members_MxBxC = ensemble.ensemble_predict(apply_fn, stacked, x, last_m=num, return_members=True)
    per_member, per_m = _member_and_ensemble_counts(members_MxBxC, y, mask)
    member_tot += np.asarray(per_member, np.float64)
    ens_tot += np.asarray(per_m, np.float64)
    head = jnp.stack(ensemble.counts(mean_BxC, y, mask)) if last_m == num else per_m[last_m - 1]
    head_tot += np.asarray(head, np.float64)

  report = {
      "dataset": config.dataset, "model": config.model, "workdirs": list(workdirs),
      "num_test_examples": int(head_tot[2]),
      "snapshots": [{"workdir": wd, "step": st, **r} for (wd, st), r in zip(steps, _rows(member_tot))],
      "ensembles": [{"m": i + 1, **r} for i, r in enumerate(_rows(ens_tot))],
      "ensemble": {"m": last_m, **_rows(head_tot[None])[0]},
  }
  out_dir = out_dir or os.path.join(workdirs[0], "eval")
  if jax.process_index() == 0:
    write_report(report, out_dir, plot=plot)
  return report


def _apply_fn(model, compute_dtype):
  return lambda variables, x: model.apply(variables, x.astype(compute_dtype), train=False)


def write_report(report: dict[str, Any], out_dir: str, *, plot: bool = True) -> None:
  """report.json, report.md and error_vs_m.png in out_dir."""
  out = checkpoints.run_path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.json").write_text(json.dumps(report, indent=2))
  lines = [f"# Snapshot Ensemble evaluation: {report['model']} on {report['dataset']} "
           f"({report['num_test_examples']} test examples)", "",
           "| snapshot | run | step | error (%) | NLL |", "|---|---|---|---|---|"]
  for i, s in enumerate(report["snapshots"]):
    lines.append(f"| {i + 1} | {s['workdir']} | {s['step']} | {100 * s['error']:.2f} | {s['nll']:.4f} |")
  lines += ["", "| last-m ensemble | error (%) | NLL |", "|---|---|---|"]
  for e in report["ensembles"]:
    lines.append(f"| m={e['m']} | {100 * e['error']:.2f} | {e['nll']:.4f} |")
  best = min(s["error"] for s in report["snapshots"])
  lines += ["", f"Best single snapshot: {100 * best:.2f}% error; ensemble of the last {report['ensemble']['m']}: "
            f"{100 * report['ensemble']['error']:.2f}% error, NLL {report['ensemble']['nll']:.4f}.", ""]
  (out / "report.md").write_text("\n".join(lines))
  if plot:
    _plot(report, out / "error_vs_m.png")
  logging.info("Wrote %s", out / "report.md")


def _plot(report: dict[str, Any], path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  num = len(report["snapshots"])
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(range(1, num + 1), [100 * s["error"] for s in report["snapshots"]], "o-", label="snapshot i (training order)")
  ax.plot([e["m"] for e in report["ensembles"]], [100 * e["error"] for e in report["ensembles"]], "s-",
          label="ensemble of the last m")
  ax.set_xlabel("snapshot index i / ensemble size m")
  ax.set_ylabel("test error (%)")
  ax.set_title(f"{report['model']} on {report['dataset']}")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)
