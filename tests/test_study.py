"""scripts/study.py and snapjax.study (issue 9): the pipeline on tiny data, resuming and skipping, the statistics,
the wording."""
import json
import os

import numpy as np
import pytest

from configs import study_fashion_mnist
from scripts import study
from snapjax.study import page as page_lib, plan, runner, stats as stats_lib

SECTIONS = ("## Agreement with the paper", "## Results", "## Paired differences",
            "## Ensemble size and diversity of one Snapshot Ensemble run", "## Did each cycle converge?", "## Budget",
            "## Wall time and command")


def test_the_config_has_every_arm_on_one_budget():
  from snapjax import config as config_lib, train_step
  configs = {arm: study_fashion_mnist.get_config(arm) for arm in study_fashion_mnist.ARMS}
  configs["distill"].teacher_workdirs = "runs/study/snapshot/s0"  # The study names the same seed's snapshot run.
  budget = ("model", "dataset", "train_split", "augment", "num_epochs", "batch_size", "momentum", "weight_decay")
  for arm, c in configs.items():
    config_lib.validate(c, 4)
    assert {k: c[k] for k in budget} == {k: configs["snapshot"][k] for k in budget}, arm
  assert (configs["snapshot"].train_split, configs["snapshot"].num_epochs, configs["snapshot"].num_cycles,
          configs["snapshot"].batch_size, configs["snapshot"].init_lr) == ("train[:20000]", 30.0, 5, 128, 0.2)
  so = configs["snapshot_smoothout"]
  assert (so.smoothout_a, so.smoothout_noise, so.smoothout_chunks) == (0.01, "filter", 1)
  differs = {k for k in so.keys() if so[k] != configs["snapshot"][k]}
  assert differs == {"smoothout_a", "smoothout_noise"}  # K = 1 and "constant" are the defaults.
  assert (configs["single"].schedule, configs["single"].num_cycles, configs["nocycle"].num_cycles,
          configs["snapshot_lr0.1"].init_lr, configs["single_cycle"].method) == ("step", 1, 6, 0.1, "single_cycle")
  # The methods that followed: the library's defaults (snapjax.methods), not tuned for the study.
  got = {arm: (configs[arm].method, configs[arm].schedule, configs[arm].init_lr) for arm in ("fge", "swa", "swag",
                                                                                              "distill")}
  assert got == {"fge": ("fge", "fge", 0.1), "swa": ("swa", "swa", 0.1), "swag": ("swag", "swa", 0.1),
                 "distill": ("distill", "step", 0.1)}
  assert configs["distill"].model == "resnet8" and configs["swag"].swag_rank == 20
  # FGE: pretraining for 80% of the 4,680 updates, then 2-epoch (312-update) cycles, a snapshot at each midpoint.
  steps_per_epoch = 20000 // 128
  pre = int(0.8 * 30 * steps_per_epoch)
  fge = train_step.make_plan(configs["fge"], 20000).snapshot_steps
  assert list(fge) == [pre + steps_per_epoch + 2 * steps_per_epoch * k for k in range(3)] == [3900, 4212, 4524]
  assert study_fashion_mnist.DISTILL_TEACHER == "snapshot"


def _fake(errors: dict[str, list[float]], true_ensemble: float | None = None) -> dict:
  """A results dict of write_results with the given per-seed test errors (NLL and ECE derived from them)."""
  arms = {}
  for arm, errs in errors.items():
    arms[arm] = {"label": plan.LABELS[arm], "cost": "1x",
                 "runs": {str(s): {"error": e, "nll": 3 * e, "ece": e / 2, "last_error": e + 0.01}
                          for s, e in enumerate(errs)}}
  if true_ensemble is not None:
    arms[plan.TRUE_ENSEMBLE_ARM] = {"label": plan.LABELS[plan.TRUE_ENSEMBLE_ARM], "cost": "3x", "pooled": True,
                                     "pooled_seeds": [0, 1, 2], "runs": {"pooled": {"error": true_ensemble,
                                                                                    "nll": 0.2, "ece": 0.01}}}
  budget = {"arms": {}, "model": "resnet8", "dataset": "fashion_mnist", "train_split": "train[:20000]",
            "num_train": 20000, "augment": "none", "num_epochs": 30.0, "total_steps": 4680, "batch_size": 128,
            "momentum": 0.9, "weight_decay": 1e-4}
  return {"title": "fake", "arms": arms, "seeds": [0, 1, 2], "command": "python scripts/study.py", "budget": budget,
          "num_test_examples": 10000, "figure_run": None}


def _by_pair(summary, metric="error"):
  """{(a, b): comparison} of the comparisons whose verdict is on `metric`."""
  return {(c["a"], c["b"]): c for c in summary["comparisons"] if c["metric"] == metric}


