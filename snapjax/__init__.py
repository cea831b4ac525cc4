"""snapjax: Snapshot Ensembles (Huang et al., ICLR 2017) in JAX/Flax.

Public API: the paper's learning-rate schedule (an optax schedule), the snapshot steps, and the
fused ensemble evaluator and its serving artifact (`export_ensemble`, `load_exported`); the paper's analyses as
batch sums (`calibration_counts`, `diversity_counts`) and snapshots in weight space (`average_snapshots`,
`interpolate_snapshots`, `recompute_batch_stats`). Models: `snapjax.models.get(name, num_classes)`; SmoothOut
noise and its schedule: `snapjax.smoothout`; temperature scaling, OOD metrics, conformal sets, risk-coverage and the
deep-ensemble equivalent of per-example outputs: `snapjax.uncertainty`.
"""
from snapjax import models, smoothout, uncertainty
from snapjax.analysis import CalibrationCounts, DiversityCounts, calibration_counts, diversity_counts
from snapjax.ensemble import counts, ensemble_predict, error_rate, nll, stack_snapshots
from snapjax.export import export_ensemble, load_exported
from snapjax.schedules import (
    nocycle_snapshot_steps, snapshot_schedule, snapshot_steps, step_schedule, steps_for_epochs)
from snapjax.weight_space import average_snapshots, interpolate_snapshots, recompute_batch_stats

__all__ = [
    "CalibrationCounts", "DiversityCounts", "average_snapshots", "calibration_counts", "counts",
    "diversity_counts", "ensemble_predict", "error_rate", "export_ensemble", "interpolate_snapshots",
    "load_exported", "models", "nll", "nocycle_snapshot_steps", "recompute_batch_stats", "smoothout",
    "snapshot_schedule", "snapshot_steps", "stack_snapshots", "step_schedule", "steps_for_epochs", "uncertainty",
]
__version__ = "0.1.0"
