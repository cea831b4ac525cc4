"""End-to-end training + evaluation on a tiny generated IDX dataset and on mock TFDS data, 4 fake devices."""
import json
import os

import jax
import numpy as np
import pytest

from snapjax import checkpoints, config as config_lib, evaluation, experiment, models, schedules, training
from snapjax import report as report_lib
from snapjax.errors import CheckpointError, ConfigError

from helpers import MEAN, NUM_TEST, STD, snapshot_arrays, tiny_config

pytestmark = pytest.mark.devices(4)  # In-process runs and references use conftest's 4 CPU devices.


@pytest.fixture(scope="module")
def full_run(tiny_run):
  """The default tiny run (shared by the session: read-only), and its TrainResult as a dict."""
  return tiny_run()


def _load_snapshots(workdir, config):
  exp = experiment.build(config)
  return exp.model, evaluation.restore_members([workdir], exp)


def test_snapshots_at_exactly_the_schedule_steps(full_run):
  workdir, result = full_run
  # 512 examples over 4 devices, 8 per device per step: 16 steps/epoch, 4 epochs, 2 cycles.
  assert schedules.snapshot_steps(64, 2) == [32, 64]
  ckpt = checkpoints.RunCheckpoints(workdir, read_only=True)
  assert ckpt.snapshot_steps() == [32, 64]
  ckpt.close()
  assert checkpoints.saved_snapshot_steps(workdir) == [32, 64]
  assert checkpoints.saved_snapshot_steps(os.path.join(workdir, "missing")) == []
  assert result["step"] == 64 and not result["preempted"]
  assert [s["step"] for s in result["snapshot_scores"]] == [32, 64]
  assert all(s["count"] == NUM_TEST for s in result["snapshot_scores"])
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"] == "resnet8" and saved["num_cycles"] == 2


def test_training_learns_the_tiny_task(full_run):
  _, result = full_run
  # Chance is 90% error; brightness-coded classes are easy after four epochs.
  assert result["snapshot_scores"][-1]["error"] < 0.3


def test_eval_report_equals_naive_recomputation(full_run, tiny_data, tmp_path):
  workdir, result = full_run
  report = evaluation.evaluate_runs([workdir], out_dir=str(tmp_path), plot=True)
  for name in ("report.json", "report.md", "error_vs_m.png"):
    assert os.path.getsize(tmp_path / name) > 0
  on_disk = json.load(open(tmp_path / "report.json"))
  assert on_disk["snapshots"] == report["snapshots"]
  assert report_lib.read_report(str(tmp_path)) == on_disk and report_lib.read_report(str(tmp_path / "none")) is None
  assert report_lib.figure_path(str(tmp_path), "error_vs_m") == str(tmp_path / "error_vs_m.png")

  # Naive reference: each snapshot applied on its own, NumPy softmax and metrics, last-m means.
  from snapjax import data
  images, labels = data.load_fashion_mnist(tiny_data, "test")
  x = (images.astype(np.float32) - MEAN) / STD
  config = evaluation.load_run_config(workdir)
  model, members = _load_snapshots(workdir, config)
  probs = []
  for m in members:
    logits = np.asarray(model.apply(jax.device_get(m.variables), x, train=False), np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs.append(e / e.sum(-1, keepdims=True))
  probs = np.stack(probs)
  assert report["num_test_examples"] == NUM_TEST
  for i, snap in enumerate(report["snapshots"]):
    assert snap["step"] == members[i].step
    np.testing.assert_allclose(snap["error"], np.mean(probs[i].argmax(-1) != labels), atol=1e-9)
    np.testing.assert_allclose(snap["nll"], -np.mean(np.log(probs[i][np.arange(NUM_TEST), labels])), rtol=1e-4)
  for ens in report["ensembles"]:
    p = probs[len(probs) - ens["m"]:].mean(0)
    np.testing.assert_allclose(ens["error"], np.mean(p.argmax(-1) != labels), atol=1e-9)
    np.testing.assert_allclose(ens["nll"], -np.mean(np.log(p[np.arange(NUM_TEST), labels])), rtol=1e-4)
  assert report["ensemble"]["m"] == 2
  for k in ("error", "nll"):  # The headline comes straight from ensemble_predict's mean.
    np.testing.assert_allclose(report["ensemble"][k], report["ensembles"][-1][k], rtol=1e-5)
  # The score logged at snapshot time (a second code path) agrees with eval.py's.
  for logged, snap in zip(result["snapshot_scores"], report["snapshots"]):
    np.testing.assert_allclose(logged["error"], snap["error"], atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [20, 32])
def test_interrupted_run_resumes_to_identical_snapshots(full_run, tiny_data, tmp_path, stop_at):
  workdir = str(tmp_path / "run")
  config = tiny_config(tiny_data)
  # Preempt (the SIGTERM path) between snapshots, or right at the first snapshot.
  first = training.train_and_evaluate(config, workdir, hooks=training.Hooks(stop_at=lambda step: step == stop_at))
  assert first["preempted"] and first["step"] == stop_at
  ckpt = checkpoints.RunCheckpoints(workdir, read_only=True)
  assert ckpt.snapshot_steps() == ([32] if stop_at >= 32 else [])
  ckpt.close()
  second = training.train_and_evaluate(config, workdir)
  assert not second["preempted"] and second["step"] == 64
  resumed, reference = snapshot_arrays(workdir), snapshot_arrays(full_run[0])
  assert sorted(resumed) == sorted(reference) == [32, 64]
  for step in reference:
    jax.tree.map(np.testing.assert_array_equal, resumed[step], reference[step])


def test_different_config_in_same_workdir_is_refused(full_run, tiny_data, tmp_path):
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(full_run[0], workdir)  # Not the shared run itself: the refused run takes its lock for a moment.
  before = sorted(os.listdir(os.path.join(workdir, "snapshots")))
  with pytest.raises(CheckpointError, match="different config.*init_lr"):
    training.train_and_evaluate(tiny_config(tiny_data, init_lr=0.3), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "snapshots"))) == before