def test_mean_std_and_paired_differences_match_numpy(tmp_path):
  se, single, nocycle = [0.101, 0.097, 0.105], [0.112, 0.108, 0.104], [0.099, 0.110, 0.103]
  summary = page_lib.write_results(_fake({"snapshot": se, "single": single, "nocycle": nocycle}, 0.09), str(tmp_path))
  for arm, errs in (("snapshot", se), ("single", single)):
    stats = summary["arms"][arm]["stats"]
    np.testing.assert_allclose([stats["error"]["mean"], stats["error"]["std"]], [np.mean(errs), np.std(errs, ddof=1)])
    np.testing.assert_allclose([stats["nll"]["mean"], stats["nll"]["std"]],
                               [np.mean(3 * np.array(errs)), np.std(3 * np.array(errs), ddof=1)])
  comp = _by_pair(summary)
  diff = np.array(se) - np.array(single)
  got = comp[("snapshot", "single")]["error"]
  np.testing.assert_allclose([got["per_seed"][str(s)] for s in range(3)], diff)
  np.testing.assert_allclose([got["mean"], got["std"]], [diff.mean(), diff.std(ddof=1)])
  te = comp[(plan.TRUE_ENSEMBLE_ARM, "snapshot")]["error"]  # The pooled true ensemble against every seed.
  np.testing.assert_allclose([te["per_seed"][str(s)] for s in range(3)], 0.09 - np.array(se))
  assert stats_lib.mean_std([0.5]) == {"mean": 0.5, "std": None, "n": 1}
  saved = json.loads((tmp_path / "fashion_mnist.json").read_text())
  assert saved["comparisons"][0]["error"]["per_seed"] == got["per_seed"]
  page = (tmp_path / "fashion_mnist.md").read_text()
  assert f"{100 * diff.mean():+.2f} ± {100 * diff.std(ddof=1):.2f}" in page
  assert f"{100 * np.mean(se):.2f} ± {100 * np.std(se, ddof=1):.2f}" in page


def _sentence(page: str, a: str, b: str) -> str:
  return next(l for l in page.splitlines() if l.startswith(f"- {plan.LABELS[a]} vs {plan.LABELS[b]} ("))


@pytest.mark.parametrize("sign, word, verdict", [(-1, "**agrees with the paper**", "agrees"),
                                                 (+1, "**disagrees with the paper**", "disagrees")])
def test_the_agreement_wording_follows_the_numbers(tmp_path, sign, word, verdict):
  single = [0.110, 0.108, 0.112]
  se = [e + sign * d for e, d in zip(single, (0.004, 0.001, 0.006))]
  summary = page_lib.write_results(_fake({"snapshot": se, "single": single}, 0.095), str(tmp_path))
  page = (tmp_path / "fashion_mnist.md").read_text()
  line = _sentence(page, "snapshot", "single")
  assert word in line and f"lower test error in {3 if sign < 0 else 0} of 3 seeds" in line
  assert _by_pair(summary)[("snapshot", "single")]["verdict"] == verdict
  assert "closes" in _sentence(page, plan.TRUE_ENSEMBLE_ARM, "snapshot")
  # Mixed signs across seeds: neither agreement nor disagreement.
  mixed = page_lib.write_results(_fake({"snapshot": [0.10, 0.12, 0.10], "single": [0.11, 0.11, 0.11]}), str(tmp_path))
  assert "**inconclusive: the seeds disagree**" in _sentence((tmp_path / "fashion_mnist.md").read_text(),
                                                             "snapshot", "single")
  assert mixed["comparisons"][0]["verdict"] == "inconclusive"
  # A tie (float noise in a difference of equal errors) agrees with neither direction.
  tied = stats_lib.summarize(_fake({"snapshot": [0.1, 0.099, 0.1], "single": [0.11, 0.099, 0.11]}))
  assert tied["comparisons"][0]["verdict"] == "inconclusive" and "(1 tied)" in tied["comparisons"][0]["text"]
  assert "not run" in _sentence((tmp_path / "fashion_mnist.md").read_text(), "snapshot", "nocycle")


def test_the_approach_fraction_follows_the_numbers():
  results = stats_lib.summarize(_fake({"snapshot": [0.10, 0.10], "single": [0.12, 0.11]}, 0.09))
  text = next(c for c in results["comparisons"] if c["a"] == plan.TRUE_ENSEMBLE_ARM)["text"]
  assert "seed 0: 67%" in text and "seed 1: 50%" in text  # (0.12 - 0.10) / (0.12 - 0.09), (0.11 - 0.10) / 0.02.
  results = stats_lib.summarize(_fake({"snapshot": [0.10, 0.10], "single": [0.12, 0.085]}, 0.09))
  text = next(c for c in results["comparisons"] if c["a"] == plan.TRUE_ENSEMBLE_ARM)["text"]
  assert "seed 0: 67%" in text and "no worse than the true ensemble: seed 1;" in text


def test_the_convergence_check_follows_the_snapshot_errors():
  results = _fake({"snapshot": [0.10, 0.11], "single": [0.12, 0.12]})
  for run in results["arms"]["snapshot"]["runs"].values():
    run["snapshot_errors"] = [0.14, 0.12, 0.11, 0.105]  # Every cycle better than the last.
  page = page_lib.render_markdown(stats_lib.summarize(results))
  assert "| 14.00 | 12.00 | 11.00 | 10.50 | 2 of 2 seeds | 1 of 2 seeds |" in page
  assert "beats its best single snapshot in 1 of 2 seeds" in page
  results["arms"]["snapshot"]["runs"]["0"]["error"] = 0.106  # Now the ensemble never beats the last snapshot.
  assert "the cycles did not converge on this budget" in page_lib.render_markdown(stats_lib.summarize(results))


