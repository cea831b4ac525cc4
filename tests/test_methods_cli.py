"""FGE, SWA, EMA and SWAG end to end through train.py and eval.py on the tiny config; bad fields exit 2 in one line."""
import json
import os

import pytest

import helpers

TIMEOUT = 300
METHODS = {
    "fge": dict(method="fge", schedule="fge", num_cycles=1, fge_pretrain_fraction=0.5),  # Models at 48, 64... (one).
    "swa": dict(method="swa", schedule="swa", num_cycles=1, swa_start=2.0),
    "ema": dict(method="ema", schedule="step", num_cycles=1, ema_decay=0.9),
    "swag": dict(method="swag", schedule="swa", num_cycles=1, swa_start=2.0, swa_every_steps=4, swag_rank=3),
}


def _run(argv):
  return helpers.run_python(argv, env=helpers.subprocess_env(4), timeout=TIMEOUT)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_and_evaluates_through_the_scripts(method, tiny_data, tmp_path):
  workdir = str(tmp_path / "run")
  proc = _run(helpers.train_argv("train.py", tiny_data, workdir, METHODS[method]))
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = _run(["eval.py", "--workdir", workdir, "--swag_samples", "3", "--swag_seed", "1"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.load(open(os.path.join(workdir, "eval", "report.json")))
  steps = [s["step"] for s in report["snapshots"]]
  if method == "fge":
    assert steps == [48]  # Pretraining 32 updates, then the midpoint of the 2-epoch cycle.
  elif method == "swag":
    assert steps == [64] * 3 and report["swag"]["samples"] == 3 and report["swag"]["runs"][0]["collected"] == 9
    assert report["ensemble"]["m"] == 3  # The model average of the 3 samples.
  else:
    assert steps == [64]
  assert report["ensemble"]["error"] < 0.5, report["ensemble"]
  meta = json.load(open(os.path.join(workdir, "snapshots", str(steps[-1]), "meta", "metadata")))
  assert meta["method"] == method
  if method != "fge":
    assert meta["averaged"] == method and meta["batch_stats"] == "recomputed"


@pytest.mark.parametrize("overrides, needles", [
    (dict(method="fge", schedule="fge", num_cycles=1, fge_cycle_epochs=3), ["fge_cycle_epochs must be an even"]),
    (dict(method="swa", schedule="swa", num_cycles=1, swa_start=9.0), ["swa_start=9.0 is past the end"]),
])
def test_bad_method_field_is_one_line_and_exit_code_2(overrides, needles, tiny_data, tmp_path):
  workdir = tmp_path / "run"
  proc = _run(helpers.train_argv("train.py", tiny_data, str(workdir), overrides))
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines[-1].startswith("error: ") and all(n in lines[-1] for n in needles), lines[-1]
  assert not (workdir / "snapshots").exists()
