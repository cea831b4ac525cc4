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
  assert "| `configs/cifar10_wrn32_4.py:single_cycle` |" in page and "| 31.2 h |" in page
  assert "| 20.0 h on v4-8 |" in page


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
  for config, epochs, examples, batch, h100_peak in (
      ("configs/cifar100_resnet110.py:single_cycle", 200, 50_000, 64, 495e12),
      ("configs/imagenet_resnet50.py:snapshot --config.num_cycles=3", 90, 1_281_167, 256, 989e12)):
    images = epochs * (examples // batch) * batch
    per_step = 1e12 * batch / 64
    h100 = images / (batch / (per_step / h100_peak)) / 3600
    v5e8 = images / (8 * batch / (per_step / 197e12)) / 3600
    assert out[config] == f"{h100:.2f} h on 1 H100; {v5e8:.2f} h on a TPU v5e-8", config
