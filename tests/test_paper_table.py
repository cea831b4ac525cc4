"""scripts/paper_table.py (issue 9): every config it names exists and validates; the paper's numbers match paper.md."""
import json
import os
import re

import pytest

from benchmarks import cost_analysis
from scripts import paper_table
from snapjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_MD = "/work/shared/paper.md"
ROWS = paper_table.rows()


def test_every_table_cell_the_code_supports_has_one_row():
  # Table 1: ResNet-110 (5 methods) and WRN-32-4, DenseNet-40 (6, with dropout) on 4 datasets; DenseNet-100 on
  # C10/C100 only. Table 2: ResNet-50 single, M = 2, M = 3.
  assert len(ROWS) == 5 * 4 + 6 * 4 + 6 * 4 + 6 * 2 + 3
  assert len({r["config"] for r in ROWS}) == len(ROWS)
  assert not any(r["method"] == "dropout" and r["model"] == "resnet110" for r in ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r["config"] for r in ROWS])
def test_every_config_exists_and_validates(row):
  assert os.path.exists(os.path.join(ROOT, row["file"])), row["file"]
  c = paper_table.load_config(row)
  config_lib.validate(c, 4)
  assert c.model == row["model"]
  if row["method"] == "snapshot" and row["table"] == "Table 2":
    assert c.num_cycles == row["overrides"].get("num_cycles", 2)


def _paper_md_cells():
  """{(model, method): numbers} parsed from paper.md's headline table and its Dropout and ImageNet lines."""
  text = open(PAPER_MD).read()
  columns = ("single", "nocycle", "single_cycle", "snapshot_lr0.1", "snapshot")
  models = {"ResNet-110": "resnet110", "WRN-32": "wrn32_4", "DenseNet-40": "densenet40",
            "DenseNet-100": "densenet100"}
  cells = {}
  for line in text.splitlines():
    parts = [p.strip() for p in line.strip().strip("|").split("|")]
    if parts and parts[0] in models and len(parts) == 6:
      for method, cell in zip(columns, parts[1:]):
        cells[(models[parts[0]], method)] = tuple(float(x) for x in cell.split(" / ") if x.strip() != "-")
  dropout = text[text.index("Dropout rows:"):].splitlines()[0]
  for name, numbers in re.findall(r"(WRN-32|DenseNet-40|DenseNet-100) ([\d. /]+\d)", dropout):
    cells[(models[name], "dropout")] = tuple(float(x) for x in numbers.split(" / "))
  imagenet = re.search(r"single (\d+\.\d+), SE M=2 (\d+\.\d+), SE M=3 (\d+\.\d+)", text).groups()
  return cells, tuple(float(x) for x in imagenet)


@pytest.mark.skipif(not os.path.exists(PAPER_MD), reason="the shared paper summary is not on this machine")
def test_the_paper_numbers_are_paper_md():
  cells, imagenet = _paper_md_cells()
  assert {k: tuple(v) for k, v in cells.items()} == {(m, meth): tuple(v) for m, d in paper_table.PAPER.items()
                                                      for meth, v in d.items()}
  assert tuple(n for *_, n in paper_table.IMAGENET) == imagenet


def test_the_page_has_every_row_and_takes_projections(tmp_path):
  out = tmp_path / "paper.md"
  assert paper_table.main(["--out", str(out)]) == 0
  page = out.read_text()
  for r in ROWS:
    assert f"`{r['config']}`" in page and f"| {r['paper_error']:.2f} |" in page
  assert "benchmarks/cost_analysis.py" in page
  assert "`python train.py --config configs/cifar10_wrn32_4.py:single_cycle --workdir " in page
  assert "configs/imagenet_resnet50.py:snapshot --config.num_cycles=3" in page
  projections = tmp_path / "costs.json"
  projections.write_text(json.dumps({"configs/cifar10_wrn32_4.py:single_cycle": 31.25,
                                     "configs/imagenet_resnet50.py:single": {"hours": 20, "device": "v4-8"}}))
  assert paper_table.main(["--out", str(out), "--projections", str(projections)]) == 0
  page = out.read_text()
  assert "| `configs/cifar10_wrn32_4.py:single_cycle` |" in page and "| at least 31.2 h |" in page
  assert "| at least 20.0 h on v4-8 |" in page
  assert "Measured step time: none yet" in page and page.count(" |  |\n") == len(ROWS)  # An empty last column.


def _accelerator_doc(**overrides):
  """benchmarks/accelerator.py --json as a GPU run would write it: one ResNet-110 step measured, one failed."""
  rows = [{"kind": "train", "model": "resnet110", "input": "32x32x3", "batch": 64, "dtype": "float32",
           "status": "ok", "ms": 12.5, "mfu": 0.0153},
          {"kind": "train", "model": "densenet40", "input": "32x32x3", "batch": 64, "dtype": "float32",
           "status": "failed", "error": "RuntimeError: RESOURCE_EXHAUSTED"},
          {"kind": "dispatch", "model": "wrn32_4", "input": "32x32x3", "batch": 64, "dtype": "float32",
           "status": "ok", "ms": 1.0, "mfu": 0.5}]
  return {"command": "python benchmarks/accelerator.py --json a.json", "device_kind": "NVIDIA H200",
          "platform": "gpu", "jax_version": "0.10.2", "smoke": False, "rows": rows, **overrides}


