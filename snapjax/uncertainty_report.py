"""report.md sections and figures of the uncertainty analyses (`uncertainty_analyses`; keys documented there).

Figures: temperature.png (reliability of the headline ensemble before and after temperature scaling), ood.png (the
ensemble's score histograms, in-distribution against each OOD set), shift.png (error and NLL per severity, a box
over the corruptions), conformal.png (coverage and mean set size per method and alpha), risk_coverage.png.
"""
from typing import Any, Callable

import numpy as np


def _pct(v: float) -> str:
  return f"{100 * v:.2f}"


def _label(e: dict[str, Any]) -> str:
  return f"last-{e['m']} ensemble" if "m" in e else f"snapshot {e['snapshot']} (step {e['step']})"


def summary(report: dict[str, Any]) -> list[str]:
  """Lines for eval.py's output: the headline ensemble's calibrated NLL, OOD AUROC, shift and conformal sets."""
  lines, m = [], report["ensemble"]["m"]
  if "temperature" in report:
    cv = report["temperature"]["ensembles"][m - 1]["test_cv"]
    val = report["temperature"]["ensembles"][m - 1].get("val")
    lines.append(f"ensemble of last {m} calibrated NLL {cv['nll']:.4f} (test-CV, T {cv['temperature']:.3f})"
                 + (f", {val['nll']:.4f} (val T {val['temperature']:.3f})" if val else ""))
  if "ood" in report and report["ood"]["sets"]:
    lines.append("OOD AUROC (max prob): " + ", ".join(f"{k} {v['ensemble']['max_prob']['auroc']:.4f}"
                                                     for k, v in report["ood"]["sets"].items()))
  if "shift" in report:
    lines.append("shifted error per severity: " + ", ".join(
        f"{r['severity']}: {100 * r['error']:.2f}%" for r in report["shift"]["per_severity"]["ensemble"]))
  if "conformal" in report:
    c = report["conformal"]["ensemble"]
    lines.append("conformal alpha 0.1 coverage/size: " + ", ".join(
        f"{k} {100 * v['0.1']['coverage']:.2f}%/{v['0.1']['size']:.2f}" for k, v in c.items()))
  return lines


