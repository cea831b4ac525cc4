"""eval.py's analyses against independent NumPy references computed from each snapshot applied on its own.

One tiny 3-snapshot run; evaluate_runs with both weight-space analyses; then calibration (ECE, Brier, NLL),
diversity (disagreement, softmax correlation), first-m ensembles, weight averages and the interpolation path are
recomputed here with per-snapshot `model.apply`, NumPy softmaxes, loops over bins and pairs, NumPy weight means and
BatchNorm statistics measured batch by batch with the models' known momentum.
"""
import json
import os

import jax
import numpy as np
import pytest

from snapjax import data, evaluation, experiment, training, weight_analyses
from snapjax.errors import ConfigError

from helpers import MEAN, NUM_TEST, STD, tiny_config

pytestmark = pytest.mark.devices(4)

NUM_CYCLES = 3
BN_BATCHES = 6  # Of the tiny split's 16 per epoch (512 examples, batch 32).
NUM_BINS = 15
MOMENTUM = 0.9  # snapjax.models' BatchNorm momentum, restated for the reference statistics.
LAMBDAS = np.linspace(0, 1, 11)
# The networks in weight space against the reference: float32 on 4 devices against a single-device apply with
# float64 statistics may flip a near-tie argmax; allow one test example (the NLL is compared at 1e-5).
ONE_EXAMPLE = 1 / NUM_TEST + 1e-12


@pytest.fixture(scope="module")
def evaluated(tiny_data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("analyses") / "run")
  training.train_and_evaluate(tiny_config(tiny_data, num_cycles=NUM_CYCLES), workdir)
  out_dir = str(tmp_path_factory.mktemp("analyses_eval"))
  report = evaluation.evaluate_runs([workdir], out_dir=out_dir, analyses=["interpolation", "weight_average"],
                                    bn_batches=BN_BATCHES)
  return workdir, out_dir, report


@pytest.fixture(scope="module")
def reference(evaluated, tiny_data):
  """The snapshots as NumPy, the model, the normalised test set, each snapshot's float64 softmax, the BN batches."""
  workdir, _, _ = evaluated
  exp = experiment.build(evaluation.load_run_config(workdir))
  members = evaluation.restore_members([workdir], exp)
  snaps = [jax.tree.map(np.asarray, m.variables) for m in members]
  images, labels = data.load_fashion_mnist(tiny_data, "test")
  x = (images.astype(np.float32) - MEAN) / STD
  train_arrays = weight_analyses.load_bn_data(exp)
  bn = [np.asarray(b) for b in weight_analyses.bn_batches(exp, train_arrays, BN_BATCHES)]
  probs = np.stack([_softmax(exp.model, s, x) for s in snaps])
  return {"model": exp.model, "snaps": snaps, "x": x, "labels": labels, "probs": probs, "bn": bn,
          "steps": [m.step for m in members]}


def _softmax(model, variables, x):
  logits = np.asarray(model.apply(variables, x, train=False), np.float64)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _error_nll(p, labels):
  return np.mean(p.argmax(-1) != labels), -np.mean(np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-12)))


def _ece_brier(p, labels, num_bins=NUM_BINS):
  """Top-label ECE by a loop over examples into equal-width bins and a loop over bins; Brier summed over classes."""
  bins = [[] for _ in range(num_bins)]
  for row, y in zip(p, labels):
    conf = row.max()
    bins[min(int(conf * num_bins), num_bins - 1)].append((conf, row.argmax() == y))
  ece = sum(len(b) / len(labels) * abs(np.mean([a for _, a in b]) - np.mean([c for c, _ in b])) for b in bins if b)
  brier = np.mean(np.sum((p - np.eye(p.shape[1])[labels]) ** 2, axis=1))
  return ece, brier