def test_the_page_shows_measured_step_times_beside_the_bound(tmp_path):
  measured, out = tmp_path / "accelerator.json", tmp_path / "paper.md"
  measured.write_text(json.dumps(_accelerator_doc()))
  assert paper_table.main(["--out", str(out), "--measured", str(measured)]) == 0
  page = out.read_text()
  lines = {r["config"]: next(line for line in page.splitlines() if f"`{r['config']}`" in line) for r in ROWS}
  measured_rows = [c for c, line in lines.items() if "| 12.5 ms/step on NVIDIA H200: " in line]
  # Every ResNet-110 row at batch 64 in float32 (CIFAR-10/100, SVHN), not Tiny ImageNet (64x64 input, stride 2).
  assert sorted(measured_rows) == sorted(r["config"] for r in ROWS if r["model"] == "resnet110"
                                         and r["dataset"] != "tinyimagenet")
  assert len(measured_rows) == 3 * 5
  hours = 200 * (50_000 // 64) * 12.5e-3 / 3600  # The row's steps at the measured step time.
  assert lines["configs/cifar10_resnet110.py:single"].endswith(
      f"| 12.5 ms/step on NVIDIA H200: {hours:.3g} h (MFU 1.5%) |")
  assert all(line.endswith(" |  |") for c, line in lines.items() if c not in measured_rows)  # Failed, dispatch: none.
  assert "`python benchmarks/accelerator.py --json a.json`" in page


@pytest.mark.parametrize("overrides", [{"smoke": True}, {"platform": "cpu"}, {"rows": None}])
def test_the_page_refuses_smoke_and_cpu_measurements(tmp_path, overrides, capsys):
  measured = tmp_path / "accelerator.json"
  measured.write_text(json.dumps(_accelerator_doc(**overrides)))
  assert paper_table.main(["--out", str(tmp_path / "paper.md"), "--measured", str(measured)]) == 2
  assert "error: --measured" in capsys.readouterr().err and not (tmp_path / "paper.md").exists()


def test_cost_analysis_projects_each_row_from_its_own_step(monkeypatch, tmp_path):
  """benchmarks/cost_analysis.py --paper_table: hours = the row's training images / the roofline bound of its step."""
  calls = []

  def fake_cost(c, shape, num_classes):  # 1 TFLOP and 1 GB per 64 images: compute-bound on both chips.
    calls.append((c.model, c.dropout_rate, tuple(shape), c.batch_size, c.dtype))
    return {"flops": 1e12 * c.batch_size / 64, "bytes": 1e9 * c.batch_size / 64, "compile_s": 0.0}

  monkeypatch.setattr(cost_analysis, "config_step_cost", fake_cost)
  cache = str(tmp_path / "costs.json.steps")
  out = cost_analysis.paper_projections(cache=cache)
  assert set(out) == {r["config"] for r in ROWS}
  assert len(calls) == len(set(calls))  # One compile per distinct step.
  compiled = len(calls)
  assert cost_analysis.paper_projections(cache=cache) == out and len(calls) == compiled  # A rerun compiles nothing.
  assert ("resnet110", 0.0, (32, 32, 3), 64, "float32") in calls and ("resnet50", 0.0, (224, 224, 3), 256,
                                                                       "bfloat16") in calls
  # paper.md's budgets: CIFAR ResNet-110 200 epochs of 50,000 images at batch 64; ImageNet 90 epochs at batch 256.
  # Float32 steps run at the H100's TF32 peak (495 TFLOP/s), the ImageNet config's bfloat16 at 989.
  # Compute-bound steps: the roofline estimate is the compute bound, "at least" that.
  for config, epochs, examples, batch, h100_peak in (
      ("configs/cifar100_resnet110.py:single_cycle", 200, 50_000, 64, 495e12),
      ("configs/imagenet_resnet50.py:snapshot --config.num_cycles=3", 90, 1_281_167, 256, 989e12)):
    steps = epochs * (examples // batch)
    per_step = 1e12 * batch / 64
    step_s, v5e8_s = per_step / h100_peak, per_step / 197e12 / 8
    h100, v5e8 = steps * step_s / 3600, steps * v5e8_s / 3600
    assert out[config] == (f"at least {h100:.3g} h on 1 H100 ({1e3 * step_s:.3g} ms/step; roofline estimate "
                           f"{h100:.3g} h, {1e3 * step_s:.3g} ms/step); at least {v5e8:.3g} h on a TPU v5e-8 "
                           f"(roofline estimate {v5e8:.3g} h)"), config


def test_cost_analysis_bounds_memory_bound_steps_by_compute_only(monkeypatch, tmp_path):
  """A memory-bound step: "at least" the compute bound; the roofline (memory) time is an estimate beside it."""
  monkeypatch.setattr(cost_analysis, "config_step_cost",
                      lambda c, shape, n: {"flops": 495e9, "bytes": 33.5e9, "compile_s": 0.0})  # 1 ms vs 10 ms/step.
  out = cost_analysis.paper_projections(cache=str(tmp_path / "costs.json.steps"))
  steps = 200 * (50_000 // 64)
  assert out["configs/cifar10_resnet110.py:single"].startswith(
      f"at least {steps * 1e-3 / 3600:.3g} h on 1 H100 (1 ms/step; roofline estimate {steps * 1e-2 / 3600:.3g} h, "
      f"10 ms/step)")
