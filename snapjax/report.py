"""eval.py's report: report.json, report.md and its figures, and where each lies in the report's directory.

error_vs_m.png: test error of each snapshot and last-m ensemble; reliability.png: reliability diagrams and ECE;
diversity.png: the snapshots' pairwise disagreement and softmax correlation (paper Fig. 6); interpolation.png: test
error between each earlier snapshot and the last (paper Fig. 5), when eval.py ran --analyses=interpolation.
"""
import json
from typing import Any

import numpy as np
from absl import logging

from snapjax import uncertainty_report
from snapjax.workdir import run_path

REPORT_FILE = "report.json"


def write_report(report: dict[str, Any], out_dir: str, *, plot: bool = True) -> None:
  """report.json, report.md and (if plot) error_vs_m.png in out_dir (a local path or a bucket URL)."""
  out = run_path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
  (out / "report.md").write_text(markdown(report))
  if plot:
    figures = {"error_vs_m": plot_error_vs_m, "reliability": plot_reliability, "diversity": plot_diversity,
               "interpolation": plot_interpolation}
    needs = {"reliability": "calibration", "diversity": "diversity", "interpolation": "interpolation"}
    for name, plot_fn in figures.items():
      if needs.get(name, "snapshots") in report:
        with run_path(figure_path(out_dir, name)).open("wb") as f:
          plot_fn(report).savefig(f, format="png", dpi=120)
    for name, (key, plot_fn) in uncertainty_report.FIGURES.items():  # temperature.png, ood.png, shift.png, ...
      if key in report:
        with run_path(figure_path(out_dir, name)).open("wb") as f:
          plot_fn(report).savefig(f, format="png", dpi=120)
  logging.info("Wrote %s", out / "report.md")


def read_report(out_dir: str) -> dict[str, Any] | None:
  """The report `write_report` wrote into out_dir (eval.py's --out_dir, by default WORKDIR/eval), or None."""
  path = run_path(out_dir) / REPORT_FILE
  return json.loads(path.read_text()) if path.exists() else None


def figure_path(out_dir: str, name: str) -> str:
  """Where `write_report` writes a figure: name is "error_vs_m", "reliability", "diversity" or "interpolation"."""
  return str(run_path(out_dir) / f"{name}.png")


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


def analyses_summary(report: dict[str, Any]) -> list[str]:
  """Extra lines after `summary` for the weight-space analyses in the report (none without them)."""
  lines = []
  if report.get("weight_average"):
    wa = report["weight_average"][-1]
    lines.append(f"weight average of the last {wa['m']} snapshots error {100 * wa['error']:.2f}%, NLL "
                 f"{wa['nll']:.4f}, ECE {100 * wa['ece']:.2f}%")
  if report.get("interpolation"):
    peaks = ", ".join(f"{e['snapshot']}: {100 * max(e['error']):.2f}%" for e in report["interpolation"])
    lines.append(f"interpolation to the last snapshot: highest test error on the path from snapshot {peaks}")
  return lines + uncertainty_report.summary(report)


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
  return "n/a" if value is None else f"{scale * value:.{digits}f}"