def _fake_uncertainty(cnll: dict[str, list[float]], deep_curve: list[float]) -> dict:
  """_fake's results with every metric of the uncertainty sections: calibrated NLL per seed as given, the other
  metrics derived from it; the deep ensemble pooled, with its calibrated-NLL curve."""
  results = _fake({arm: [0.1 + v / 10 for v in vals] for arm, vals in cnll.items()})
  nets = {"snapshot": 5, "single": 1, "fge": 3}
  for arm, vals in cnll.items():
    for seed, v in enumerate(vals):
      results["arms"][arm]["runs"][str(seed)].update(
          calibrated_nll=v, ece_ts=v / 20, brier=v / 2, temperature=1 + v, aurc=v / 10, conformal_coverage=0.9 + v / 100,
          conformal_size=1 + v, auroc_digits=0.9 - v / 10, auroc_uniform_noise=0.8 - v / 10, networks=nets[arm],
          cnll_curve=[v + 0.01 * (nets[arm] - m) for m in range(1, nets[arm] + 1)], shift_severities=[1, 2, 3],
          shift_error=[0.1 + v + 0.1 * k for k in range(3)], shift_cnll=[v + k for k in range(3)],
          shift_clean_error=0.05 + v, shift_examples=1000)
  results["arms"]["deep_ensemble"] = {
      "label": plan.LABELS["deep_ensemble"], "cost": "5x", "pooled": True, "pooled_seeds": [0, 1, 2, 3, 4],
      "runs": {"pooled": {"error": 0.08, "nll": 0.2, "ece": 0.01, "calibrated_nll": deep_curve[-1],
                          "dee_curve": deep_curve, "networks": 5}}}
  results["serving"] = {"workdir": "runs/study/snapshot/s0", "large_batch": 1000, "repeats": 7,
                        "load_average": [0.5, 0.4, 0.3],
                        "single": {"networks": 1, "ms_per_example": 0.125, "weights_mb": 0.3},
                        "ensemble": {"networks": 5, "ms_per_example": 0.6, "weights_mb": 1.5}}
  results["deep_ensemble_size"] = 5
  return results


def test_the_uncertainty_sections_follow_the_numbers(tmp_path):
  cnll = {"snapshot": [0.25, 0.26, 0.24], "single": [0.30, 0.31, 0.29], "fge": [0.27, 0.255, 0.28]}
  curve = [0.30, 0.26, 0.245, 0.235, 0.23]
  summary = page_lib.write_results(_fake_uncertainty(cnll, curve), str(tmp_path))
  page = (tmp_path / "fashion_mnist.md").read_text()
  # The deep-ensemble equivalent of each run: where its calibrated NLL meets the deep ensemble's curve (np.interp
  # on the decreasing curve, a second path to snapjax.uncertainty.deep_ensemble_equivalent).
  for arm, vals in cnll.items():
    for seed, v in enumerate(vals):
      run = summary["arms"][arm]["runs"][str(seed)]
      want = np.interp(v, curve[::-1], np.arange(len(curve), 0, -1))
      np.testing.assert_allclose(run["dee"], want)  # np.interp holds the ends, as the library does (1 below).
      assert run["dee_bound"] == ("<1" if v > curve[0] else ""), (arm, seed)
  assert summary["arms"]["deep_ensemble"]["runs"]["pooled"]["dee"] == 5.0
  dee = [np.interp(v, curve[::-1], np.arange(5, 0, -1)) for v in cnll["snapshot"]]
  row = next(l for l in page.splitlines() if l.startswith(f"| {plan.LABELS['snapshot']} | 0.2500 ± 0.0100 |"))
  assert f"| {np.mean(dee):.2f} ± {np.std(dee, ddof=1):.2f} |" in row  # The DEE column, mean ± std over seeds.
  ece_ts = np.array(cnll["snapshot"]) / 20
  assert f"| {100 * ece_ts.mean():.2f} ± {100 * ece_ts.std(ddof=1):.2f} |" in row
  # Ashukha et al.'s claims are on the calibrated NLL: per-seed differences, verdict and the DEE sentence.
  comp = _by_pair(summary, "calibrated_nll")
  diff = np.array(cnll["snapshot"]) - np.array(cnll["single"])
  np.testing.assert_allclose(list(comp[("snapshot", "single")]["calibrated_nll"]["per_seed"].values()), diff)
  assert comp[("snapshot", "single")]["verdict"] == "agrees"
  assert comp[("snapshot", "fge")]["verdict"] == "inconclusive"  # 0.25 - 0.27 < 0, 0.26 - 0.255 > 0.
  line = next(l for l in page.splitlines() if l.startswith(f"- {plan.LABELS['snapshot']} vs {plan.LABELS['single']}")
              and "Ashukha" in l)
  assert "**agrees with Ashukha et al.**" in line and "lower calibrated NLL in 3 of 3 seeds" in line
  assert f"a - b = {diff.mean():+.4f} ± {diff.std(ddof=1):.4f}" in line and "Deep-ensemble equivalents:" in line
  # The deep ensemble is pooled: subtracted from every seed of the other arm.
  de = _by_pair(summary)[("deep_ensemble", "snapshot")]["error"]["per_seed"]
  np.testing.assert_allclose([de[str(s)] for s in range(3)], 0.08 - (0.1 + np.array(cnll["snapshot"]) / 10))
  # OOD and shift tables: mean ± std per set and per severity.
  auroc = 0.9 - np.array(cnll["fge"]) / 10
  fge_rows = [l for l in page.splitlines() if l.startswith(f"| {plan.LABELS['fge']} |")]
  assert any(f"| {100 * auroc.mean():.2f} ± {100 * auroc.std(ddof=1):.2f} |" in l for l in fge_rows)
  sev3 = 0.1 + np.array(cnll["fge"]) + 0.2
  assert any(f"| {100 * sev3.mean():.2f} ± {100 * sev3.std(ddof=1):.2f} |" in l for l in fge_rows)
  # Serving: derived as the networks served x the one network's measurement.
  assert any(l.endswith(f"| 3 | {3 * 0.125:.4f} | {3 * 0.3:.3f} |") for l in fge_rows)
  assert "(4.80x one network)" in page  # The measured 5-network ensemble: 0.6 / 0.125.
  for key in ("cnll_vs_size", "shift"):
    png = tmp_path / summary["figures"][key]
    assert png.read_bytes()[:4] == b"\x89PNG" and f"]({png.name})" in page
  # With no deep ensemble there is no reference: no DEE anywhere, and the page says so.
  results = _fake_uncertainty(cnll, curve)
  del results["arms"]["deep_ensemble"]
  summary = stats_lib.summarize(results)
  assert all(r["dee"] is None for e in summary["arms"].values() for r in e["runs"].values())
  assert "The deep ensemble has not run" in page_lib.render_markdown(summary)


