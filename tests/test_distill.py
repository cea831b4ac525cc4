"""method="distill" (snapjax/distill.py): the student's loss and teacher against NumPy, the plain step at alpha 0,
teacher selection, resume, members, and bad teachers as one-line errors.

The teacher of every test is the session's default tiny run (2 snapshots, at steps 32 and 64).
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from snapjax import distill, evaluation, experiment, training, workdir_lock
from snapjax.errors import CheckpointError, ConfigError

import helpers
from helpers import snapshot_arrays, tiny_config

pytestmark = pytest.mark.devices(4)

STUDENT = dict(method="distill", schedule="step", num_cycles=1)  # The single model's schedule, as configs' :distill.


def _student(tiny_data, teacher, **overrides):
  return tiny_config(tiny_data, **{**STUDENT, "teacher_workdirs": teacher, **overrides})


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _captured_steps(config, workdir, steps):
  """Run `config` for `steps` updates (one per dispatch), capturing each update's input: {step: (state, x, y, metrics)}."""
  seen = {}

  def wrap(step_fn):
    def wrapped(state, x, y, *frozen):
      new, metrics = step_fn(state, x, y, *frozen)
      inputs = (state["step"], state["params"], state["batch_stats"], x, y, metrics)
      jax.debug.callback(lambda *a: seen.setdefault(int(a[0]), jax.tree.map(np.asarray, a[1:])), *inputs)
      return new, metrics
    return wrapped

  training.train_and_evaluate(config, workdir, hooks=training.Hooks(wrap_step=wrap, stop_at=lambda s: s >= steps))
  return seen


# The teacher in the step on augmented batches; its soft labels computed before training (no augmentation, "auto");
# in the step without augmentation ("step").
@pytest.mark.parametrize("augment, tau, soft_labels", [("crop_flip", 2.0, "auto"), ("none", 1.0, "auto"),
                                                       ("none", 3.0, "step")])
def test_alpha_1_loss_is_the_numpy_kl_to_the_teacher_ensemble_on_the_augmented_batch(tiny_run, tiny_data, tmp_path,
                                                                                     augment, tau, soft_labels):
  teacher_wd, _ = tiny_run()
  config = _student(tiny_data, teacher_wd, distill_alpha=1.0, distill_tau=tau, augment=augment, steps_per_dispatch=1,
                    distill_soft_labels=soft_labels)
  seen = _captured_steps(config, str(tmp_path / "student"), steps=2)
  assert sorted(seen) == [0, 1]
  record = json.load(open(os.path.join(tmp_path, "student", distill.TEACHER_FILE)))
  precomputed = augment == "none" and soft_labels == "auto"
  assert record["soft_labels"] == ("precomputed" if precomputed else "in the step")
  # The reference teacher: each snapshot's eval-mode logits by its own jitted call, averaged and tempered in NumPy.
  exp = experiment.build(evaluation.load_run_config(teacher_wd))
  snaps = [m.variables for m in evaluation.restore_members([teacher_wd], exp)]
  assert len(snaps) == 2
  apply = jax.jit(lambda v, x: exp.model.apply(v, x, train=False))
  student = experiment.build(config).model
  for step, (params, batch_stats, x, y, metrics) in seen.items():
    mean = np.mean([_np_softmax(np.asarray(apply(v, x), np.float64)) for v in snaps], axis=0)
    p = _np_softmax(np.log(mean) / tau)
    assert isinstance(y, tuple) == precomputed
    if precomputed:  # The batch carries the soft labels computed before training, drawn with its labels.
      y, soft = y
      np.testing.assert_allclose(soft, p, rtol=1e-4, atol=1e-7)
    logits, _ = student.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
    log_q = np.log(_np_softmax(np.asarray(logits, np.float64) / tau))
    kl = np.mean(np.sum(p * (np.log(p) - log_q), -1))
    ce = np.mean(-np.log(_np_softmax(np.asarray(logits, np.float64))[np.arange(len(y)), y]))
    np.testing.assert_allclose(metrics["kl"], kl, rtol=2e-5)
    np.testing.assert_allclose(metrics["loss"], tau ** 2 * kl, rtol=2e-5)
    np.testing.assert_allclose(metrics["ce"], ce, rtol=2e-5)
    assert kl > 1e-4  # The student is not the teacher: the check has something to measure.