@pytest.mark.parametrize("field, value, match", [
    ("model", "resnet9", "model='resnet9'.*resnet110"),
    ("dataset", "mnist", "dataset='mnist'.*cifar10"),
    ("batch_size", 30, "batch_size=30.*divisible.*4"),
    ("num_cycles", 0, "num_cycles"),
    ("num_cycles", 80, "num_cycles=80"),
    ("init_lr", 0.0, "init_lr"),
    ("num_epochs", -1.0, "num_epochs"),
    ("schedule", "linear", "schedule='linear'.*cosine_cycles"),
])
def test_bad_config_is_a_config_error_before_training(tiny_data, tmp_path, field, value, match):
  with pytest.raises(ConfigError, match=match):
    training.train_and_evaluate(tiny_config(tiny_data, **{field: value}), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "snapshots")


@pytest.mark.slow
def test_step_schedule_baseline_takes_equally_spaced_snapshots(tiny_data, tmp_path):
  config = tiny_config(tiny_data, schedule="step", num_cycles=4, eval_snapshots=False)
  result = training.train_and_evaluate(config, str(tmp_path))
  assert result["snapshot_steps"] == [16, 32, 48, 64]
  ckpt = checkpoints.RunCheckpoints(str(tmp_path), read_only=True)
  assert ckpt.snapshot_steps() == [16, 32, 48, 64]
  ckpt.close()


@pytest.mark.slow
def test_mock_tfds_cifar10_end_to_end(tmp_path):
  import tensorflow_datasets as tfds
  c = config_lib.base_config()
  c.update(model="resnet8", dataset="cifar10", num_epochs=1.0, num_cycles=2, batch_size=16,
           eval_batch_size=24, log_every_steps=2, checkpoint_every_steps=100, data_dir=str(tmp_path / "tfds"))
  with tfds.testing.mock_data(num_examples=70):
    result = training.train_and_evaluate(c, str(tmp_path / "run"))
    report = evaluation.evaluate_runs([str(tmp_path / "run")], plot=False)
  # 70 examples over 4 devices: 17 per device, 4 per device per step -> 4 steps; cycles end at 2 and 4.
  assert result["snapshot_steps"] == [2, 4]
  assert report["num_test_examples"] == 70
  assert [s["step"] for s in report["snapshots"]] == [2, 4]
  assert [e["m"] for e in report["ensembles"]] == [1, 2]