def test_dry_run_prints_the_real_plan(capsys):
  if not os.path.exists("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"):
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  assert study.main(["--dry_run", "--out", "/nonexistent/study"]) == 0
  out = capsys.readouterr().out
  # 10 arms x 3 seeds and the deep ensemble's Single runs of seeds 3 and 4; an eval per arm and seed, the true and
  # the deep ensemble's.
  assert "32 training runs and 32 evaluations" in out and "then the serving measurement" in out
  lines = out.splitlines()
  for arm in study_fashion_mnist.ARMS:
    for seed in (0, 1, 2):
      assert (f"train.py --config configs/study_fashion_mnist.py:{arm} --workdir /nonexistent/study/{arm}/s{seed} "
              f"--config.seed={seed}") in out
  for seed in (0, 1, 2):  # The student of seed s: taught by the snapshot run of seed s, planned after it.
    student = next(i for i, l in enumerate(lines) if f"study_fashion_mnist.py:distill --workdir /nonexistent/study/"
                   f"distill/s{seed} --config.seed={seed} --config.teacher_workdirs=/nonexistent/study/snapshot/"
                   f"s{seed}" in l)
    teacher = next(i for i, l in enumerate(lines) if f"--workdir /nonexistent/study/snapshot/s{seed} --config" in l)
    assert teacher < student and lines[student].split()[0] == "waiting"
  for seed in (3, 4):
    assert (f"train.py --config configs/study_fashion_mnist.py:single --workdir /nonexistent/study/single/s{seed} "
            f"--config.seed={seed}") in out
    assert f"eval.py --workdir /nonexistent/study/single/s{seed} --analyses" not in out
  evals = [l for l in lines if "eval.py" in l]
  assert len(evals) == 32 and all(l.split("--analyses=")[1].split()[0].endswith("ood,shift") for l in evals)
  assert "eval.py --workdir /nonexistent/study/snapshot/s0 --analyses=weight_average,ood,shift" in out
  assert ("eval.py --workdir /nonexistent/study/single/s0 --workdir /nonexistent/study/single/s1 --workdir "
          "/nonexistent/study/single/s2 --out_dir /nonexistent/study/true_ensemble/eval") in out
  assert ("eval.py " + " ".join(f"--workdir /nonexistent/study/single/s{s}" for s in range(5)) +
          " --out_dir /nonexistent/study/deep_ensemble/eval --analyses=ood,shift") in out
  assert not any("--swag_samples" in l or "--shift_examples" in l for l in evals)  # eval.py's defaults.
  assert lines[-3].split()[1:] == ["python", "-m", "snapjax.study.serving", "--workdir", "/nonexistent/study/snapshot/s0",
                                   "--out", "/nonexistent/study/serving/serving.json"]
  assert "4680 updates x batch 128 = 599,040 images" in out and "snapshots at 3900, 4212, 4524]" in out
  assert "Estimated wall time on this machine of the 65 steps not done yet: " in out and "at --jobs 2" in out
  assert not os.path.exists("/nonexistent")


def test_the_wall_time_estimate_scales_the_reference():
  from types import SimpleNamespace as NS

  def train(arm, updates, snapshots, method="snapshot", needs=(), augment="none"):
    return {"kind": "train", "arm": arm, "needs": list(needs),
            "config": NS(method=method, swa_bn_batches=3, batch_size=10, augment=augment, dataset="fashion_mnist",
                         distill_soft_labels="auto"),
            "plan": NS(total_steps=updates, steps_per_epoch=10, snapshot_steps=list(range(snapshots)))}

  # The reference: two runs of 100 updates (10 s and 30 s: median 0.2 s/update), two evaluations of 1 and 5
  # networks on 50 test images (no OOD, no shift): 2 s and 6 s, so a = 1 s, b = 1 s / 50 network-images.
  ref = {"wall_time": {"seconds": 24.0, "jobs": 2, "train_runs": 2, "evals": 2,
                       "steps": {"train/single/s0": 10.0, "train/snapshot/s0": 30.0, "eval/single/s0": 2.0,
                                 "eval/snapshot/s0": 6.0}},
         "budget": {"total_steps": 100}, "num_test_examples": 50,
         "arms": {"single": {"runs": {"0": {"num_snapshots": 1}}}, "snapshot": {"runs": {"0": {"num_snapshots": 5}}}}}
  se = train("snapshot", 200, 4)
  steps = [se, train("distill", 100, 1, "distill", [se]), train("distill", 100, 1, "distill", [se], "crop_flip"),
           train("swag", 100, 1, "swag"),
           {"kind": "eval", "needs": [se], "options": {"shift_examples": 2}},
           {"kind": "eval", "needs": [train("swag", 100, 1, "swag")], "options": {"shift_examples": 2, "swag_samples": 3}},
           {"kind": "serve", "needs": []}]
  est = stats_lib.estimate_wall(steps, ref, num_test=50, ood_images=8, shift_cells=4)
  per_update = np.median([10 / 100, 30 / 100])
  # The students: soft labels before training (4 snapshots x one 10-update epoch), then the teacher in the step.
  train_s = per_update * (200 + 100 * (1 + 4 / 3 * 10 / 100) + 100 * (1 + 4 / 3) + 100)
  images = 50 + 8 + 2 * 5  # Test set, OOD sets, 4 shift cells and the clean pass of 2 images.
  b, a = np.polyfit([50, 250], [2.0, 6.0], 1)
  eval_s = (a + b * 4 * images) + (a + b * (3 * images + 3 * 3 * 10))  # SWAG: 3 samples, BatchNorm batches each.
  np.testing.assert_allclose([est["train_seconds"], est["eval_seconds"], est["parallelism"]],
                             [train_s, eval_s, 48 / 24])
  np.testing.assert_allclose(est["seconds"], (train_s + eval_s) / 2)