def test_distill_loss_mixes_ce_and_tempered_kl_as_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, 6)
  probs = _np_softmax(rng.normal(size=(6, 5)) * 2)
  for alpha, tau in ((0.0, 4.0), (0.3, 1.0), (0.9, 4.0)):
    targets = _np_softmax(np.log(probs) / tau)
    got, terms = distill.distill_loss(logits, labels, np.asarray(distill.tempered(probs, tau)), alpha, tau)
    log_q = np.log(_np_softmax(logits.astype(np.float64) / tau))
    kl = np.mean(np.sum(targets * (np.log(targets) - log_q), -1))
    ce = np.mean(-np.log(_np_softmax(logits.astype(np.float64))[np.arange(6), labels]))
    np.testing.assert_allclose(terms["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(got, (1 - alpha) * ce + alpha * tau ** 2 * kl, rtol=1e-5)
  np.testing.assert_allclose(distill.tempered(probs, 1.0), probs, rtol=1e-5)


@pytest.mark.slow
def test_alpha_0_trains_the_plain_single_model_bitwise(tiny_run, tiny_data, tmp_path):
  teacher_wd, _ = tiny_run()
  single_wd, _ = tiny_run(schedule="step", num_cycles=1)
  workdir = str(tmp_path / "student")
  training.train_and_evaluate(_student(tiny_data, teacher_wd, distill_alpha=0.0), workdir)
  got, want = snapshot_arrays(workdir), snapshot_arrays(single_wd)
  assert sorted(got) == sorted(want) == [64]
  jax.tree.map(np.testing.assert_array_equal, got, want)
  meta = json.load(open(os.path.join(workdir, "snapshots", "64", "meta", "metadata")))
  assert meta["method"] == "distill" and meta["teacher"]["size"] == 2 and meta["teacher"]["alpha"] == 0.0


def test_teacher_takes_the_last_m_snapshots_of_each_run(tiny_run, tiny_data):
  teacher_wd, _ = tiny_run()
  single_wd, _ = tiny_run(schedule="step", num_cycles=1)
  exp = experiment.build(tiny_config(tiny_data))
  for last_m, want in ((0, [(teacher_wd, 32), (teacher_wd, 64), (single_wd, 64)]),
                       (1, [(teacher_wd, 64), (single_wd, 64)])):
    t = distill.load_teacher(_student(tiny_data, f"{teacher_wd}, {single_wd}", teacher_last_m=last_m), exp)
    assert [(s["workdir"], s["step"]) for s in t.sources] == [(os.path.abspath(w), s) for w, s in want]
    assert jax.tree.leaves(t.variables)[0].shape[0] == len(want)
    ref = snapshot_arrays(single_wd)[64]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[-1], b), t.variables, ref)
  with pytest.raises(ConfigError, match=r"teacher_last_m=2 is more than the 1 snapshots of teacher run"):
    distill.load_teacher(_student(tiny_data, f"{teacher_wd},{single_wd}", teacher_last_m=2), exp)