def markdown(report: dict[str, Any]) -> list[str]:
  """report.md's lines for the uncertainty analyses present in the report."""
  lines = []
  if "temperature" in report:
    t = report["temperature"]
    val = t["val_split"]
    lines += ["## Temperature scaling", "",
              f"softmax(log(mean_m p_m) / T), T minimising NLL. test-CV: T fitted on a random half of the test set "
              f"and scored on the other half, both ways, {t['repeats']} halvings (mean ± std)"
              + (f"; val: T fitted on {val!r}, scored on the whole test set." if val else "; no val_split."), "",
              "| model | NLL | ECE (%) | Brier | T (test-CV) | NLL (test-CV) | ECE (%) (test-CV) | Brier (test-CV) |"
              + (" T (val) | NLL (val) | ECE (%) (val) |" if val else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if val else "")]
    for e in t["snapshots"] + t["ensembles"]:
      b, cv = e["before"], e["test_cv"]
      row = (f"| {_label(e)} | {b['nll']:.4f} | {_pct(b['ece'])} | {b['brier']:.4f} | {cv['temperature']:.3f} | "
             f"{cv['nll']:.4f} ± {cv['nll_std']:.4f} | {_pct(cv['ece'])} | {cv['brier']:.4f} |")
      if val:
        v = e["val"]
        row += f" {v['temperature']:.3f} | {v['nll']:.4f} | {_pct(v['ece'])} |"
      lines.append(row)
    lines.append("")
  if "selective" in report:
    s = report["selective"]
    lines += ["## Selective prediction", "", "Confidence = max probability; AURC = mean error over the k most "
              "confident, k = 1..N; risk_coverage.png.", "", "| model | AURC | error at 80% | error at 90% |",
              "|---|---|---|---|"]
    lines += [f"| {_label(e)} | {e['aurc']:.4f} | {_pct(e['error_at_80'])} | {_pct(e['error_at_90'])} |"
              for e in s["snapshots"] + s["ensembles"]]
    lines.append("")
  if "conformal" in report:
    c = report["conformal"]
    lines += ["## Conformal prediction sets", "", f"Split conformal on the mean softmax: calibrated on a random half "
              f"of the test set, measured on the other, {c['repeats']} repeats; best snapshot = snapshot "
              f"{c['best_snapshot_index']}; conformal.png.", "",
              "| model | method | alpha | coverage (%) | mean set size |", "|---|---|---|---|---|"]
    for model in ("ensemble", "best_snapshot"):
      for method, per in c[model].items():
        for alpha, v in per.items():
          lines.append(f"| {model} | {method} | {alpha} | {_pct(v['coverage'])} | {v['size']:.3f} |")
    lines.append("")
  if "dee" in report:
    d = report["dee"]
    lines += ["## Deep-ensemble equivalent", "", "Calibrated NLL (test-CV) of the deep ensembles of the first k "
              "independently trained members' final snapshots: " + ", ".join(
                  f"k={e['size']}: {e['calibrated_nll']:.4f}" for e in d["deep_ensembles"]) + ".", "",
              "| model | calibrated NLL | DEE |", "|---|---|---|"]
    bound = lambda e: f" ({e['bound']})" if e["bound"] else ""
    lines += [f"| {_label(e)} | {e['calibrated_nll']:.4f} | {e['dee']:.2f}{bound(e)} |"
              for e in d["snapshots"] + d["ensembles"]]
    lines.append("")
  if "ood" in report:
    o = report["ood"]
    lines += ["## Out-of-distribution detection", "", "OOD positive; scores: max prob, entropy of the mean, mutual "
              "information (ensembles), energy of the mean logits; ood.png.", "",
              "| OOD set | model | score | AUROC | AUPR | FPR at 95% TPR |", "|---|---|---|---|---|---|"]
    for name, entry in o["sets"].items():
      for model in ("ensemble", "best_snapshot"):
        for score, v in entry[model].items():
          lines.append(f"| {name} ({entry['num_examples']}) | {model} | {score} | {v['auroc']:.4f} | "
                       f"{v['aupr']:.4f} | {_pct(v['fpr95'])} |")
    lines += [f"- {line}" for line in o["skipped"]]
    lines.append("")
  if "shift" in report:
    sh = report["shift"]
    temps = ", ".join(f"{k} {v:.3f}" for k, v in sh["temperature"].items())
    lines += ["## Dataset shift", "", f"{len(sh['corruptions'])} corruptions ({', '.join(sh['corruptions'])}) x "
              f"{len(sh['severities'])} severities of the first {sh['examples']} test examples; means over the "
              f"corruptions; NLL scaled with the clean T ({temps}); "
              f"shift.png.", "",
              "| model | severity | error (%) | NLL | NLL (T) | ECE (%) |", "|---|---|---|---|---|---|"]
    for model, rows in sh["per_severity"].items():
      c = sh["clean"][model]
      lines.append(f"| {model} | 0 (clean) | {_pct(c['error'])} | {c['nll']:.4f} | {c['nll_scaled']:.4f} | "
                   f"{_pct(c['ece'])} |")
      lines += [f"| {model} | {r['severity']} | {_pct(r['error'])} | {r['nll']:.4f} | {r['nll_scaled']:.4f} | "
                f"{_pct(r['ece'])} |" for r in rows]
    c10c = sh.get("cifar10_c")
    if c10c and "skipped" in c10c:
      lines += ["", f"- CIFAR-10-C: {c10c['skipped']}"]
    elif c10c:
      lines += ["", f"CIFAR-10-C (TFDS, {len(c10c['cells'])} configs), means per severity:", "",
                "| model | severity | error (%) | NLL | NLL (T) | ECE (%) |", "|---|---|---|---|---|---|"]
      lines += [f"| {model} | {r['severity']} | {_pct(r['error'])} | {r['nll']:.4f} | {r['nll_scaled']:.4f} | "
                f"{_pct(r['ece'])} |" for model, rows in c10c["per_severity"].items() for r in rows]
    lines.append("")
  if report.get("uncertainty_notes"):
    lines += [f"- {n}" for n in report["uncertainty_notes"]] + [""]
  return lines


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _reliability(logp_conf_acc: dict[str, Any]):
  conf = np.array([np.nan if v is None else v for v in logp_conf_acc["confidence"]])
  acc = np.array([np.nan if v is None else v for v in logp_conf_acc["accuracy"]])
  keep = ~np.isnan(conf)
  return conf[keep], acc[keep]


def plot_temperature(report: dict[str, Any]):
  """Reliability of the headline ensemble before and after temperature scaling (test T), and T of every model."""
  plt = _pyplot()
  t = report["temperature"]
  head = t["ensembles"][report["ensemble"]["m"] - 1]
  fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(9, 3.8))
  ax.plot([0, 1], [0, 1], "k--", lw=1)
  for key, name in (("before", "before"), ("test_t", f"after (T = {head['test_t']['temperature']:.2f})")):
    rel = head[key]["reliability"]
    conf, acc = _reliability(rel)
    ax.plot(conf, acc, "o-", ms=4, label=f"{name}, ECE {100 * head[key]['ece']:.2f}%")
  ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
         title=f"last-{head['m']} ensemble: reliability")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  num = len(t["snapshots"])
  ax_t.plot(range(1, num + 1), [e["test_cv"]["temperature"] for e in t["snapshots"]], "o-", label="snapshot i")
  ax_t.plot([e["m"] for e in t["ensembles"]], [e["test_cv"]["temperature"] for e in t["ensembles"]], "s-",
            label="last-m ensemble")
  ax_t.set(xlabel="snapshot i / ensemble size m", ylabel="T (test-CV)", title="fitted temperature")
  ax_t.legend(fontsize=7)
  ax_t.grid(alpha=0.3)
  fig.tight_layout()
  plt.close(fig)
  return fig