PIPELINE_ARMS = ("snapshot", "single", plan.WEIGHT_AVERAGE_ARM, plan.TRUE_ENSEMBLE_ARM)


@pytest.fixture(scope="module")
def pipeline(tiny_data, tmp_path_factory):
  """The tiny pipeline of seeds 0 and 1, made once for this file: a first invocation preempted in the Single run of
  seed 0, then a second with --records that finishes it. (paths, calls and stdout of each invocation); `pristine` is
  a copy of the records as the second invocation left them, which later tests start from."""
  import contextlib
  import io
  import shutil
  from snapjax import evaluation, training
  tmp = tmp_path_factory.mktemp("pipeline")
  out, results, records = tmp / "study", tmp / "results", tmp / "records"
  argv = ["--tiny", tiny_data, "--out", str(out), "--results_dir", str(results), "--seeds", "0,1", "--in_process",
          "--arms", ",".join(PIPELINE_ARMS)]
  real_train, real_eval = training.train_and_evaluate, evaluation.evaluate_runs
  calls = [[], []]

  def preempting_train(config, workdir, **kw):  # The single model of seed 0 is preempted mid-way.
    calls[0].append(("train", os.path.relpath(workdir, out)))
    if os.path.relpath(workdir, out) == "single/s0":
      kw["hooks"] = training.Hooks(stop_at=lambda step: step == 12)
    return real_train(config, workdir, **kw)

  def counting_train(config, workdir, **kw):
    calls[1].append(("train", os.path.relpath(workdir, out)))
    return real_train(config, workdir, **kw)

  def counting_eval(workdirs, **kw):
    calls[1].append(("eval", os.path.relpath(kw["out_dir"], out)))
    return real_eval(workdirs, **kw)

  logs, codes = [], []
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(training, "train_and_evaluate", preempting_train)
    with contextlib.redirect_stdout(io.StringIO()) as log:
      codes.append(study.main(argv))  # Stopped: the state is saved.
    logs.append(log.getvalue())
    results_after_stop = results.exists()
    mp.setattr(training, "train_and_evaluate", counting_train)
    mp.setattr(evaluation, "evaluate_runs", counting_eval)
    # From here on each finished step is copied to the records (snapjax.study.records).
    with contextlib.redirect_stdout(io.StringIO()) as log:
      codes.append(study.main([*argv, "--records", str(records)]))
    logs.append(log.getvalue())
  shutil.copytree(records, tmp / "pristine")
  return {"out": out, "results": results, "records": records, "pristine": tmp / "pristine", "argv": argv,
          "calls": calls, "logs": logs, "codes": codes, "results_after_stop": results_after_stop}