@pytest.mark.slow
def test_interrupted_student_resumes_bitwise_and_a_changed_teacher_is_refused(tiny_run, tiny_data, tmp_path):
  teacher_wd, _ = tiny_run()
  config = _student(tiny_data, teacher_wd, augment="crop_flip", checkpoint_every_steps=10)
  whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
  training.train_and_evaluate(config, whole)
  first = training.train_and_evaluate(config, cut, hooks=training.Hooks(stop_at=lambda s: s == 37))
  assert first.preempted and first.step == 40  # The dispatch that runs step 37 ends at the save at step 40.
  assert not training.train_and_evaluate(config, cut).preempted
  jax.tree.map(np.testing.assert_array_equal, snapshot_arrays(cut), snapshot_arrays(whole))
  record = json.load(open(os.path.join(cut, distill.TEACHER_FILE)))
  assert [s["step"] for s in record["snapshots"]] == [32, 64] and record["tau"] == 4.0
  # The teacher retrained in place: its snapshots' checksums differ from those the student started with.
  record["snapshots"][0]["checksum"] = "00000000"
  with open(os.path.join(cut, distill.TEACHER_FILE), "w") as f:
    json.dump(record, f)
  t = distill.load_teacher(config, experiment.build(config))
  with pytest.raises(CheckpointError, match="is not the one this run started with"):
    distill.check_recorded(cut, t)


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["crop_flip", "none"])  # The teacher in the step; soft labels drawn with labels.
def test_k2_distilled_members_equal_the_one_member_student_of_each_seed(tiny_run, tiny_data, tmp_path, augment):
  teacher_wd, _ = tiny_run()
  over = dict(num_epochs=1.0, init_lr=1e-4, seed=3, checkpoint_every_steps=5,  # As tests/test_members.py's oracle.
              augment=augment)
  k2, one = str(tmp_path / "k2"), str(tmp_path / "one")
  training.train_and_evaluate(_student(tiny_data, teacher_wd, num_members=2, member_groups=2, **over), k2)
  training.train_and_evaluate(_student(tiny_data, teacher_wd, **over), one)
  exp = experiment.build(evaluation.load_run_config(k2))
  members = {m.member: jax.tree.map(np.asarray, m.variables) for m in evaluation.restore_members([k2], exp)}
  ref = snapshot_arrays(one)[16]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), members[0]["params"],
               ref["params"])
  other = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(members[1]["params"]),
                                                            jax.tree.leaves(ref["params"])))
  assert other > 1e-2  # Member 1 is seed 4's student, another network.


def _train(argv):
  return helpers.run_python(argv, env=helpers.subprocess_env(4), timeout=300)


@pytest.mark.parametrize("case, needles", [
    ("missing", ["teacher_workdirs:", "is not a directory"]),
    ("not_a_run", ["teacher_workdirs:", "is not a snapjax run"]),
    ("no_snapshots", ["teacher_workdirs:", "has no snapshots"]),
    ("other_dataset", ["teacher_workdirs:", "dataset='cifar10' (10 classes)", "allowed: runs of dataset"]),
    ("twice", ["teacher_workdirs names", "twice"]),
    ("still_training", ["teacher_workdirs:", "is still training"]),
    ("no_teacher", ["method='distill' needs its teacher"]),
    ("alpha", ["distill_alpha must be a number in [0, 1]"]),
    ("tau", ["distill_tau must be a finite number > 0"]),
    ("soft_labels", ["distill_soft_labels='once' is not known; allowed: auto, step"]),
    ("teacher_for_snapshot", ["teacher_workdirs=", "only read by method='distill'"]),
])
def test_bad_teacher_is_one_line_exit_2_and_nothing_written(case, needles, tiny_run, tiny_data, tmp_path):
  teacher_wd, _ = tiny_run()
  lock, overrides = None, {**STUDENT, "teacher_workdirs": teacher_wd}
  if case == "missing":
    overrides["teacher_workdirs"] = str(tmp_path / "nowhere")
  elif case == "not_a_run":
    os.makedirs(tmp_path / "empty")
    overrides["teacher_workdirs"] = str(tmp_path / "empty")
  elif case == "no_snapshots":
    os.makedirs(tmp_path / "no_snaps")
    shutil.copy(os.path.join(teacher_wd, "config.json"), tmp_path / "no_snaps" / "config.json")
    overrides["teacher_workdirs"] = str(tmp_path / "no_snaps")
  elif case == "other_dataset":  # A copy of the teacher whose config says it was trained on CIFAR-10.
    other = str(tmp_path / "cifar")
    shutil.copytree(teacher_wd, other)
    cfg = json.load(open(os.path.join(other, "config.json")))
    json.dump({**cfg, "dataset": "cifar10"}, open(os.path.join(other, "config.json"), "w"))
    overrides["teacher_workdirs"] = f"{teacher_wd},{other}"
  elif case == "twice":
    overrides["teacher_workdirs"] = f"{teacher_wd},{teacher_wd}/"
  elif case == "still_training":  # A copy of the teacher whose lock this live test process holds.
    busy = str(tmp_path / "training")
    shutil.copytree(teacher_wd, busy)
    lock = workdir_lock.acquire(busy)
    overrides["teacher_workdirs"] = busy
  else:
    overrides.update({"no_teacher": {"teacher_workdirs": ""}, "alpha": {"distill_alpha": 1.5},
                      "tau": {"distill_tau": 0.0}, "soft_labels": {"distill_soft_labels": "once"},
                      "teacher_for_snapshot": {"method": "snapshot", "schedule": "cosine_cycles", "num_cycles": 2},
                      }[case])
  workdir = tmp_path / "student"
  try:
    proc = _train(helpers.train_argv("train.py", tiny_data, str(workdir), overrides))
  finally:
    if lock is not None:
      lock.release()
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines[-1].startswith("error: ") and all(n in lines[-1] for n in needles), lines[-1]
  assert not workdir.exists()