def test_paper_configs_match_the_paper_budgets():
  import configs
  # (B epochs, M cycles, batch) from the paper's budget table.
  expected = {"cifar10_resnet110": (200, 5, 64), "cifar100_resnet110": (200, 5, 64),
              "cifar10_wrn32_4": (200, 5, 64), "cifar100_wrn32_4": (200, 5, 64),
              "cifar10_densenet40": (300, 6, 64), "cifar100_densenet40": (300, 6, 64),
              "cifar10_densenet100": (300, 6, 64), "cifar100_densenet100": (300, 6, 64),
              "svhn_resnet110": (40, 5, 64), "svhn_wrn32_4": (40, 5, 64), "svhn_densenet40": (40, 5, 64),
              "tinyimagenet_resnet110": (150, 6, 128), "tinyimagenet_wrn32_4": (150, 6, 128),
              "tinyimagenet_densenet40": (150, 6, 64), "imagenet_resnet50": (90, 2, 256)}
  found = set(configs.names())
  assert set(expected) | {"quickstart", "fashion_mnist", "study_fashion_mnist"} == found
  for name in sorted(found):
    c = configs.load(name).get_config()
    config_lib.validate(c, 4)
    assert c.model in models.names()
    if name in expected:
      assert (c.num_epochs, c.num_cycles, c.batch_size) == expected[name], name
      assert c.schedule == "cosine_cycles" and c.momentum == 0.9 and c.weight_decay == 1e-4