@pytest.mark.slow
def test_the_whole_pipeline_on_tiny_data_resumes_and_skips(pipeline, tmp_path, monkeypatch, capsys):
  from snapjax import evaluation, training
  out, results, records, argv = (pipeline[k] for k in ("out", "results", "records", "argv"))
  assert pipeline["codes"] == [3, 0]
  assert pipeline["calls"][0] == [("train", "snapshot/s0"), ("train", "single/s0")]
  assert "stopped during train/single/s0" in pipeline["logs"][0]
  assert not pipeline["results_after_stop"]
  # The preempted run resumed (not restarted: it kept its state and its log says so); the finished one is skipped.
  assert pipeline["calls"][1] == [("train", "single/s0"), ("eval", "single/s0/eval"),
                                  ("train", "snapshot/s1"), ("eval", "snapshot/s1/eval"), ("train", "single/s1"),
                                  ("eval", "single/s1/eval"), ("eval", "true_ensemble/eval")]
  second_log = pipeline["logs"][1]
  assert "run train/single/s0 (resuming)" in second_log and "skip train/snapshot/s0: done" in second_log

  page = (results / "fashion_mnist.md").read_text()
  for section in SECTIONS:
    assert section in page, section
  data = json.loads((results / "fashion_mnist.json").read_text())
  assert set(data["arms"]) == set(PIPELINE_ARMS)
  for arm in ("snapshot", "single", plan.WEIGHT_AVERAGE_ARM):
    assert set(data["arms"][arm]["runs"]) == {"0", "1"}, arm
    assert data["arms"][arm]["stats"]["error"]["n"] == 2
  report = json.loads((out / "snapshot" / "s1" / "eval" / "report.json").read_text())
  assert data["arms"]["snapshot"]["runs"]["1"]["error"] == report["ensemble"]["error"]
  assert data["arms"][plan.WEIGHT_AVERAGE_ARM]["runs"]["1"]["error"] == report["weight_average"][-1]["error"]
  te = json.loads((out / "true_ensemble" / "eval" / "report.json").read_text())
  assert len(te["snapshots"]) == 2 and data["arms"][plan.TRUE_ENSEMBLE_ARM]["runs"]["pooled"]["error"] == (
      te["ensemble"]["error"])
  comp = _by_pair(data)
  single = data["arms"]["single"]["runs"]
  assert comp[("snapshot", "single")]["error"]["per_seed"] == {
      s: data["arms"]["snapshot"]["runs"][s]["error"] - single[s]["error"] for s in ("0", "1")}
  for png in ("fashion_mnist_error_vs_m.png", "fashion_mnist_diversity.png"):
    assert (results / png).stat().st_size > 0 and f"]({png})" in page
  assert data["budget"]["total_steps"] == 32 and data["budget"]["arms"]["snapshot"]["snapshot_steps"] == [16, 32]
  assert data["wall_time"]["train_runs"] == 4 and data["wall_time"]["invocations"] == 2
  assert "Tiny pipeline test" in page and "--tiny" in data["command"]

  # Everything is done: a third invocation trains and evaluates nothing, and writes the page again.
  def refuse(*args, **kw):
    raise AssertionError("a finished run was run again")

  monkeypatch.setattr(training, "train_and_evaluate", refuse)
  monkeypatch.setattr(evaluation, "evaluate_runs", refuse)
  mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "study_state" not in p.name}
  (results / "fashion_mnist.md").unlink()
  assert study.main(argv) == 0
  assert (results / "fashion_mnist.md").exists()
  assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "study_state" not in p.name}

  # The records: every run without its train state; the snapshots' arrays kept for the single runs (the pooled
  # ensembles read them) and snapshot/s0 (the serving measurement reads it) only, and the reports.
  # snapshot/s0 finished before --records was given: copied at the start.
  for run in ("snapshot/s0", "snapshot/s1", "single/s0", "single/s1"):
    wd = records / run
    assert not (wd / "state").exists() and (out / run / "state").is_dir(), run
    arrays = sorted(wd.glob("snapshots/*/variables"))
    kept = run.startswith("single") or run == "snapshot/s0"
    assert len(arrays) == (len(list((out / run).glob("snapshots/*"))) if kept else 0), run
    assert sorted(p.name for p in wd.glob("snapshots/*")) == sorted(p.name for p in (out / run).glob("snapshots/*"))
  for rel in ("snapshot/s1/eval/report.json", "true_ensemble/eval/report.json", "serving/serving.json"):
    assert (records / rel).read_bytes() == (out / rel).read_bytes(), rel
  # A new machine: --out is gone; the records are restored into it, every step counts as done and nothing runs; the
  # page is the same (its wall time is the recorded steps' and invocations').
  import shutil
  shutil.rmtree(out)
  (results / "fashion_mnist.json").rename(tmp_path / "before.json")
  assert study.main([*argv, "--records", str(records)]) == 0
  before, after = json.loads((tmp_path / "before.json").read_text()), json.loads((results / "fashion_mnist.json"
                                                                                   ).read_text())
  assert after["arms"] == before["arms"] and after["comparisons"] == before["comparisons"]
  assert after["wall_time"]["steps"] == before["wall_time"]["steps"]
  # The two recorded invocations (the third ran nothing, so the records did not change) and this one.
  assert after["wall_time"]["invocations"] == before["wall_time"]["invocations"] == 3
  # A step that would read a recorded run's missing arrays fails in one line, naming it, and runs nothing.
  shutil.rmtree(out / "snapshot" / "s1" / "eval")
  shutil.rmtree(records / "snapshot" / "s1" / "eval")
  assert study.main([*argv, "--records", str(records)]) == 1
  log = capsys.readouterr().out
  assert (f"FAILED eval/snapshot/s1: eval/snapshot/s1 reads {out / 'snapshot' / 's1'}, finished in an earlier "
          f"sitting and recorded without its snapshots' arrays") in log


def test_records_keep_the_arrays_of_single_served_and_teacher_runs_only(tmp_path):
  """Which recorded runs keep their snapshots' arrays: the Single runs (pooled later), the served run and every
  distilled student's teacher (its student may train in a later sitting); the others keep only metadata."""
  from snapjax.study import records as records_lib
  out, rec = tmp_path / "study", tmp_path / "records"
  steps = plan.make_plan(str(out), ["snapshot", "single", "fge", "distill"], [0, 1], None)
  trains = {s["key"]: s for s in steps if s["kind"] == "train"}
  assert {k for k, s in trains.items() if s.get("distill_teacher")} == {"train/snapshot/s0", "train/snapshot/s1"}
  assert [k for k, s in trains.items() if s.get("serve_source")] == ["train/snapshot/s0"]
  for step in trains.values():  # A fake finished run: one snapshot with its arrays and its metadata item.
    for item in ("variables", records_lib.META_ITEM):
      os.makedirs(os.path.join(step["workdir"], "snapshots", "8", item))
      open(os.path.join(step["workdir"], "snapshots", "8", item, "x"), "w").close()
    records_lib.save_step(step, str(out), str(rec), runner.STATE_FILE)
  kept = {k for k in trains if (rec / os.path.relpath(trains[k]["workdir"], out) / "snapshots" / "8" / "variables"
                                ).is_dir()}
  assert kept == {"train/snapshot/s0", "train/snapshot/s1", "train/single/s0", "train/single/s1"}
  for k, step in trains.items():
    meta = rec / os.path.relpath(step["workdir"], out) / "snapshots" / "8" / records_lib.META_ITEM / "x"
    assert meta.exists() and records_lib.has_arrays(str(rec / os.path.relpath(step["workdir"], out))) == (k in kept)


NEW_ARMS = ("fge", "swa", "swag", "distill")


