"""Writes docs/results/paper.md: one row per cell of the paper's Table 1 and Table 2 that this code trains.

    python scripts/paper_table.py                               # docs/results/paper.md (projections: paper_costs.json)
    python scripts/paper_table.py --projections costs.json      # ... with the projected times of another file
    python scripts/paper_table.py --measured accelerator.json   # ... and step times measured on a GPU or TPU

Each row names the config (`configs/<dataset>_<model>.py:<method>`, plus any --config overrides), the train and eval
commands, and the paper's number (test error %, from /work/shared/paper.md, restated in PAPER below). The projected
time comes from the performance issue's cost analysis (benchmarks/cost_analysis.py): --projections takes a JSON object
mapping a row's config string (the "config" column, e.g. "configs/cifar10_wrn32_4.py:single_cycle") to its projected
time, either hours (a number, shown as "at least N h": a projection is a lower bound) or a text such as "at least
31 h on 1 V100"; rows it does not name stay empty. --measured (default docs/results/accelerator.json where it exists)
takes `benchmarks/accelerator.py --json` from an accelerator and puts each measured train step beside the bound of
the rows that run that step (same model, input, batch and dtype, no dropout); a smoke or CPU run is refused.
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
    return f"at least {value:.1f} h"
  if isinstance(value, dict):
    hours = value.get("hours")
    text = f"at least {hours:.1f} h" if isinstance(hours, (int, float)) else ""
    return " ".join(t for t in (text, value.get("device", "") and f"on {value['device']}") if t)
  return str(value)


def check_measured(doc: dict[str, Any], path: str) -> None:
  """ValueError unless `doc` is benchmarks/accelerator.py's JSON from an accelerator (not --smoke, not a CPU)."""
  if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
    raise ValueError(f"--measured {path}: not the JSON of benchmarks/accelerator.py --json")
  if doc.get("smoke") or doc.get("platform") == "cpu":
    raise ValueError(f"--measured {path}: a {'--smoke' if doc.get('smoke') else 'CPU'} run; only an accelerator's "
                     f"measurements go on the page")


def measured_cell(row: dict[str, Any], doc: dict[str, Any] | None) -> str:
  """'m ms/step on DEVICE: h h (MFU u)' for the row's config from a measured train step of the same program, or ''."""
  if not doc:
    return ""
  from snapjax import config as config_lib, data, train_step
  c = load_config(row)
  if c.dropout_rate or c.stem_stride != 1:
    return ""  # benchmarks/accelerator.py measures the models without dropout, at stride 1.
  spec = data.get_spec(c.dataset)
  shape = spec.image_shape if spec.in_memory else (c.image_size, c.image_size, spec.image_shape[2])
  want = (c.model, "x".join(str(d) for d in shape), c.batch_size, c.dtype)
  found = next((r for r in doc["rows"] if r.get("kind") == "train" and r.get("status") == "ok"
                and "stands_for" not in r and (r["model"], r["input"], r["batch"], r["dtype"]) == want), None)
  if found is None:
    return ""
  hours = train_step.make_plan(c, spec.num_train).total_steps * found["ms"] / 1e3 / 3600
  mfu = found.get("mfu")
  mfu = f" (MFU {100 * mfu:.1f}%)" if isinstance(mfu, (int, float)) else ""
  return f"{found['ms']:.3g} ms/step on {doc.get('device_kind', '?')}: {hours:.3g} h{mfu}"