def _analysis_markdown(report: dict[str, Any]) -> list[str]:
  """report.md's sections for the analyses present in the report."""
  lines = []
  if "calibration" in report:
    cal = report["calibration"]
    lines += ["## Calibration", "",
              f"Top-label ECE over {cal['num_bins']} equal-width confidence bins, Brier score (sum over classes), "
              f"NLL; reliability diagrams in reliability.png.", "",
              "| model | ECE (%) | Brier | NLL |", "|---|---|---|---|"]
    lines += [f"| snapshot {i + 1} | {100 * c['ece']:.2f} | {c['brier']:.4f} | {c['nll']:.4f} |"
              for i, c in enumerate(cal["snapshots"])]
    lines += [f"| last-{c['m']} ensemble | {100 * c['ece']:.2f} | {c['brier']:.4f} | {c['nll']:.4f} |"
              for c in cal["ensembles"]]
    lines.append("")
  if "diversity" in report:
    num = len(report["diversity"]["disagreement"])
    header = ["| | " + " | ".join(f"{j + 1}" for j in range(num)) + " |", "|---" * (num + 1) + "|"]
    for key, what in (("disagreement", "Disagreement (% of test examples whose predicted class differs)"),
                      ("correlation", "Correlation of the softmax outputs (paper Fig. 6)")):
      scale, digits = (100, 1) if key == "disagreement" else (1, 3)
      lines += [f"## Diversity: {key}", "", f"{what}; snapshot i against snapshot j, heatmaps in diversity.png.", "",
                *header]
      lines += [f"| {i + 1} | " + " | ".join(_fmt(v, scale, digits) for v in row) + " |"
                for i, row in enumerate(report["diversity"][key])]
      lines.append("")
  if "ensembles_first_m" in report:
    lines += ["## Ensemble size: the last m against the first m", "",
              "| m | last-m error (%) | first-m error (%) | first-m NLL | first-m ECE (%) |", "|---|---|---|---|---|"]
    lines += [f"| {f['m']} | {100 * l['error']:.2f} | {100 * f['error']:.2f} | {f['nll']:.4f} | {100 * f['ece']:.2f} |"
              for l, f in zip(report["ensembles"], report["ensembles_first_m"])]
    lines.append("")
  bn = report.get("bn_recompute")
  bn_text = (f"BatchNorm statistics recomputed at every point: the mean over {bn['batches']} training batches of "
             f"{bn['batch_size']} ({bn['examples']} examples of {bn['split']!r}, augmentation {bn['augment']!r})."
             if bn else "")
  if report.get("weight_average"):
    lines += ["## Weight-averaged snapshots", "", f"The weights of the last m snapshots averaged into one network. "
              f"{bn_text}", "", "| last m averaged | error (%) | NLL | ECE (%) | prediction ensemble error (%) |",
              "|---|---|---|---|---|"]
    lines += [f"| m={w['m']} | {100 * w['error']:.2f} | {w['nll']:.4f} | {100 * w['ece']:.2f} | "
              f"{100 * report['ensembles'][w['m'] - 1]['error']:.2f} |" for w in report["weight_average"]]
    lines.append("")
  if report.get("interpolation"):
    lambdas = report["interpolation"][0]["lambdas"]
    lines += ["## Interpolation (paper Fig. 5)", "",
              f"Test error (%) of theta = lambda * theta_M + (1 - lambda) * theta_i, theta_M the last snapshot. "
              f"{bn_text} Plotted in interpolation.png.", "",
              "| snapshot i | " + " | ".join(f"{l:.2f}" for l in lambdas) + " |", "|---" * (len(lambdas) + 1) + "|"]
    lines += [f"| {e['snapshot']} (step {e['step']}) | " + " | ".join(f"{100 * v:.2f}" for v in e["error"]) + " |"
              for e in report["interpolation"]]
    lines.append("")
  return lines


def members_summary(report: dict[str, Any]) -> list[str]:
  """A line for the true ensemble (every member's final snapshot) when the runs hold several members."""
  if len(report.get("members", [])) < 2:
    return []
  t = report["true_ensemble"]
  return [f"true ensemble of the {t['size']} members' final snapshots error {100 * t['error']:.2f}%, NLL "
          f"{t['nll']:.4f} | all {len(report['snapshots'])} snapshots error "
          f"{100 * report['ensembles'][-1]['error']:.2f}%"]


def _members_markdown(report: dict[str, Any]) -> list[str]:
  """Each ensemble member's own snapshot ensemble and the true ensemble (runs with several members)."""
  if len(report.get("members", [])) < 2:
    return []
  lines = ["", "## Members", "",
           "| run | member | seed | final snapshot error (%) | its snapshot ensemble error (%) |",
           "|---|---|---|---|---|"]
  for m in report["members"]:
    lines.append(f"| {m['workdir']} | {m['member']} | {m['seed']} | {100 * m['ensembles'][0]['error']:.2f} | "
                 f"{100 * m['ensembles'][-1]['error']:.2f} |")
  t = report["true_ensemble"]
  lines += ["", f"True ensemble (the {t['size']} members' final snapshots): {100 * t['error']:.2f}% error, "
            f"NLL {t['nll']:.4f}; ensemble of all {len(report['snapshots'])} snapshots: "
            f"{100 * report['ensembles'][-1]['error']:.2f}% error."]
  return lines


def markdown(report: dict[str, Any]) -> str:
  lines = [f"# Snapshot Ensemble evaluation: {report['model']} on {report['dataset']} "
           f"({report['num_test_examples']} test examples)", "",
           "| snapshot | run | member | step | error (%) | NLL |", "|---|---|---|---|---|---|"]
  for i, s in enumerate(report["snapshots"]):
    lines.append(f"| {i + 1} | {s['workdir']} | {s.get('member', 0)} | {s['step']} | {100 * s['error']:.2f} | "
                 f"{s['nll']:.4f} |")
  lines += _members_markdown(report)
  lines += ["", "| last-m ensemble | error (%) | NLL |", "|---|---|---|"]
  for e in report["ensembles"]:
    lines.append(f"| m={e['m']} | {100 * e['error']:.2f} | {e['nll']:.4f} |")
  _, best = best_snapshot(report)
  lines += ["", f"Best single snapshot: {100 * best['error']:.2f}% error; ensemble of the last "
            f"{report['ensemble']['m']}: {100 * report['ensemble']['error']:.2f}% error, "
            f"NLL {report['ensemble']['nll']:.4f}.", ""]
  return "\n".join(lines + _analysis_markdown(report) + uncertainty_report.markdown(report))


