"""benchmarks/accelerator.py (issue 24): --smoke runs every row kind on CPU; the table and JSON hold finite numbers."""
import json
import math

import pytest

import helpers
from helpers import ROOT, subprocess_env

KINDS = {"train", "dispatch", "members", "ensemble", "export"}


@pytest.mark.slow
def test_smoke_runs_every_row_and_writes_the_table(tmp_path):
  out = tmp_path / "accelerator.json"
  proc = helpers.run_python(["benchmarks/accelerator.py", "--smoke", "--json", str(out)], subprocess_env(4), 600,
                            cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  doc = json.loads(out.read_text())
  assert doc["command"] == f"python benchmarks/accelerator.py --smoke --json {out}"
  assert (doc["smoke"], doc["platform"], doc["device_kind"], doc["num_devices"]) == (True, "cpu", "cpu", 4)
  assert doc["peak_flops"] == {"float32": None, "bfloat16": None} and doc["peak_source"] == "unknown"
  rows = doc["rows"]
  assert [r for r in rows if r["status"] != "ok"] == []
  assert {r["kind"] for r in rows} == KINDS
  train = [r for r in rows if r["kind"] == "train"]
  assert {(r["stands_for"], r["dtype"]) for r in train} == {
      (f"{m} {s}x{s}x3 batch {b}", d) for m, s, bs in (("resnet110", 32, (64, 512)), ("wrn32_4", 32, (64, 512)),
                                                       ("densenet40", 32, (64, 512)), ("resnet50", 224, (256,)))
      for b in bs for d in ("float32", "bfloat16")}
  assert {(r["stands_for"], r["dtype"], r["steps_per_dispatch"]) for r in rows if r["kind"] == "dispatch"} == {
      (f"{m} 32x32x3 batch 64", d, 4) for m in ("resnet110", "wrn32_4", "densenet40") for d in ("float32", "bfloat16")}
  assert {(r["members"], r["strategy"]) for r in rows if r["kind"] == "members"} == {
      (1, None), (2, "loop"), (2, "map"), (2, "vmap")}
  assert [r["strategy"] for r in rows if r["kind"] == "ensemble"] == ["auto", "map", "loop", "vmap"]
  assert [r["batch"] for r in rows if r["kind"] == "export"] == [1, 8]
  for r in rows:
    for key in ("ms", "ms_min", "ms_max", "images_per_s", "ms_per_image", "compile_s", "flops_per_unit"):
      assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] >= 0, (r["kind"], r["variant"], key)
    assert r["images_per_s"] > 0 and r["flops_per_unit"] > 0 and r["repeats"] == 1
    assert r["mfu"] == "n/a", r  # No peak is known for a CPU.
  assert next(r for r in rows if r["kind"] == "dispatch")["vs_what"] == "1 update / call"
  # One program per kind, dtype and dataset (resnet8 stands for every model; ImageNet's has 1,000 classes): timed
  # once, its numbers on every row that runs it.
  first = {}
  for r in rows:
    if r["kind"] in ("train", "dispatch"):
      f = first.setdefault((r["kind"], r["dtype"], r["dataset"]), r)
      assert r.get("same_program_as") == (None if f is r else f["stands_for"]), r
      assert (r["ms"], r["compile_s"]) == (f["ms"], f["compile_s"])
  assert len([r for r in rows if "same_program_as" in r]) == 14
  text = proc.stdout
  assert text.startswith(f"command: python benchmarks/accelerator.py --smoke --json {out}\ndevice: cpu (4 x cpu), jax ")
  assert "MFU n/a, give --peak_flops" in text
  table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| kind")]
  assert len(table) == len(rows) and all(line.endswith("| ok |") and "| n/a |" in line for line in table)


@pytest.mark.slow
def test_mfu_is_a_number_with_peak_flops(tmp_path):
  from benchmarks import accelerator
  out = tmp_path / "accelerator.json"
  assert accelerator.main(["--smoke", "--sections", "export", "--peak_flops", "1e12", "--json", str(out)]) == 0
  doc = json.loads(out.read_text())
  assert doc["peak_flops"] == {"float32": 1e12, "bfloat16": 1e12} and doc["peak_source"] == "--peak_flops"
  assert [r["kind"] for r in doc["rows"]] == ["export", "export"]
  for r in doc["rows"]:
    assert r["status"] == "ok" and isinstance(r["mfu"], float) and r["mfu"] > 0
    assert math.isclose(r["mfu"], r["tflops_per_s"] * 1e12 / 1e12)


def test_a_failing_row_is_reported_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
  from benchmarks import accelerator

  def out_of_memory(row, *_):
    if row["strategy"] == "map":
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB.\nmore detail")
    row.update(ms=1.0, ms_min=1.0, ms_max=1.0, images_per_s=8000.0, ms_per_image=0.125, mfu="n/a", compile_s=0.0,
               repeats=1)

  monkeypatch.setattr(accelerator, "run_ensemble", out_of_memory)
  out = tmp_path / "a.json"
  assert accelerator.main(["--smoke", "--sections", "ensemble", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [(r["strategy"], r["status"]) for r in rows] == [("auto", "ok"), ("map", "failed"), ("loop", "ok"),
                                                          ("vmap", "ok")]
  assert rows[1]["error"] == "RuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB."
  assert "| failed: RuntimeError: RESOURCE_EXHAUSTED" in capsys.readouterr().out


def test_rows_past_the_time_budget_are_skipped(tmp_path):
  from benchmarks import accelerator
  out = tmp_path / "a.json"
  assert accelerator.main(["--smoke", "--budget_s", "0", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert {r["kind"] for r in rows} == KINDS and {r["status"] for r in rows} == {"skipped"}