def markdown(table: list[dict[str, Any]], projections: dict[str, Any] | None = None,
             measured: dict[str, Any] | None = None) -> str:
  projections = projections or {}
  intro = ("Generated by `python scripts/paper_table.py`. One row per cell of the paper's Table 1 (test error %) "
           "and Table 2 (ImageNet top-1 validation error %) that snapjax trains. None of these has been run here: "
           "no accelerator was available, and on this project's 2-core CPU one run would take days to weeks "
           "(README, Known limitations).")
  lines = ["# The paper's experiments: configs, commands and the paper's numbers", "", intro, "",
           "Every command also needs its data: " + "; ".join(f"{DATASET_NAMES.get(k, 'ImageNet')}: `{v}`"
                                                            for k, v in DATA_NOTE.items()) + ".", ""]
  if projections:
    lines += ["Projected time: a lower bound on one training run of the row's config (a Snapshot Ensemble, and "
              "SingleCycle's M shorter runs together, cost one run), from XLA's cost analysis of its own compiled "
              "train step: `python benchmarks/cost_analysis.py --paper_table docs/results/paper_costs.json && "
              "python scripts/paper_table.py --projections docs/results/paper_costs.json` (the JSON files beside "
              "this page hold every row's projection and every step's FLOPs and bytes). \"At least\" is the compute "
              "bound: the step's FLOPs at the chip's peak, which no run can beat: an H100 at 495 TFLOP/s (TF32, the "
              "float32 configs) or 989 (bfloat16, the ImageNet config); a TPU v5e-8 as 8 chips at 197 TFLOP/s "
              "each, with ideal data parallelism. The roofline estimate beside it adds the memory term, min(compute, "
              "memory) images/s at 3.35 TB/s (819 GB/s a v5e chip), from XLA:CPU's estimate of the bytes, which "
              "overstates an accelerator's traffic (the flax ImageNet example's published TPU v3 speed is 3.3x "
              "this estimate's memory bound, docs/performance.md, \"Accelerator projection\"): an estimate, not a "
              "bound. Real runs take longer: a small step (CIFAR at batch 64) is likely bound by kernel launches and "
              "small kernels rather than by either term (not measured yet), and data loading, evaluation and small "
              "per-chip batches are left out.", ""]
  else:
    lines += ["Projected time: not filled in; `python benchmarks/cost_analysis.py --paper_table FILE.json && "
              "python scripts/paper_table.py --projections FILE.json` fills it in from XLA's cost analysis.", ""]
  if measured:
    lines += [f"Measured step time: the train step of the row's model, input, batch and dtype timed by "
              f"`benchmarks/accelerator.py` on {measured.get('device_kind', '?')} (jax "
              f"{measured.get('jax_version', '?')}, `{measured.get('command', '?')}`), and the hours of the row's "
              f"run at that rate (its steps x the step time; data loading and evaluation left out).", ""]
  else:
    lines += ["Measured step time: none yet; no GPU or TPU has run `benchmarks/accelerator.py`. After `python "
              "benchmarks/accelerator.py --json docs/results/accelerator.json` on one, `python "
              "scripts/paper_table.py` puts each measured step time (ResNet-110, WRN-32-4 and DenseNet-40 at batch "
              "64, ResNet-50 at 256, float32 and bfloat16, no dropout) beside the bound.", ""]
  for table_name, title in (("Table 1", "## Table 1"), ("Table 2", "## Table 2: ResNet-50 on ImageNet")):
    lines += [title, "", "| dataset | network | method | paper (%) | config | command | projected time | "
              "measured step time |", "|---|---|---|---|---|---|---|---|"]
    for r in table:
      if r["table"] != table_name:
        continue
      lines.append(f"| {DATASET_NAMES.get(r['dataset'], 'ImageNet')} | {MODEL_NAMES.get(r['model'], 'ResNet-50')} | "
                   f"{r['label']} | {r['paper_error']:.2f} | `{r['config']}` | `{r['command']}` | "
                   f"{_projection(projections.get(r['config']))} | {measured_cell(r, measured)} |")
    lines.append("")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "paper.md"))
  p.add_argument("--projections", default=None,
                 help="JSON: {config string: hours or text} (cost_analysis.py --paper_table output; default "
                      "docs/results/paper_costs.json where it exists)")
  p.add_argument("--measured", default=None,
                 help="JSON of benchmarks/accelerator.py --json run on a GPU or TPU (default "
                      "docs/results/accelerator.json where it exists)")
  args = p.parse_args(argv)
  projections = measured = None
  for name, file in (("projections", "paper_costs.json"), ("measured", "accelerator.json")):
    default = os.path.join(ROOT, "docs", "results", file)
    if getattr(args, name) is None and os.path.exists(default):
      setattr(args, name, default)
  if args.projections:
    with open(args.projections) as f:
      projections = json.load(f)
  if args.measured:
    with open(args.measured) as f:
      measured = json.load(f)
    try:
      check_measured(measured, args.measured)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  table = rows()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(markdown(table, projections, measured))
  unknown = sorted(set(projections or {}) - {r["config"] for r in table})
  if unknown:
    print(f"warning: --projections names configs with no row: {', '.join(unknown)}", file=sys.stderr)
  print(f"wrote {args.out}: {len(table)} rows")
  return 0


if __name__ == "__main__":
  sys.exit(main())
