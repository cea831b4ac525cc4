"""Writes docs/results/paper.md: one row per cell of the paper's Table 1 and Table 2 that this code trains.

    python scripts/paper_table.py                               # docs/results/paper.md (projections: paper_costs.json)
    python scripts/paper_table.py --projections costs.json      # ... with the projected times of another file

Each row names the config (`configs/<dataset>_<model>.py:<method>`, plus any --config overrides), the train and eval
commands, and the paper's number (test error %, from /work/shared/paper.md, restated in PAPER below). The projected
time comes from the performance issue's cost analysis (benchmarks/cost_analysis.py): --projections takes a JSON object
mapping a row's config string (the "config" column, e.g. "configs/cifar10_wrn32_4.py:single_cycle") to its projected
time, either hours (a number) or a text such as "31 h on 1 V100"; rows it does not name stay empty.
"""
import argparse
import json
import os
import shlex
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Paper Table 1 (test error %), columns CIFAR-10 / CIFAR-100 / SVHN / Tiny ImageNet; DenseNet-100 has C10/C100 only.
DATASETS = ("cifar10", "cifar100", "svhn", "tinyimagenet")
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "tinyimagenet": "Tiny ImageNet"}
MODEL_NAMES = {"resnet110": "ResNet-110", "wrn32_4": "WRN-32-4", "densenet40": "DenseNet-40",
               "densenet100": "DenseNet-100"}
METHOD_NAMES = {"single": "Single model", "nocycle": "NoCycle Snapshot Ensemble",
                "single_cycle": "SingleCycle Ensembles", "snapshot_lr0.1": "Snapshot Ensemble (alpha0 = 0.1)",
                "snapshot": "Snapshot Ensemble (alpha0 = 0.2)", "dropout": "Dropout (p = 0.2)"}
PAPER = {
    "resnet110": {"single": (5.52, 28.02, 1.96, 46.50), "nocycle": (5.49, 26.97, 1.78, 43.69),
                  "single_cycle": (7.35, 26.30, 1.81, 45.50), "snapshot_lr0.1": (5.73, 25.55, 1.63, 40.54),
                  "snapshot": (5.32, 24.19, 1.66, 39.40)},
    "wrn32_4": {"single": (5.43, 23.55, 1.90, 39.63), "dropout": (4.68, 22.82, 1.81, 36.58),
                "nocycle": (5.18, 22.81, 1.81, 38.64), "single_cycle": (5.86, 21.97, 1.68, 36.88),
                "snapshot_lr0.1": (4.41, 21.26, 1.64, 35.45), "snapshot": (4.73, 21.56, 1.51, 32.90)},
    "densenet40": {"single": (5.24, 24.42, 1.77, 39.09), "dropout": (6.08, 25.79, 1.79, 39.68),
                   "nocycle": (5.20, 24.63, 1.80, 38.51), "single_cycle": (5.55, 22.85, 2.03, 40.43),
                   "snapshot_lr0.1": (4.99, 23.34, 1.64, 37.25), "snapshot": (4.84, 21.93, 1.73, 36.61)},
    "densenet100": {"single": (3.74, 19.25), "dropout": (3.65, 18.77), "nocycle": (3.80, 19.30),
                    "single_cycle": (4.39, 18.70), "snapshot_lr0.1": (3.57, 18.12), "snapshot": (3.44, 17.41)},
}
# Paper Table 2: ResNet-50 on ImageNet, top-1 validation error %: (method, overrides, label, number).
IMAGENET = (("single", {}, "Single model", 24.01),
            ("snapshot", {}, "Snapshot Ensemble, M = 2", 23.33),
            ("snapshot", {"num_cycles": 3}, "Snapshot Ensemble, M = 3", 23.96))
DATA_NOTE = {"cifar10": "--config.data_dir=DIR (a prepared TFDS cifar10)",
             "cifar100": "--config.data_dir=DIR (a prepared TFDS cifar100)",
             "svhn": "--config.data_dir=DIR (a prepared TFDS svhn_cropped)",
             "tinyimagenet": "--config.tiny_imagenet_dir=DIR (the extracted tiny-imagenet-200/)",
             "imagenet": "--config.data_dir=DIR (a prepared TFDS imagenet2012, e.g. a gs:// bucket)"}


def rows() -> list[dict[str, Any]]:
  """Every Table 1 and Table 2 cell the code trains: table, dataset, model, method, config, overrides, paper number."""
  out = []
  for i, dataset in enumerate(DATASETS):  # Ordered as the paper's table: dataset, network, method.
    for model, methods in PAPER.items():
      for method, numbers in methods.items():
        if i >= len(numbers):
          continue  # DenseNet-100: CIFAR only.
        number = numbers[i]
        out.append({"table": "Table 1", "dataset": dataset, "model": model, "method": method,
                    "label": METHOD_NAMES[method], "file": f"configs/{dataset}_{model}.py", "overrides": {},
                    "paper_error": number})
  for method, overrides, label, number in IMAGENET:
    out.append({"table": "Table 2", "dataset": "imagenet", "model": "resnet50", "method": method, "label": label,
                "file": "configs/imagenet_resnet50.py", "overrides": overrides, "paper_error": number})
  for r in out:
    r["config"] = config_string(r)
    r["workdir"] = "runs/" + "_".join([os.path.basename(r["file"])[:-3], r["method"]] +
                                      [f"{k}{v}" for k, v in r["overrides"].items()])
    r["command"] = (shlex.join(["python", "train.py", "--config", f"{r['file']}:{r['method']}", *_flags(r),
                                "--workdir", r["workdir"]]) + " && " +
                    shlex.join(["python", "eval.py", "--workdir", r["workdir"]]))
  return out