def _with_recomputed_stats(model, variables, batches):
  """variables with each BN statistic the plain mean over batches of that batch's own, read off one training-mode
  apply at zero running statistics ((1 - momentum) * batch statistic)."""
  per_batch = []
  for xb in batches:
    zeros = jax.tree.map(np.zeros_like, variables["batch_stats"])
    _, new = model.apply({"params": variables["params"], "batch_stats": zeros}, xb, train=True,
                         mutable=["batch_stats"])
    per_batch.append(jax.tree.map(lambda a: np.asarray(a, np.float64) / (1 - MOMENTUM), new["batch_stats"]))
  stats = jax.tree.map(lambda *xs: np.mean(xs, axis=0).astype(np.float32), *per_batch)
  return {"params": variables["params"], "batch_stats": stats}


def _score_network(reference, params):
  """(error, nll) on the test set of a network with these params and statistics recomputed on the BN batches."""
  variables = _with_recomputed_stats(reference["model"], {"params": params, "batch_stats": reference["snaps"][0][
      "batch_stats"]}, reference["bn"])
  return _error_nll(_softmax(reference["model"], variables, reference["x"]), reference["labels"])


@pytest.mark.slow
def test_report_has_every_analysis_and_figure(evaluated):
  _, out_dir, report = evaluated
  for key in ("calibration", "diversity", "ensembles_first_m", "weight_average", "interpolation", "bn_recompute"):
    assert key in report, key
  for name in ("report.json", "report.md", "error_vs_m.png", "reliability.png", "diversity.png",
               "interpolation.png"):
    assert os.path.getsize(os.path.join(out_dir, name)) > 0, name
  on_disk = json.load(open(os.path.join(out_dir, "report.json")))
  assert on_disk["calibration"] == report["calibration"] and on_disk["interpolation"] == report["interpolation"]
  markdown = open(os.path.join(out_dir, "report.md")).read()
  for section in ("## Calibration", "## Diversity: disagreement", "## Diversity: correlation",
                  "## Ensemble size", "## Weight-averaged snapshots", "## Interpolation"):
    assert section in markdown, section
  assert [w["m"] for w in report["weight_average"]] == [2, 3]
  assert [e["snapshot"] for e in report["interpolation"]] == [1, 2]
  assert all(e["lambdas"] == pytest.approx(LAMBDAS.tolist()) for e in report["interpolation"])
  assert report["bn_recompute"]["batches"] == BN_BATCHES and report["bn_recompute"]["batch_size"] == 32
  assert report["calibration"]["num_bins"] == NUM_BINS


def test_calibration_equals_numpy_loops_over_bins(evaluated, reference):
  _, _, report = evaluated
  probs, labels = reference["probs"], reference["labels"]
  cal = report["calibration"]
  for i, entry in enumerate(cal["snapshots"]):
    assert entry["step"] == reference["steps"][i]
    ece, brier = _ece_brier(probs[i], labels)
    np.testing.assert_allclose([entry["ece"], entry["brier"]], [ece, brier], atol=2e-6)
    np.testing.assert_allclose(entry["nll"], _error_nll(probs[i], labels)[1], rtol=1e-4)
    assert sum(entry["reliability"]["count"]) == NUM_TEST
  for entry in cal["ensembles"]:
    p = probs[NUM_CYCLES - entry["m"]:].mean(0)
    np.testing.assert_allclose([entry["ece"], entry["brier"]], _ece_brier(p, labels), atol=2e-6)
    np.testing.assert_allclose(entry["nll"], _error_nll(p, labels)[1], rtol=1e-4)


def test_diversity_equals_a_naive_pairwise_loop(evaluated, reference):
  _, _, report = evaluated
  probs = reference["probs"]
  for i in range(NUM_CYCLES):
    for j in range(NUM_CYCLES):
      disagree = np.mean(probs[i].argmax(-1) != probs[j].argmax(-1))
      corr = np.corrcoef(probs[i].ravel(), probs[j].ravel())[0, 1]
      np.testing.assert_allclose(report["diversity"]["disagreement"][i][j], disagree, atol=1e-12)
      np.testing.assert_allclose(report["diversity"]["correlation"][i][j], corr, atol=1e-5)


