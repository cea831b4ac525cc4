"""eval.py's report: report.json, report.md and error_vs_m.png (test error of each snapshot and last-m ensemble)."""
import json
from typing import Any

from absl import logging

from snapjax.workdir import run_path


def write_report(report: dict[str, Any], out_dir: str, *, plot: bool = True) -> None:
  """report.json, report.md and (if plot) error_vs_m.png in out_dir (a local path or a bucket URL)."""
  out = run_path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.json").write_text(json.dumps(report, indent=2))
  (out / "report.md").write_text(markdown(report))
  if plot:
    with (out / "error_vs_m.png").open("wb") as f:
      plot_error_vs_m(report).savefig(f, format="png", dpi=120)
  logging.info("Wrote %s", out / "report.md")


def best_snapshot(report: dict[str, Any]) -> tuple[int, dict[str, Any]]:
  """(1-based index, entry) of the snapshot with the lowest test error (the first of equals)."""
  i = min(range(len(report["snapshots"])), key=lambda k: report["snapshots"][k]["error"])
  return i + 1, report["snapshots"][i]


def summary(report: dict[str, Any]) -> str:
  """One line: the best single snapshot against the headline ensemble."""
  _, best = best_snapshot(report)
  ens = report["ensemble"]
  return (f"best single snapshot error {100 * best['error']:.2f}% | ensemble of last {ens['m']} error "
          f"{100 * ens['error']:.2f}%, NLL {ens['nll']:.4f} | {report['num_test_examples']} test examples")


def export_summary(meta: dict[str, Any], path: str) -> str:
  """One line: where the exported ensemble went, its input and its own test error."""
  shape = ", ".join(str(d) for d in meta["input"]["shape"])
  return (f"exported the ensemble of the last {meta['last_m']} snapshots to {path} ({meta['bytes']} bytes; "
          f"input ({shape}) {meta['input']['dtype']}; test error {100 * meta['test']['error']:.2f}%, "
          f"NLL {meta['test']['nll']:.4f}); described in {path}.json")


def markdown(report: dict[str, Any]) -> str:
  lines = [f"# Snapshot Ensemble evaluation: {report['model']} on {report['dataset']} "
           f"({report['num_test_examples']} test examples)", "",
           "| snapshot | run | step | error (%) | NLL |", "|---|---|---|---|---|"]
  for i, s in enumerate(report["snapshots"]):
    lines.append(f"| {i + 1} | {s['workdir']} | {s['step']} | {100 * s['error']:.2f} | {s['nll']:.4f} |")
  lines += ["", "| last-m ensemble | error (%) | NLL |", "|---|---|---|"]
  for e in report["ensembles"]:
    lines.append(f"| m={e['m']} | {100 * e['error']:.2f} | {e['nll']:.4f} |")
  _, best = best_snapshot(report)
  lines += ["", f"Best single snapshot: {100 * best['error']:.2f}% error; ensemble of the last "
            f"{report['ensemble']['m']}: {100 * report['ensemble']['error']:.2f}% error, "
            f"NLL {report['ensemble']['nll']:.4f}.", ""]
  return "\n".join(lines)


def plot_error_vs_m(report: dict[str, Any]):
  """The figure of error_vs_m.png: snapshot i and last-m ensemble errors, integer ticks on the x axis."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator
  num = len(report["snapshots"])
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(range(1, num + 1), [100 * s["error"] for s in report["snapshots"]], "o-", label="snapshot i (training order)")
  ax.plot([e["m"] for e in report["ensembles"]], [100 * e["error"] for e in report["ensembles"]], "s-",
          label="ensemble of the last m")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # Snapshot counts: no 1.5 ticks.
  ax.set_xlabel("snapshot index i / ensemble size m")
  ax.set_ylabel("test error (%)")
  ax.set_title(f"{report['model']} on {report['dataset']}")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  plt.close(fig)  # Detached from pyplot; the caller saves it.
  return fig