@pytest.mark.slow
def test_the_new_arms_end_to_end_on_tiny_data(pipeline, tiny_data, tmp_path, monkeypatch):
  """FGE, SWA, SWAG, the distilled student and the deep ensemble, one seed: every new metric from the eval reports
  onto the page, the JSON and the figures; a second invocation runs nothing. The Snapshot Ensemble and Single runs
  (and their evaluations, and the serving measurement) are the first pipeline's, restored from a copy of its
  records into this --out: what another machine does with recorded steps."""
  import shutil
  from snapjax import distill, evaluation, training, uncertainty
  out, results, records = tmp_path / "study", tmp_path / "results", tmp_path / "records"
  shutil.copytree(pipeline["pristine"], records)
  argv = ["--tiny", tiny_data, "--out", str(out), "--results_dir", str(results), "--seeds", "0", "--in_process",
          "--deep_ensemble_size", "2", "--arms", ",".join(("snapshot", "single", *NEW_ARMS, "deep_ensemble")),
          "--records", str(records)]
  calls = []
  real_train = training.train_and_evaluate

  def counting_train(config, workdir, **kw):
    calls.append(os.path.relpath(workdir, out))
    return real_train(config, workdir, **kw)

  monkeypatch.setattr(training, "train_and_evaluate", counting_train)
  assert study.main(argv) == 0
  assert calls == ["fge/s0", "swa/s0", "swag/s0", "distill/s0"]
  for run in ("snapshot/s0", "single/s0", "single/s1"):  # Restored with their arrays: the student and the pooled
    assert (out / run / "snapshots").is_dir() and not (out / run / "state").exists(), run  # ensembles read them.
  teacher = json.loads((out / "distill" / "s0" / distill.TEACHER_FILE).read_text())
  assert {os.path.abspath(s["workdir"]) for s in teacher["snapshots"]} == {str(out / "snapshot" / "s0")}

  data = json.loads((results / "fashion_mnist.json").read_text())
  page = (results / "fashion_mnist.md").read_text()
  assert set(data["arms"]) == {"snapshot", "single", *NEW_ARMS, "deep_ensemble"}
  for arm in ("snapshot", "single", *NEW_ARMS):
    run, rep = data["arms"][arm]["runs"]["0"], json.loads((out / arm / "s0" / "eval" / "report.json").read_text())
    m = rep["ensemble"]["m"]
    temp = rep["temperature"]["ensembles"][m - 1]
    assert (run["calibrated_nll"], run["ece_ts"], run["brier"]) == (temp["test_cv"]["nll"], temp["test_cv"]["ece"],
                                                                   temp["before"]["brier"]), arm
    assert run["aurc"] == rep["selective"]["ensembles"][m - 1]["aurc"]
    assert run["conformal_coverage"] == rep["conformal"]["ensemble"]["thr"]["0.1"]["coverage"]
    assert {k: run[f"auroc_{k}"] for k in ("digits", "uniform_noise", "gaussian_noise")} == {
        k: rep["ood"]["sets"][k]["ensemble"]["max_prob"]["auroc"] for k in ("digits", "uniform_noise", "gaussian_noise")}
    assert run["shift_error"] == [p["error"] for p in rep["shift"]["per_severity"]["ensemble"]]
    assert run["shift_cnll"] == [p["nll_scaled"] for p in rep["shift"]["per_severity"]["ensemble"]]
    assert rep["shift"]["examples"] == plan.TINY_EVAL_OPTIONS["shift_examples"] and len(run["shift_error"]) == 5
    for metric in ("calibrated_nll", "ece_ts", "brier", "aurc", "conformal_coverage", "conformal_size",
                   "auroc_digits", "dee"):
      assert data["arms"][arm]["stats"][metric]["n"] == 1, (arm, metric)
  # The networks each arm serves: FGE's midpoint snapshots, SWAG's posterior samples, one averaged network (SWA).
  nets = {arm: data["arms"][arm]["runs"]["0"]["networks"] for arm in ("snapshot", "fge", "swa", "swag", "distill")}
  assert nets == {"snapshot": 2, "fge": 2, "swa": 1, "swag": plan.TINY_EVAL_OPTIONS["swag_samples"], "distill": 1}
  assert data["budget"]["arms"]["fge"]["snapshot_steps"] == [20, 28]  # 16 updates of pretraining, 2 cycles of 8.
  # The deep ensemble: the Single runs of seeds 0 and 1, its curve the reference of every run's DEE.
  de = json.loads((out / "deep_ensemble" / "eval" / "report.json").read_text())
  curve = [d["calibrated_nll"] for d in de["dee"]["deep_ensembles"]]
  assert data["arms"]["deep_ensemble"]["runs"]["pooled"]["dee_curve"] == curve and len(curve) == 2
  for arm in ("snapshot", *NEW_ARMS):
    run = data["arms"][arm]["runs"]["0"]
    assert (run["dee"], run["dee_bound"]) == uncertainty.deep_ensemble_equivalent(curve, run["calibrated_nll"])
  # Costs: the student's training is its teacher's and its own; the deep ensemble's its two runs'.
  state = json.loads((out / runner.STATE_FILE).read_text())["steps"]
  assert data["arms"]["distill"]["cost"] == "2x" and data["arms"]["deep_ensemble"]["cost"] == "2x"
  np.testing.assert_allclose(data["arms"]["distill"]["wall"]["train_per_seed"]["0"],
                             state["train/distill/s0"]["seconds"] + state["train/snapshot/s0"]["seconds"])
  serve = data["serving"]
  assert serve["single"]["networks"] == 1 and serve["ensemble"]["networks"] == 2
  np.testing.assert_allclose(serve["ensemble"]["weights_mb"], 2 * serve["single"]["weights_mb"])
  assert f"| {nets['swag']} | {nets['swag'] * serve['single']['ms_per_example']:.4f} |" in page
  for section in ("## Calibrated uncertainty", "## Out-of-distribution detection", "## Dataset shift",
                  "## Calibrated NLL vs ensemble size", "## Training and serving cost"):
    assert section in page, section
  for arm in ("fge", "swa", "swag", "distill", "deep_ensemble"):
    assert any(l.startswith(f"| {plan.LABELS[arm]} | {pm_cnll(data, arm)} |") for l in page.splitlines()), arm
  for key in ("cnll_vs_size", "shift"):
    png = results / data["figures"][key]
    assert png.read_bytes()[:4] == b"\x89PNG" and f"]({png.name})" in page
  assert {c["who"] for c in data["comparisons"] if c["verdict"] != "not run" and "who" in c} == {
      "the FGE paper", "the SWA paper", "Ashukha et al.", "Hinton et al."}

  def refuse(*args, **kw):
    raise AssertionError("a finished step was run again")

  monkeypatch.setattr(training, "train_and_evaluate", refuse)
  monkeypatch.setattr(evaluation, "evaluate_runs", refuse)
  from snapjax.study import serving
  monkeypatch.setattr(serving, "measure", refuse)
  assert study.main(argv) == 0  # Resumable: FGE's run (last snapshot before the end) and SWAG's eval are done.