def plot_ood(report: dict[str, Any]):
  """Histograms of the ensemble's OOD scores: in-distribution test set against each OOD set, per score."""
  plt = _pyplot()
  hists = report["ood"]["histograms"]
  names = list(hists)
  scores = list(next(iter(hists.values()))) if names else []
  fig, axes = plt.subplots(max(len(names), 1), max(len(scores), 1), figsize=(3 * max(len(scores), 1),
                                                                         2.4 * max(len(names), 1)), squeeze=False)
  for r, name in enumerate(names):
    for c, score in enumerate(scores):
      h, ax = hists[name][score], axes[r][c]
      edges = np.array(h["edges"])
      for key, colour in (("in", "C0"), ("out", "C3")):
        counts = np.array(h[key], np.float64)
        ax.stairs(counts / max(counts.sum(), 1), edges, fill=True, alpha=0.5, color=colour,
                  label="test set" if key == "in" else name)
      ax.set_title(f"{name}: {score}", fontsize=8)
      ax.tick_params(labelsize=6)
      if c == 0:
        ax.legend(fontsize=6)
  fig.tight_layout()
  plt.close(fig)
  return fig


def plot_shift(report: dict[str, Any]):
  """Error and NLL of the ensemble per severity, a box over the corruptions (severity 0: clean)."""
  plt = _pyplot()
  sh = report["shift"]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, key, scale, name in ((axes[0], "error", 100, "error (%)"), (axes[1], "nll", 1, "NLL")):
    for offset, (model, colour) in zip((-0.18, 0.18), (("ensemble", "C0"), ("best_snapshot", "C1"))):
      data = [[scale * c[model][key] for c in sh["cells"] if c["severity"] == s] for s in sh["severities"]]
      pos = np.array(sh["severities"], np.float64) + offset
      ax.boxplot(data, positions=pos, widths=0.3, patch_artist=True,
                 boxprops={"facecolor": colour, "alpha": 0.5}, medianprops={"color": "k"}, showfliers=True)
      ax.plot([offset], [scale * sh["clean"][model][key]], "o", color=colour, label=model)
    ax.set_xticks(range(0, len(sh["severities"]) + 1), ["clean", *[str(s) for s in sh["severities"]]])
    ax.set(xlabel="severity", ylabel=name, title=f"{name} under shift")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  plt.close(fig)
  return fig


def plot_conformal(report: dict[str, Any]):
  """Coverage and mean set size per method and alpha, ensemble against best snapshot."""
  plt = _pyplot()
  c = report["conformal"]
  fig, (ax_c, ax_s) = plt.subplots(1, 2, figsize=(9, 3.5))
  labels = [f"{m}\n{a}" for m in c["ensemble"] for a in c["ensemble"][m]]
  x = np.arange(len(labels))
  for offset, model in ((-0.2, "ensemble"), (0.2, "best_snapshot")):
    rows = [c[model][m][a] for m in c[model] for a in c[model][m]]
    ax_c.bar(x + offset, [100 * r["coverage"] for r in rows], 0.4, label=model)
    ax_s.bar(x + offset, [r["size"] for r in rows], 0.4, label=model)
  for alpha in c["alphas"]:
    ax_c.axhline(100 * (1 - alpha), color="k", lw=0.8, ls="--")
  ax_c.set_xticks(x, labels, fontsize=7)
  ax_s.set_xticks(x, labels, fontsize=7)
  lo = min(100 * (1 - max(c["alphas"])) - 5, 85)
  ax_c.set(ylim=(lo, 100), ylabel="coverage (%)", title="coverage (dashed: 1 - alpha)")
  ax_s.set(ylabel="mean set size", title="set size")
  ax_c.legend(fontsize=7)
  fig.tight_layout()
  plt.close(fig)
  return fig


def plot_risk_coverage(report: dict[str, Any]):
  plt = _pyplot()
  curves = report["selective"]["curves"]
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for name, curve in curves.items():
    ax.plot(np.array(curve["coverage"]) * 100, np.array(curve["risk"]) * 100, label=name)
  ax.set(xlabel="coverage (%)", ylabel="error among the covered (%)", title="risk-coverage (confidence = max prob)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  plt.close(fig)
  return fig


FIGURES: dict[str, tuple[str, Callable[[dict[str, Any]], Any]]] = {
    "temperature": ("temperature", plot_temperature), "ood": ("ood", plot_ood), "shift": ("shift", plot_shift),
    "conformal": ("conformal", plot_conformal), "risk_coverage": ("selective", plot_risk_coverage)}
