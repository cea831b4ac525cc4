"""snapjax: Snapshot Ensembles (Huang et al., ICLR 2017) in JAX/Flax.

Public API: the paper's learning-rate schedule (an optax schedule), the snapshot steps, and the
fused ensemble evaluator and its serving artifact (`export_ensemble`, `load_exported`). Models:
`snapjax.models.get(name, num_classes)`; SmoothOut noise and its schedule: `snapjax.smoothout`.
"""
from snapjax import models, smoothout
from snapjax.analysis import CalibrationCounts, DiversityCounts, calibration_counts, diversity_counts
from snapjax.ensemble import counts, ensemble_predict, error_rate, nll, stack_snapshots
from snapjax.export import export_ensemble, load_exported
from snapjax.schedules import (
    nocycle_snapshot_steps, snapshot_schedule, snapshot_steps, step_schedule, steps_for_epochs)

__all__ = [
    "CalibrationCounts", "DiversityCounts", "calibration_counts", "counts", "diversity_counts",
    "ensemble_predict", "error_rate", "export_ensemble", "load_exported", "models", "nll",
    "nocycle_snapshot_steps", "smoothout", "snapshot_schedule", "snapshot_steps", "stack_snapshots",
    "step_schedule", "steps_for_epochs",
]
__version__ = "0.1.0"