@pytest.mark.slow
def test_student_trains_evaluates_and_exports_through_the_scripts(tiny_run, tiny_data, tmp_path):
  teacher_wd, _ = tiny_run()
  workdir = str(tmp_path / "student")
  proc = _train(helpers.train_argv("train.py", tiny_data, workdir, {**STUDENT, "teacher_workdirs": teacher_wd,
                                                                    "teacher_last_m": 1}))
  assert proc.returncode == 0, proc.stderr[-3000:]
  exported = str(tmp_path / "student.jax")
  proc = _train(["eval.py", "--workdir", workdir, "--export", exported])
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.load(open(os.path.join(workdir, "eval", "report.json")))
  assert [s["step"] for s in report["snapshots"]] == [64] and report["ensemble"]["m"] == 1
  assert report["ensemble"]["error"] < 0.5, report["ensemble"]
  assert os.path.getsize(exported) > 0
  record = json.load(open(os.path.join(workdir, distill.TEACHER_FILE)))
  assert [s["step"] for s in record["snapshots"]] == [64]


@pytest.mark.slow
def test_two_processes_distil_like_one_process_with_four_devices(tiny_run, tiny_data, tmp_path):
  """2 processes x 2 devices over gloo, each restoring the teacher, against 1 process x 4 devices (the lr and
  the short budget of tests/test_multihost.py, where the two layouts differ only by the order of their sums)."""
  teacher_wd, _ = tiny_run()
  over = {**STUDENT, "teacher_workdirs": teacher_wd, "num_epochs": 0.5, "init_lr": 1e-4, "steps_per_dispatch": 2,
          "augment": "crop_flip"}
  reference = str(tmp_path / "reference")
  training.train_and_evaluate(tiny_config(tiny_data, **over), reference)
  workdir, port = str(tmp_path / "run"), helpers.free_port()
  argvs = [helpers.train_argv(helpers.WORKER, tiny_data, workdir, over, "--coordinator_address", f"127.0.0.1:{port}",
                              "--num_processes", "2", "--process_id", str(i), "--cpu_collectives", "gloo")
           for i in range(2)]
  helpers.launch(argvs, helpers.subprocess_env(2), str(tmp_path), 240)
  got, want = snapshot_arrays(workdir), snapshot_arrays(reference)
  assert sorted(got) == sorted(want) == [8]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), got, want)
  record = json.load(open(os.path.join(workdir, distill.TEACHER_FILE)))  # Written once, by process 0.
  assert [s["step"] for s in record["snapshots"]] == [32, 64]
  assert not [f for f in os.listdir(workdir) if f.startswith(distill.TEACHER_FILE + ".")]