@pytest.mark.slow
def test_streamed_dataset_trains_and_evaluates_through_the_stream_path(tmp_path, monkeypatch):
  """ImageNet's path: host batches from make_stream (faked here: tests/test_data.py covers the real tf.data
  stream under tfds mock_data, which patches the file system globally and so races orbax's save threads)."""
  from snapjax import data
  rng = np.random.default_rng(0)
  images = rng.normal(size=(24, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 1000, 24).astype(np.int32)
  calls = []

  def fake_stream(spec, split, *, batch_size_per_host, data_dir, train, seed, image_size=224, **kw):
    calls.append((split, train, seed, batch_size_per_host))
    n = 24 if train else 10  # 10 test examples: the last batch of 8 is padded and masked.
    i = 0
    while train or i < n:
      idx = np.arange(i, i + batch_size_per_host) % n
      mask = (np.arange(i, i + batch_size_per_host) < n).astype(np.float32) if not train else np.ones(len(idx))
      yield {"image": images[idx], "label": labels[idx], "mask": mask.astype(np.float32)}
      i += batch_size_per_host

  monkeypatch.setattr(data, "make_stream", fake_stream)
  monkeypatch.setitem(data.DATASETS, "imagenet2012", dataclasses_replace(data.DATASETS["imagenet2012"], num_train=24))
  c = config_lib.base_config()
  c.update(model="resnet8", dataset="imagenet2012", image_size=32, num_epochs=1.0, num_cycles=1, batch_size=8,
           eval_batch_size=8, log_every_steps=1, checkpoint_every_steps=100)
  result = training.train_and_evaluate(c, str(tmp_path / "run"))
  report = evaluation.evaluate_runs([str(tmp_path / "run")], plot=False)
  assert result["snapshot_steps"] == [3]  # 24 examples / batch 8.
  assert ("train", True, 0, 8) in calls and ("validation", False, 0, 8) in calls
  assert report["num_test_examples"] == 10 and result["snapshot_scores"][0]["count"] == 10
  np.testing.assert_allclose(report["snapshots"][0]["error"], result["snapshot_scores"][0]["error"], atol=1e-9)

  # A run resumed at step 1 reseeds its stream from (seed, step): not seed + step, which is seed 1's stream.
  calls.clear()
  resumed = str(tmp_path / "resumed")
  assert training.train_and_evaluate(c, resumed, hooks=training.Hooks(stop_at=lambda step: step == 1)).preempted
  assert training.train_and_evaluate(c, resumed).step == 3
  train_seeds = [seed for split, train, seed, _ in calls if train]
  assert train_seeds == [0, data.derive_seed(0, 1)]
  assert len({data.derive_seed(a, b) for a in range(4) for b in range(4)} | {0, 1, 2, 3}) == 20


def dataclasses_replace(obj, **kw):
  import dataclasses
  return dataclasses.replace(obj, **kw)


@pytest.mark.slow
def test_eval_ensembles_the_snapshots_of_several_runs(full_run, tiny_data, tmp_path):
  # A second run with another seed: the paper's true-ensemble comparison stacks both runs' snapshots.
  other = str(tmp_path / "seed1")
  training.train_and_evaluate(tiny_config(tiny_data, seed=1, eval_snapshots=False), other)
  report = evaluation.evaluate_runs([full_run[0], other], out_dir=str(tmp_path / "eval"), plot=False)
  assert [(s["workdir"], s["step"]) for s in report["snapshots"]] == [
      (full_run[0], 32), (full_run[0], 64), (other, 32), (other, 64)]
  assert [e["m"] for e in report["ensembles"]] == [1, 2, 3, 4]
  # The last-1 ensemble is the other run's final snapshot; the last-2 is that run's own ensemble.
  alone = evaluation.evaluate_runs([other], out_dir=str(tmp_path / "eval_other"), plot=False)
  for k in ("error", "nll"):
    np.testing.assert_allclose(report["ensembles"][0][k], alone["snapshots"][-1][k], rtol=1e-6)
    np.testing.assert_allclose(report["ensembles"][1][k], alone["ensembles"][1][k], rtol=1e-6)
  assert not os.path.exists(os.path.join(other, "eval"))  # out_dir was honoured.


def test_runs_from_before_a_config_field_existed_still_resume_and_evaluate(full_run, tiny_data, tmp_path):
  import shutil
  old = str(tmp_path / "old")
  shutil.copytree(full_run[0], old)
  path = os.path.join(old, "config.json")
  saved = json.load(open(path))
  for field in ("augment", "train_split"):  # Fields added after the first release.
    del saved[field]
  json.dump(saved, open(path, "w"))
  result = training.train_and_evaluate(tiny_config(tiny_data), old)  # Not refused as a different config.
  assert result["step"] == 64
  report = evaluation.evaluate_runs([old], out_dir=str(tmp_path / "eval"), plot=False)
  assert [s["step"] for s in report["snapshots"]] == [32, 64]


def test_eval_headline_last_m_is_that_ensemble(full_run, tmp_path):
  report = evaluation.evaluate_runs([full_run[0]], last_m=1, out_dir=str(tmp_path), plot=False)
  assert report["ensemble"]["m"] == 1
  for k in ("error", "nll"):  # The last-1 ensemble is the final snapshot alone.
    np.testing.assert_allclose(report["ensemble"][k], report["snapshots"][-1][k], rtol=1e-6)
    np.testing.assert_allclose(report["ensemble"][k], report["ensembles"][0][k], rtol=1e-6)


def test_snapshot_crcs_script_matches_the_checksums_saved_with_each_snapshot(full_run, tmp_path, capsys):
  """scripts/snapshot_crcs.py (the before/after check of a change) reads back what the loop saved: its CRC32s equal
  the checksums recorded at save time from the device arrays, and --against names an array that differs."""
  from scripts import snapshot_crcs
  workdir, result = full_run
  crcs = snapshot_crcs.snapshot_crcs(workdir)
  ckpt = checkpoints.RunCheckpoints(workdir, read_only=True)
  try:
    exp = experiment.build(evaluation.load_run_config(workdir))
    saved = {s: ckpt.restore_snapshot(s, exp.abstract_variables())[1]["checksums"] for s in result["snapshot_steps"]}
  finally:
    ckpt.close()
  assert crcs == {f"{s}/member0/{k}": v for s, sums in saved.items() for k, v in sums.items()}
  before = tmp_path / "before.json"
  assert snapshot_crcs.main([workdir, "--out", str(before)]) == 0
  assert snapshot_crcs.main([workdir, "--against", str(before)]) == 0
  changed = dict(crcs, **{next(iter(sorted(crcs))): "00000000"})
  before.write_text(json.dumps(changed))
  assert snapshot_crcs.main([workdir, "--against", str(before)]) == 1
  assert "1 of " in capsys.readouterr().out