def test_first_m_ensembles_equal_numpy_means(evaluated, reference):
  _, _, report = evaluated
  probs, labels = reference["probs"], reference["labels"]
  assert [e["m"] for e in report["ensembles_first_m"]] == list(range(1, NUM_CYCLES + 1))
  for entry in report["ensembles_first_m"]:
    p = probs[:entry["m"]].mean(0)
    error, nll = _error_nll(p, labels)
    np.testing.assert_allclose(entry["error"], error, atol=1e-12)
    np.testing.assert_allclose(entry["nll"], nll, rtol=1e-4)
    np.testing.assert_allclose(entry["ece"], _ece_brier(p, labels)[0], atol=2e-6)
  # The first M and the last M are the same ensemble.
  assert report["ensembles_first_m"][-1]["error"] == report["ensembles"][-1]["error"]


def test_weight_average_equals_numpy_mean_weights_with_recomputed_statistics(evaluated, reference):
  _, _, report = evaluated
  for entry in report["weight_average"]:
    params = jax.tree.map(lambda *xs: np.mean(np.asarray(xs, np.float64), axis=0).astype(np.float32),
                          *[s["params"] for s in reference["snaps"][NUM_CYCLES - entry["m"]:]])
    error, nll = _score_network(reference, params)
    assert abs(entry["error"] - error) <= ONE_EXAMPLE, (entry, error)
    np.testing.assert_allclose(entry["nll"], nll, rtol=1e-5)


def test_interpolation_ends_are_the_snapshots_with_recomputed_statistics(evaluated, reference):
  _, _, report = evaluated
  snaps = reference["snaps"]
  last = _score_network(reference, snaps[-1]["params"])
  for entry in report["interpolation"]:
    i = entry["snapshot"] - 1
    assert entry["step"] == reference["steps"][i] and len(entry["error"]) == len(LAMBDAS)
    first = _score_network(reference, snaps[i]["params"])
    middle = _score_network(reference, jax.tree.map(lambda a, b: (0.5 * a + 0.5 * b).astype(np.float32),
                                                    snaps[-1]["params"], snaps[i]["params"]))
    for k, (error, nll) in ((0, first), (5, middle), (-1, last)):
      assert abs(entry["error"][k] - error) <= ONE_EXAMPLE, (entry["snapshot"], k, entry["error"][k], error)
      np.testing.assert_allclose(entry["nll"][k], nll, rtol=1e-5)


# ----------------------------------------------------------------------------- BatchNorm batches


def test_bn_batches_are_distinct_training_examples_and_deterministic(tiny_data):
  exp = experiment.build(tiny_config(tiny_data, augment="none"))
  arrays = weight_analyses.load_bn_data(exp)
  assert weight_analyses.num_bn_batches(exp, len(arrays[1]), 0) == 16  # One epoch: 512 // 32.
  assert weight_analyses.num_bn_batches(exp, len(arrays[1]), 100) == 16
  assert weight_analyses.num_bn_batches(exp, len(arrays[1]), 5) == 5
  batches = [np.asarray(b) for b in weight_analyses.bn_batches(exp, arrays, 16)]
  assert all(b.shape == (32, 28, 28, 1) and b.dtype == np.float32 for b in batches)
  seen = np.concatenate(batches)
  normalised = (arrays[0].astype(np.float32) - MEAN) / STD
  # Every example of the epoch exactly once: the rows are a permutation of the normalised training images.
  order = lambda a: a[np.lexsort(a.reshape(len(a), -1).T[::-1])]  # noqa: E731
  np.testing.assert_allclose(order(seen), order(normalised), rtol=1e-6, atol=1e-6)
  again = [np.asarray(b) for b in weight_analyses.bn_batches(exp, arrays, 2)]
  np.testing.assert_array_equal(again[0], batches[0])
  with pytest.raises(ConfigError, match="fewer than one batch"):
    weight_analyses.num_bn_batches(exp, 31, 1)


