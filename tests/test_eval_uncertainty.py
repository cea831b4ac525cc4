"""eval.py's uncertainty analyses on two tiny runs, against references computed from each snapshot applied on its
own (model.apply on the unpadded sets, float64 NumPy, scikit-learn and scipy), and the command line end to end."""
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest
from scipy import optimize
from sklearn import metrics as skm

from snapjax import (corruptions, data, evaluation, experiment, ood_data, scoring, training, uncertainty,
                     uncertainty_analyses)
from snapjax.errors import ConfigError

import helpers
from helpers import MEAN, NUM_TEST, STD, tiny_config

pytestmark = pytest.mark.devices(4)
SHIFT_EXAMPLES = 40
SPLITS = {"train_split": "train[:448]", "val_split": "train[-64:]"}  # Disjoint: 448 + 64 = the tiny set's 512.


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
  root = tmp_path_factory.mktemp("uncertainty")
  workdirs = []
  for seed in (0, 1):
    workdir = str(root / f"run{seed}")
    training.train_and_evaluate(tiny_config(tiny_data, seed=seed, **SPLITS), workdir)
    workdirs.append(workdir)
  return workdirs


@pytest.fixture(scope="module")
def evaluated(runs, tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("uncertainty_eval"))
  report = evaluation.evaluate_runs(runs, out_dir=out_dir, analyses=["ood", "shift"], shift_examples=SHIFT_EXAMPLES)
  return out_dir, report


def _logits(model, variables, x):
  return np.asarray(model.apply(variables, x, train=False), np.float64)


@pytest.fixture(scope="module")
def reference(runs, tiny_data):
  """Each snapshot's float64 logits on the unpadded test set, the validation split and the digits."""
  exp = experiment.build(evaluation.load_run_config(runs[0]))
  members = evaluation.restore_members(runs, exp)
  snaps = [jax.tree.map(np.asarray, m.variables) for m in members]
  norm = lambda images: (images.astype(np.float32) - MEAN) / STD
  test_x, labels = data.load_fashion_mnist(tiny_data, "test")
  train_x, train_y = data.load_fashion_mnist(tiny_data, "train")
  digits = ood_data.digits_28x28()
  out = {"labels": labels.astype(np.int64), "val_labels": train_y[-64:].astype(np.int64), "exp": exp, "runs": runs,
         "tiny_data": tiny_data}
  for name, x in (("test", test_x), ("val", train_x[-64:]), ("digits", digits)):
    out[name] = np.stack([_logits(exp.model, s, norm(x)) for s in snaps])
  return out


def _scipy_t(logp, labels):
  f = lambda u: -np.mean(uncertainty.log_softmax(logp / np.exp(u))[np.arange(len(labels)), labels])
  return math.exp(optimize.minimize_scalar(f, bounds=(-6, 6), method="bounded", options={"xatol": 1e-10}).x)


@pytest.mark.slow
def test_kept_outputs_are_exact_over_padded_batches(runs, reference):
  exp = reference["exp"]
  stacked = evaluation.ensemble.stack_snapshots([m.variables for m in evaluation.restore_members(runs, exp)])
  for batch_size in (64, 256):  # 203 examples: a padded last batch of 11 real examples; one batch of 256.
    scores = scoring.score_snapshots(exp.apply_fn, stacked, exp.test_batches(batch_size), keep_outputs=True)
    assert scores.outputs.logits_MxNxC.shape == (4, NUM_TEST, 10)
    np.testing.assert_array_equal(scores.outputs.labels_N, reference["labels"])
    np.testing.assert_allclose(scores.outputs.logits_MxNxC, reference["test"], atol=2e-4, rtol=1e-4)
    plain = scoring.score_snapshots(exp.apply_fn, stacked, exp.test_batches(batch_size))
    # Keeping the outputs leaves every existing score as it was, bit for bit.
    assert scores.members == plain.members and scores.last_m == plain.last_m and scores.ensemble == plain.ensemble
    assert scores.first_m == plain.first_m
    for a, b in zip(scores.last_m_calibration, plain.last_m_calibration):
      for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa, fb)