def plot_error_vs_m(report: dict[str, Any]):
  """The figure of error_vs_m.png: snapshot i and last-m ensemble errors, integer ticks on the x axis."""
  from matplotlib.ticker import MaxNLocator
  plt = _pyplot()
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


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _nan(values: list) -> np.ndarray:
  """report.json's None (an empty bin, an undefined correlation) back to nan, for plotting."""
  return np.array([np.nan if v is None else v for v in values], np.float64)


def plot_reliability(report: dict[str, Any]):
  """The figure of reliability.png: accuracy against confidence per bin, and ECE of each snapshot and ensemble."""
  from matplotlib.ticker import MaxNLocator
  plt = _pyplot()
  cal = report["calibration"]
  fig, (ax, ax_ece) = plt.subplots(1, 2, figsize=(9, 3.8))
  ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
  curves = [(f"snapshot {i + 1}", c, dict(lw=1, alpha=0.5, marker=".")) for i, c in enumerate(cal["snapshots"])]
  head = cal["ensembles"][report["ensemble"]["m"] - 1]
  curves.append((f"ensemble of the last {head['m']}", head, dict(lw=2, color="k", marker="o", ms=4)))
  for label, c, style in curves:
    conf, acc = _nan(c["reliability"]["confidence"]), _nan(c["reliability"]["accuracy"])
    keep = ~np.isnan(conf)
    ax.plot(conf[keep], acc[keep], label=f"{label} (ECE {100 * c['ece']:.1f}%)", **style)
  ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy",
         title=f"Reliability ({cal['num_bins']} bins)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  num = len(cal["snapshots"])
  ax_ece.plot(range(1, num + 1), [100 * c["ece"] for c in cal["snapshots"]], "o-", label="snapshot i")
  ax_ece.plot([c["m"] for c in cal["ensembles"]], [100 * c["ece"] for c in cal["ensembles"]], "s-",
              label="ensemble of the last m")
  if "ensembles_first_m" in report:
    ax_ece.plot([e["m"] for e in report["ensembles_first_m"]], [100 * e["ece"] for e in report["ensembles_first_m"]],
                "^--", label="ensemble of the first m")
  ax_ece.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax_ece.set(xlabel="snapshot index i / ensemble size m", ylabel="ECE (%)", title="Expected calibration error")
  ax_ece.grid(alpha=0.3)
  ax_ece.legend(fontsize=7)
  fig.suptitle(f"{report['model']} on {report['dataset']}", fontsize=10)
  fig.tight_layout()
  plt.close(fig)
  return fig


def plot_diversity(report: dict[str, Any]):
  """The figure of diversity.png: M x M heatmaps of disagreement (%) and softmax correlation, values written in.

  The colours span the off-diagonal pairs (the diagonal, 0% and 1, is grey), so the differences between pairs show.
  """
  import matplotlib
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 4))
  for ax, key, scale, fmt in ((axes[0], "disagreement", 100, "{:.1f}"), (axes[1], "correlation", 1, "{:.3f}")):
    matrix = np.array([_nan(row) for row in report["diversity"][key]]) * scale
    num = len(matrix)
    off = np.where(np.eye(num, dtype=bool), np.nan, matrix)
    cmap = matplotlib.colormaps["viridis" if key == "disagreement" else "viridis_r"].with_extremes(bad="0.85")
    image = ax.imshow(off, cmap=cmap)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = list(range(num))
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    if num <= 12:
      for i in range(num):
        for j in range(num):
          r, g, b, _ = cmap(image.norm(off[i, j])) if not np.isnan(off[i, j]) else (0.85, 0.85, 0.85, 1)
          ax.text(j, i, "n/a" if np.isnan(matrix[i, j]) else fmt.format(matrix[i, j]), ha="center", va="center",
                  fontsize=7, color="k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w")
    ax.set(xlabel="snapshot j", ylabel="snapshot i",
           title="disagreement (% of test examples)" if key == "disagreement" else "softmax correlation")
  fig.suptitle(f"{report['model']} on {report['dataset']}: snapshot diversity", fontsize=10)
  fig.tight_layout()
  plt.close(fig)
  return fig


def plot_interpolation(report: dict[str, Any]):
  """The figure of interpolation.png: test error along lambda * theta_M + (1 - lambda) * theta_i, per snapshot i."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for e in report["interpolation"]:
    ax.plot(e["lambdas"], [100 * v for v in e["error"]], "o-", ms=3, label=f"snapshot {e['snapshot']} -> last")
  ax.set(xlabel="lambda (0: snapshot i, 1: the last snapshot)", ylabel="test error (%)",
         title=f"{report['model']} on {report['dataset']}: interpolation")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  plt.close(fig)
  return fig