def test_bn_batches_use_the_run_s_augmentation(tiny_data):
  exp = experiment.build(tiny_config(tiny_data))  # Fashion-MNIST's own: pad-4 crops and flips.
  arrays = weight_analyses.load_bn_data(exp)
  first, again = ([np.asarray(b) for b in weight_analyses.bn_batches(exp, arrays, 2)] for _ in range(2))
  np.testing.assert_array_equal(first[1], again[1])
  plain = experiment.build(tiny_config(tiny_data, augment="none"))
  unaugmented = [np.asarray(b) for b in weight_analyses.bn_batches(plain, arrays, 2)]
  assert not np.allclose(first[0], unaugmented[0])


@pytest.mark.slow
def test_streamed_dataset_runs_the_analyses_on_its_training_stream():
  """ImageNet-style streamed data (TFDS mock): BN batches from the training stream, scores from the eval stream."""
  import tensorflow_datasets as tfds
  from snapjax import config as config_lib, ensemble
  config = config_lib.base_config()
  config.update(dataset="imagenet2012", model="resnet8", image_size=16, batch_size=8, eval_batch_size=8)
  exp = experiment.build(config)
  with tfds.testing.mock_data(num_examples=12):
    assert weight_analyses.load_bn_data(exp) is None
    batches = [np.asarray(b) for b in weight_analyses.bn_batches(exp, None, 3)]
    assert len(batches) == 3 and all(b.shape == (8, 16, 16, 3) for b in batches)
    np.testing.assert_array_equal(np.asarray(next(weight_analyses.bn_batches(exp, None, 1))), batches[0])
    snaps = [exp.init_variables(jax.random.PRNGKey(k)) for k in range(2)]
    stacked = jax.device_put(ensemble.stack_snapshots(snaps), exp.replicated)
    out = weight_analyses.run(exp, stacked, [("run", 1), ("run", 2)], ("weight_average", "interpolation"),
                              train_arrays=None, test_arrays=None, num_batches=3, interpolation_points=3)
  assert out["bn_recompute"]["streamed"] and out["bn_recompute"]["examples"] == 24
  assert len(out["weight_average"]) == 1 and out["weight_average"][0]["count"] == 12
  assert len(out["interpolation"]) == 1 and len(out["interpolation"][0]["error"]) == 3


def test_analysis_arguments_are_checked_first():
  assert weight_analyses.check_args(["interpolation", "weight_average", ""], 0, 2) == ("weight_average",
                                                                                       "interpolation")
  for args, needle in (((["calibration"], 50, 11), "allowed: weight_average, interpolation"),
                       ((["foo"], 50, 11), "'foo'"), (([], -1, 11), "--bn_batches=-1"),
                       (([], 50, 1), "--interpolation_points=1")):
    with pytest.raises(ConfigError, match=needle):
      weight_analyses.check_args(*args)
  with pytest.raises(ConfigError, match="unknown analysis 'swa'"):  # Before the workdir is even read.
    evaluation.evaluate_runs(["/nonexistent/run"], analyses=["swa"])


def test_analyses_of_a_single_snapshot_are_refused_before_restoring(evaluated, tmp_path):
  import shutil
  workdir, _, _ = evaluated
  single = str(tmp_path / "single")
  shutil.copytree(workdir, single)
  for step in sorted(os.listdir(os.path.join(single, "snapshots")), key=int)[1:]:
    shutil.rmtree(os.path.join(single, "snapshots", step))
  with pytest.raises(ConfigError, match="needs at least 2 snapshots.*found 1"):
    evaluation.evaluate_runs([single], analyses=["weight_average"], out_dir=str(tmp_path / "eval"))
  assert not os.path.exists(tmp_path / "eval")