@pytest.mark.slow
def test_temperature_against_references(evaluated, reference):
  _, report = evaluated
  labels = reference["labels"]
  t = report["temperature"]
  assert t["val_split"] == SPLITS["val_split"] and len(t["snapshots"]) == 4 and len(t["ensembles"]) == 4
  for i, e in enumerate(t["snapshots"]):
    # "before" agrees with the test pass's own calibration entry; the error is the same count.
    assert e["before"]["error"] == report["snapshots"][i]["error"]
    assert e["before"]["nll"] == pytest.approx(report["calibration"]["snapshots"][i]["nll"], abs=2e-5)
    assert e["before"]["ece"] == pytest.approx(report["calibration"]["snapshots"][i]["ece"], abs=1e-4)
  for e in t["ensembles"]:
    logp = uncertainty.log_mean_probs(reference["test"][4 - e["m"]:])
    assert e["test_t"]["temperature"] == pytest.approx(_scipy_t(logp, labels), rel=1e-3)
    val_logp = uncertainty.log_mean_probs(reference["val"][4 - e["m"]:])
    t_val = _scipy_t(val_logp, reference["val_labels"])
    assert e["val"]["temperature"] == pytest.approx(t_val, rel=1e-3)
    scaled = uncertainty.log_softmax(logp / t_val)
    assert e["val"]["nll"] == pytest.approx(-np.mean(scaled[np.arange(NUM_TEST), labels]), abs=1e-4)
    assert e["test_cv"]["folds"] == 10 and e["test_cv"]["nll"] > 0


def test_ood_against_sklearn(evaluated, reference):
  _, report = evaluated
  sets = report["ood"]["sets"]
  assert set(sets) == {"digits", "uniform_noise", "gaussian_noise"} and sets["digits"]["num_examples"] == 1797
  head = reference["test"], reference["digits"]
  ins, outs = (uncertainty.log_mean_probs(a) for a in head)
  s_in, s_out = -np.exp(ins).max(-1), -np.exp(outs).max(-1)
  y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
  got = sets["digits"]["ensemble"]["max_prob"]
  assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, np.r_[s_in, s_out]), abs=2e-3)
  assert got["aupr"] == pytest.approx(skm.average_precision_score(y, np.r_[s_in, s_out]), abs=2e-3)
  assert set(sets["digits"]["ensemble"]) == set(uncertainty_analyses.SCORES)
  assert "mutual_information" not in sets["digits"]["best_snapshot"]


def test_selective_and_conformal_entries(evaluated, reference):
  _, report = evaluated
  logp = uncertainty.log_mean_probs(reference["test"])
  labels = reference["labels"]
  order = np.argsort(-np.exp(logp).max(-1), kind="stable")
  risks = np.cumsum(logp.argmax(-1)[order] != labels[order]) / np.arange(1, NUM_TEST + 1)
  assert report["selective"]["ensembles"][-1]["aurc"] == pytest.approx(risks.mean(), abs=5e-3)
  for model in ("ensemble", "best_snapshot"):
    for method in uncertainty.CONFORMAL_METHODS:
      for alpha in ("0.1", "0.05"):
        v = report["conformal"][model][method][alpha]
        assert v["coverage"] >= 1 - float(alpha) - 0.06 and 0 < v["size"] <= 10


def test_deep_ensemble_equivalent(evaluated):
  _, report = evaluated
  d = report["dee"]
  assert [e["size"] for e in d["deep_ensembles"]] == [1, 2]
  final_a = d["snapshots"][1]  # The first run's final snapshot is the deep ensemble of size 1.
  assert (final_a["dee"], final_a["bound"]) == (1.0, "")
  assert final_a["calibrated_nll"] == d["deep_ensembles"][0]["calibrated_nll"]


