"""snapjax: Snapshot Ensembles (Huang et al., ICLR 2017) in JAX/Flax.

Public API: the paper's learning-rate schedule (an optax schedule), the snapshot steps, and the
fused ensemble evaluator and its serving artifact (`export_ensemble`, `load_exported`); the paper's analyses as
batch sums (`calibration_counts`, `diversity_counts`) and snapshots in weight space (`average_snapshots`,
`interpolate_snapshots`, `recompute_batch_stats`). Models: `snapjax.models.get(name, num_classes)`; SmoothOut
noise and its schedule: `snapjax.smoothout`. The methods that followed: FGE's and SWA's schedules
(`fge_schedule`, `fge_snapshot_steps`, `swa_schedule`, `averaging_steps`) and SWAG's posterior (`snapjax.swag`,
`swag_sample`). Temperature scaling, OOD metrics, conformal sets, risk-coverage and the deep-ensemble equivalent of
per-example outputs: `snapjax.uncertainty`.
"""
from snapjax import models, smoothout, swag, uncertainty
from snapjax.analysis import CalibrationCounts, DiversityCounts, calibration_counts, diversity_counts
from snapjax.ensemble import counts, ensemble_predict, error_rate, nll, stack_snapshots
from snapjax.export import export_ensemble, load_exported
from snapjax.schedules import (
    averaging_steps, fge_schedule, fge_snapshot_steps, nocycle_snapshot_steps, snapshot_schedule, snapshot_steps,
    step_schedule, steps_for_epochs, swa_schedule)
from snapjax.swag import swag_sample
from snapjax.weight_space import average_snapshots, interpolate_snapshots, recompute_batch_stats

__all__ = [
    "CalibrationCounts", "DiversityCounts", "average_snapshots", "averaging_steps", "calibration_counts", "counts",
    "diversity_counts", "ensemble_predict", "error_rate", "export_ensemble", "fge_schedule", "fge_snapshot_steps",
    "interpolate_snapshots", "load_exported", "models", "nll", "nocycle_snapshot_steps", "recompute_batch_stats",
    "smoothout", "snapshot_schedule", "snapshot_steps", "stack_snapshots", "step_schedule", "steps_for_epochs",
    "swa_schedule", "swag", "swag_sample", "uncertainty",
]
__version__ = "0.1.0"
