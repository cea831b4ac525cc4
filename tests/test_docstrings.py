"""The docstring examples of the public API run and print what they claim, so a stale one fails CI."""
import doctest

import pytest

from snapjax import analysis, ensemble, export, schedules, uncertainty, weight_space

# Every public function (and Counts) documents itself with an `Examples:` section; the totals are the
# `>>>` lines written, so deleting examples fails here too.
DOCUMENTED = {
    schedules: (("snapshot_schedule", "snapshot_steps", "step_schedule", "nocycle_snapshot_steps",
                 "steps_for_epochs"), 15),
    ensemble: (("stack_snapshots", "ensemble_predict", "resolve_strategy", "counts", "error_rate", "nll",
                "Counts", "num_members", "leaf_name", "check_metric_args"), 52),
    export: (("export_ensemble", "load_exported"), 15),
    analysis: (("calibration_counts", "diversity_counts", "CalibrationCounts", "DiversityCounts"), 32),
    weight_space: (("average_snapshots", "interpolate_snapshots", "recompute_batch_stats"), 20),
    uncertainty: (("fit_temperature", "auroc", "split_conformal", "deep_ensemble_equivalent"), 16),
}


@pytest.mark.parametrize("module", list(DOCUMENTED), ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
  names, num_examples = DOCUMENTED[module]
  found = {t.name.rsplit(".", 1)[-1]: t for t in doctest.DocTestFinder().find(module) if t.examples}
  for name in names:
    assert name in found and "Examples:" in getattr(module, name).__doc__, f"{name} lacks examples"
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0
  assert result.attempted >= num_examples