def test_dee_is_k_for_a_deep_ensemble_of_size_k():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (3, 300, 5))
  labels = rng.integers(0, 5, 300)
  logits[:, np.arange(300), labels] += np.array([1.0, 1.5, 2.0])[:, None]
  models = uncertainty_analyses._Models(logits)  # pylint: disable=protected-access
  snaps = [({"snapshot": i + 1}, [i]) for i in range(3)]
  ensembles = [({"m": m}, list(range(3 - m, 3))) for m in (1, 2, 3)]
  out = uncertainty_analyses.dee_entries(models, labels, snaps, ensembles, [[0], [1], [2]], [0, 1, 2])
  assert (out["ensembles"][2]["dee"], out["ensembles"][2]["bound"]) == (3.0, "")  # All three: size 3.
  assert out["snapshots"][0]["dee"] == 1.0


def test_shift_cells(evaluated, reference):
  _, report = evaluated
  sh = report["shift"]
  assert sh["examples"] == SHIFT_EXAMPLES and len(sh["cells"]) == 50 and len(sh["per_severity"]["ensemble"]) == 5
  logp = uncertainty.log_mean_probs(reference["test"][:, :SHIFT_EXAMPLES])
  assert sh["clean"]["ensemble"]["error"] == pytest.approx(uncertainty.error(logp, reference["labels"][:40]))
  for s in sh["per_severity"]["ensemble"]:
    cells = [c["ensemble"]["error"] for c in sh["cells"] if c["severity"] == s["severity"]]
    assert s["error"] == pytest.approx(np.mean(cells))
  # Cells against the float64 reference network on the same corrupted images (a corruption's severities are scored in
  # one pass and split: the first, a middle and the last cell of the first and the last corruption).
  test_x = data.load_fashion_mnist(reference["tiny_data"], "test")[0][:SHIFT_EXAMPLES]
  snaps = [jax.tree.map(np.asarray, m.variables) for m in evaluation.restore_members(reference["runs"],
                                                                                      reference["exp"])]
  by_cell = {(c["corruption"], c["severity"]): c for c in sh["cells"]}
  for name in (list(corruptions.CORRUPTIONS)[0], list(corruptions.CORRUPTIONS)[-1]):
    for severity in (1, 3, 5):
      x = corruptions.corrupt(test_x, name, severity, seed=uncertainty_analyses.SEED)
      logp = uncertainty.log_mean_probs(np.stack([_logits(reference["exp"].model, v, (x.astype(np.float32) - MEAN)
                                                          / STD) for v in snaps]))
      got = by_cell[(name, severity)]["ensemble"]
      labels = reference["labels"][:SHIFT_EXAMPLES]
      assert got["error"] == pytest.approx(uncertainty.error(logp, labels)), (name, severity)
      assert got["nll"] == pytest.approx(uncertainty.nll(logp, labels), rel=1e-4), (name, severity)


def test_report_files(evaluated):
  out_dir, _ = evaluated
  for name in ("temperature", "ood", "shift", "conformal", "risk_coverage"):
    assert os.path.getsize(os.path.join(out_dir, f"{name}.png")) > 0
  md = open(os.path.join(out_dir, "report.md")).read()
  for section in ("Temperature scaling", "Selective prediction", "Conformal", "Deep-ensemble", "Out-of-distribution",
                  "Dataset shift"):
    assert f"## {section}" in md
  json.load(open(os.path.join(out_dir, "report.json")))


@pytest.mark.parametrize("kwargs,needle", [
    ({"analyses": ["bogus"]}, "unknown analysis 'bogus'"),
    ({"analyses": ["shift"], "shift_examples": 0}, "--shift_examples=0"),
    ({"data_overrides": {"val_split": "train[400:464]"}}, "overlaps the training split"),
])
def test_bad_arguments_before_restoring(runs, kwargs, needle, monkeypatch):
  monkeypatch.setattr(evaluation, "restore_members", lambda *a: pytest.fail("restored before checking"))
  with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")):
    evaluation.evaluate_runs(runs[:1], **kwargs)