def pm_cnll(data, arm):
  """An arm's calibrated NLL as the uncertainty table prints it (one seed: the value alone)."""
  return f"{data['arms'][arm]['stats']['calibrated_nll']['mean']:.4f}"


class _FakeChild:
  """A subprocess stand-in that finishes after `polls` polls."""

  def __init__(self, key, polls):
    self.key, self._polls, self.returncode = key, polls, None

  def poll(self):
    self._polls -= 1
    if self._polls <= 0:
      self.returncode = 0
    return self.returncode


def test_jobs_run_steps_side_by_side_after_their_dependencies(monkeypatch):
  """--jobs 2: at most 2 runs at once, a step only once every step it needs has finished (not merely written its
  outputs: here a running step's outputs look done at once), every step once."""
  seeds = [0, 1]
  steps = [{"key": f"train/{a}/s{s}", "kind": "train", "argv": ["python", "train.py", a, str(s)], "needs": []}
           for s in seeds for a in ("snapshot", "single")]
  by_key = {s["key"]: s for s in steps}
  steps += [{"key": f"eval/{a}/s{s}", "kind": "eval", "argv": ["python", "eval.py"],
             "needs": [by_key[f"train/{a}/s{s}"]]} for s in seeds for a in ("snapshot", "single")]
  steps.append({"key": "eval/true_ensemble", "kind": "eval", "argv": ["python", "eval.py"],
                "needs": [by_key[f"train/single/s{s}"] for s in seeds]})
  steps.append({"key": "serve/network", "kind": "serve", "argv": ["python", "-m", "snapjax.study.serving"],
                "needs": list(steps)})
  done, running, events, peak = set(), set(), [], [0]

  def fake_status(step, known=None):
    if step["key"] in done or step["key"] in running:  # Its report (or last snapshot) is written while it runs.
      return "done"
    return "waiting" if any(fake_status(n) != "done" for n in step["needs"]) else "todo"

  class Runner:
    stop_requested, records = False, None

    def start(self, step):
      assert fake_status(step) == "todo" and step["key"] not in running
      running.add(step["key"])
      peak[0] = max(peak[0], len(running))
      events.append(("start", step["key"]))
      return _FakeChild(step["key"], polls=2 if step["kind"] == "train" else 1)

    def outcome(self, step, child):
      running.discard(step["key"])
      done.add(step["key"])
      events.append(("end", step["key"]))
      return "ok"

  class State:
    def __init__(self):
      self.finished_keys = []

    def finished(self, key, seconds, argv):
      self.finished_keys.append(key)

    def save(self):
      pass

  monkeypatch.setattr(plan, "status", fake_status)
  monkeypatch.setattr(runner.time, "sleep", lambda s: None)
  state = State()
  assert runner.run_parallel(2, steps, state, Runner(), {"train": [], "eval": []}) == 0
  assert sorted(state.finished_keys) == sorted(s["key"] for s in steps)
  assert peak[0] == 2
  ended = {}
  for i, (what, key) in enumerate(events):
    if what == "end":
      ended[key] = i
  for s in steps:
    start = events.index(("start", s["key"]))
    assert all(ended[n["key"]] < start for n in s["needs"]), s["key"]
  # Plan order among the runs that were ready: the first two training runs start first.
  assert events[:2] == [("start", "train/snapshot/s0"), ("start", "train/single/s0")]


def test_jobs_must_be_positive_and_one_in_process(capsys):
  for argv, flag in ((["--jobs", "0"], "--jobs"), (["--jobs", "2", "--in_process"], "--jobs"),
                     (["--deep_ensemble_size", "1"], "--deep_ensemble_size")):
    with pytest.raises(SystemExit) as e:
      study.parse_args(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_the_serving_measurement_refuses_a_missing_run_in_one_line(tmp_path, capsys):
  from snapjax.study import serving
  with pytest.raises(SystemExit) as e:
    serving.main(["--workdir", str(tmp_path / "missing"), "--out", str(tmp_path / "serving.json")])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "missing" in err[0] and not (tmp_path / "serving.json").exists()
  with pytest.raises(SystemExit) as e:
    serving.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "s.json"), "--repeats", "0"])
  assert e.value.code == 2 and "--repeats=0" in capsys.readouterr().err
  assert not serving.is_fresh(str(tmp_path / "serving.json"), str(tmp_path))