def _flags(row: dict[str, Any]) -> list[str]:
  return [f"--config.{k}={v}" for k, v in row["overrides"].items()]


def config_string(row: dict[str, Any]) -> str:
  """The row's key: 'configs/x.py:method' and its overrides, as --projections names it."""
  return " ".join([f"{row['file']}:{row['method']}", *_flags(row)])


def load_config(row: dict[str, Any]):
  """The row's ConfigDict, as train.py --config FILE:METHOD --config.k=v builds it."""
  import configs
  c = configs.load(os.path.basename(row["file"])[:-3]).get_config(row["method"])
  for k, v in row["overrides"].items():
    c[k] = v
  return c


def _projection(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, (int, float)):
    return f"{value:.1f} h"
  if isinstance(value, dict):
    hours = value.get("hours")
    text = f"{hours:.1f} h" if isinstance(hours, (int, float)) else ""
    return " ".join(t for t in (text, value.get("device", "") and f"on {value['device']}") if t)
  return str(value)


def markdown(table: list[dict[str, Any]], projections: dict[str, Any] | None = None) -> str:
  projections = projections or {}
  intro = ("Generated by `python scripts/paper_table.py`. One row per cell of the paper's Table 1 (test error %) "
           "and Table 2 (ImageNet top-1 validation error %) that snapjax trains. None of these has been run here: "
           "no accelerator was available, and on this project's 2-core CPU one run would take days to weeks "
           "(README, Known limitations).")
  lines = ["# The paper's experiments: configs, commands and the paper's numbers", "", intro, "",
           "Every command also needs its data: " + "; ".join(f"{DATASET_NAMES.get(k, 'ImageNet')}: `{v}`"
                                                            for k, v in DATA_NOTE.items()) + ".", ""]
  if projections:
    lines += ["Projected time: one training run of the row's config (a Snapshot Ensemble, and SingleCycle's M "
              "shorter runs together, cost one run) at the roofline bound of its own compiled train step, from "
              "XLA's cost analysis: `python benchmarks/cost_analysis.py --paper_table docs/results/paper_costs.json "
              "&& python scripts/paper_table.py --projections docs/results/paper_costs.json` (the JSON files beside "
              "this page hold every row's projection and every step's FLOPs and bytes): images / min(compute "
              "bound, memory bound). An H100 at 495 TFLOP/s (TF32, the float32 configs) or 989 (bfloat16, the "
              "ImageNet config) and 3.35 TB/s; a TPU v5e-8 as 8 chips at 197 TFLOP/s and 819 GB/s each, with ideal "
              "data parallelism. The compute term is firm (no run can be faster); the memory term uses XLA:CPU's "
              "estimate of the bytes, which is pessimistic for an accelerator (the flax ImageNet example's "
              "published TPU v3 speed is 3.3x this estimate's memory bound, docs/performance.md, \"Accelerator "
              "projection\"), so a memory-bound row may well train faster than shown. Real runs also pay for data "
              "loading, evaluation and small per-chip batches, which these numbers leave out.", ""]
  else:
    lines += ["Projected time: not filled in; `python benchmarks/cost_analysis.py --paper_table FILE.json && "
              "python scripts/paper_table.py --projections FILE.json` fills it in from XLA's cost analysis.", ""]
  for table_name, title in (("Table 1", "## Table 1"), ("Table 2", "## Table 2: ResNet-50 on ImageNet")):
    lines += [title, "", "| dataset | network | method | paper (%) | config | command | projected time |",
              "|---|---|---|---|---|---|---|"]
    for r in table:
      if r["table"] != table_name:
        continue
      lines.append(f"| {DATASET_NAMES.get(r['dataset'], 'ImageNet')} | {MODEL_NAMES.get(r['model'], 'ResNet-50')} | "
                   f"{r['label']} | {r['paper_error']:.2f} | `{r['config']}` | `{r['command']}` | "
                   f"{_projection(projections.get(r['config']))} |")
    lines.append("")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "paper.md"))
  p.add_argument("--projections", default=None,
                 help="JSON: {config string: hours or text} (cost_analysis.py --paper_table output; default "
                      "docs/results/paper_costs.json where it exists)")
  args = p.parse_args(argv)
  projections = None
  default = os.path.join(ROOT, "docs", "results", "paper_costs.json")
  if args.projections is None and os.path.exists(default):
    args.projections = default
  if args.projections:
    with open(args.projections) as f:
      projections = json.load(f)
  table = rows()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(markdown(table, projections))
  unknown = sorted(set(projections or {}) - {r["config"] for r in table})
  if unknown:
    print(f"warning: --projections names configs with no row: {', '.join(unknown)}", file=sys.stderr)
  print(f"wrote {args.out}: {len(table)} rows")
  return 0


if __name__ == "__main__":
  sys.exit(main())