def test_dee_by_name_needs_two_networks(runs, monkeypatch):
  monkeypatch.setattr(evaluation, "restore_members", lambda *a: pytest.fail("restored before checking"))
  with pytest.raises(ConfigError, match="at least 2 independently trained"):
    evaluation.evaluate_runs(runs[:1], analyses=["dee"])


def _eval_py(*args):
  return helpers.run_python(["eval.py", *args], helpers.subprocess_env(4), 600)


@pytest.mark.parametrize("flag,needle", [("--analyses=oops", "unknown analysis 'oops'"),
                                         ("--shift_examples=0", "--shift_examples=0")])
def test_eval_py_bad_flags_exit_2(runs, flag, needle):
  proc = _eval_py("--workdir", runs[0], flag)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and lines[-1].startswith("error: ") and needle in lines[-1], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_eval_py_all_end_to_end(runs, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(runs[0], workdir)
  proc = _eval_py("--workdir", workdir, "--analyses=all", "--shift_examples=16", "--bn_batches=2",
                  "--interpolation_points=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.load(open(os.path.join(workdir, "eval", "report.json")))
  for key in ("temperature", "selective", "conformal", "ood", "shift", "weight_average", "interpolation"):
    assert key in report, key
  assert "dee" not in report and any("deep-ensemble" in n for n in report["uncertainty_notes"])
  assert any(l.startswith("ensemble of last 2 calibrated NLL") for l in proc.stdout.splitlines())
  for name in ("temperature", "ood", "shift", "conformal", "risk_coverage", "interpolation", "reliability"):
    assert os.path.getsize(os.path.join(workdir, "eval", f"{name}.png")) > 0


@pytest.mark.parametrize("strategy", ["map", "loop", "vmap"])
def test_ensemble_predict_returns_logits(strategy):
  import jax.numpy as jnp
  from snapjax import ensemble
  apply_fn = _linear
  stacked = ensemble.stack_snapshots([{"w": k * jnp.eye(3)[:, ::-1] + 0.1 * k} for k in (1.0, 2.0, 3.0)])
  x = jnp.arange(12, dtype=jnp.float32).reshape(4, 3) / 7
  mean, probs, logits = ensemble.ensemble_predict(apply_fn, stacked, x, last_m=2, strategy=strategy,
                                                  return_members="logits")
  ref_mean, ref_probs = ensemble.ensemble_predict(apply_fn, stacked, x, last_m=2, strategy=strategy,
                                                  return_members=True)
  np.testing.assert_array_equal(mean, ref_mean)
  np.testing.assert_array_equal(probs, ref_probs)
  want = np.stack([np.asarray(x) @ np.asarray(stacked["w"][i]) for i in (1, 2)])
  np.testing.assert_allclose(logits, want, rtol=1e-6)
  with pytest.raises(ValueError, match="return_members"):
    ensemble.ensemble_predict(apply_fn, stacked, x, return_members="probs")


def _linear(variables, x):
  return x @ variables["w"]


@pytest.mark.parametrize("dataset,value,ok", [("fashion_mnist", "train[-5000:]", True),
                                              ("imagenet2012", "train[:100]", False), ("cifar10", "", True)])
def test_config_val_split(dataset, value, ok):
  from snapjax import config as config_lib
  c = config_lib.base_config()
  c.dataset, c.model = dataset, "resnet8" if dataset != "imagenet2012" else "resnet50"
  c.val_split = value
  if ok:
    config_lib.validate(c, 1)
  else:
    with pytest.raises(ConfigError, match="val_split"):
      config_lib.validate(c, 1)


def test_quickstart_val_split_is_disjoint_and_ignored_by_training():
  from configs import quickstart
  c = quickstart.get_config()
  assert (c.train_split, c.val_split) == ("train[:10000]", "train[-5000:]")
  exp = experiment.build(c)
  uncertainty_analyses._check_val_split(exp, c.val_split)  # pylint: disable=protected-access
