"""benchmarks/serving.py: every row's test error, weights and file size against independent references, on tiny runs."""
import json
import os

import jax
import numpy as np
import pytest

from snapjax import evaluation, experiment

import helpers

pytestmark = pytest.mark.slow


def _naive_ensemble_error(workdir):
  """Each snapshot's softmax by its own jitted call on the normalised test images, averaged in NumPy."""
  exp = experiment.build(evaluation.load_run_config(workdir))
  images, labels = exp.load_test_data()
  x = (images.astype(np.float32) - np.asarray(exp.spec.mean, np.float32)) / np.asarray(exp.spec.std, np.float32)
  apply = jax.jit(lambda v, x: jax.nn.softmax(exp.model.apply(v, x, train=False), -1))
  snaps = [m.variables for m in evaluation.restore_members([workdir], exp)]
  probs = np.mean([np.asarray(apply(v, x)) for v in snaps], axis=0)
  mb = sum(np.asarray(a).nbytes for v in snaps for a in jax.tree.leaves(v)) / 2 ** 20
  return float(np.mean(np.argmax(probs, -1) != labels)), mb, len(snaps)


def test_serving_table_rows_score_as_their_models(tiny_run, tmp_path):
  teacher, teacher_result = tiny_run()
  student, student_result = tiny_run(method="distill", schedule="step", num_cycles=1, teacher_workdirs=teacher)
  out = tmp_path / "serving.json"
  proc = helpers.run_python(["benchmarks/serving.py", "--ensemble", teacher, "--student", student, "--repeats", "2",
                             "--calls", "3", "--large_batch", "64", "--json", str(out)], helpers.subprocess_env(1), 600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {r["row"].split(",")[0].split(" (")[0]: r for r in json.load(open(out))["rows"]}
  names = [r["row"] for r in json.load(open(out))["rows"]]
  assert len(names) == 5 and sum("exported file" in n for n in names) == 2, names
  ens_error, ens_mb, m = _naive_ensemble_error(teacher)
  assert m == 2
  ensemble = [r for r in json.load(open(out))["rows"] if r["row"].startswith("ensemble of the last 2")]
  assert len(ensemble) == 2  # Fused and exported: the same predictions.
  for r in ensemble:
    assert r["test_error_this_pass"] == pytest.approx(ens_error, abs=1e-9)
    assert r["weights_mb"] == pytest.approx(ens_mb)
  assert ensemble[1]["file_mb"] > 0.9 * ens_mb  # The exported file carries the weights.
  # The last snapshot's and the student's error as training scored them (snapjax.scoring: a second path).
  assert rows["single snapshot"]["test_error_this_pass"] == pytest.approx(
      teacher_result["snapshot_scores"][-1]["error"], abs=1e-9)
  assert rows["single snapshot"]["weights_mb"] == pytest.approx(ens_mb / 2)
  students = [r for r in json.load(open(out))["rows"] if r["row"].startswith("distilled student")]
  for r in students:
    assert r["test_error_this_pass"] == pytest.approx(student_result["snapshot_scores"][-1]["error"], abs=1e-9)
    assert r["error"] is None  # No eval.py report for the student: n/a, not a made-up number.
  for r in json.load(open(out))["rows"]:
    assert 0 < r["ms_per_example_large"] < r["ms_per_example_batch1"], r
  assert "| served model | snapshots | weights MB |" in proc.stdout
