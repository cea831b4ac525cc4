"""How busy the devices are: a compiled step's FLOPs from XLA's cost analysis, the device's peak FLOP/s, and MFU.

FLOPs (`update_flops`): `compiled.cost_analysis()["flops"]`, read once, when a step compiles. XLA counts the
program of one device after SPMD partitioning (data-parallel work split over the devices, replicated work such as
the optimiser's update counted on each), so the FLOPs of one update of every device are that count times the device
count. XLA counts the body of a while loop once, whatever its trip count (HloCostAnalysis; the count is a runtime
value here), so:
  * a dispatch of up to K updates in one `lax.fori_loop` (snapjax/dispatch.py) counts one update: the loop body,
    plus a few bookkeeping ops (tests/test_utilisation.py checks it against the single-step program);
  * members under `lax.map` (member_strategy="map") count one member per device group: `repeats` multiplies it back.
Convolutions count 2 FLOPs per multiply-add of the positions they compute; element-wise ops 1 per element.

Peak (`device_peak`): dense FLOP/s of one device by `jax.devices()[0].device_kind` (PEAK_FLOPS) for the compute
dtype, or config.peak_flops; unknown (None) on CPU and on devices not in the table.

MFU (`measure`): achieved FLOP/s / (peak x devices), the achieved FLOP/s being FLOPs per step x steps per second.
"""
import dataclasses
import math
import re
from typing import Any


@dataclasses.dataclass(frozen=True)
class Peak:
  """A device's dense peak FLOP/s: bfloat16 compute, and float32 at JAX's default precision."""
  name: str
  bfloat16: float
  float32: float  # GPUs from Ampere on: TF32 tensor cores; TPUs: one bfloat16 pass on the MXU; V100: FP32 units.


# (device_kind pattern, peak), the first match wins; dense figures (datasheets give 2x "with sparsity").
PEAK_FLOPS: tuple[tuple[str, Peak], ...] = (
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): SXM BF16 1,979 / TF32 989 TFLOPS with sparsity;
    # PCIe 1,513 / 756. device_kind of the SXM part: "NVIDIA H100 80GB HBM3".
    (r"H100 PCIe", Peak("H100 PCIe", 756e12, 378e12)),
    (r"H100 (SXM|80GB HBM3)", Peak("H100 SXM", 989e12, 495e12)),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): SXM BF16 1,979 / TF32 989 with sparsity.
    (r"H200(?! NVL)", Peak("H200 SXM", 989e12, 495e12)),
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): BF16 312, TF32 156 (SXM4 and PCIe alike).
    (r"A100", Peak("A100", 312e12, 156e12)),
    # NVIDIA V100 datasheet (images.nvidia.com/.../volta-v100-datasheet): FP32 15.7 (SXM2), 14 (PCIe), 16.4 (V100S);
    # no bfloat16 or TF32 tensor cores, so both dtypes run on the FP32 units.
    (r"V100S", Peak("V100S", 16.4e12, 16.4e12)),
    (r"V100-PCIE", Peak("V100 PCIe", 14e12, 14e12)),
    (r"V100", Peak("V100 SXM2", 15.7e12, 15.7e12)),
    # NVIDIA L4 datasheet (nvidia.com/en-us/data-center/l4): BF16 242 / TF32 120 TFLOPS with sparsity.
    (r"\bL4\b", Peak("L4", 121e12, 60e12)),
    # Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): bf16 peak per chip (one
    # JAX device); float32 at default precision runs one bfloat16 pass on the MXU.
    (r"TPU v4", Peak("TPU v4", 275e12, 275e12)),
    (r"TPU v5 ?(lite|e)\b", Peak("TPU v5e", 197e12, 197e12)),
    (r"TPU v5 ?p?$", Peak("TPU v5p", 459e12, 459e12)),
    (r"TPU v6 ?(lite|e)\b", Peak("TPU v6e", 918e12, 918e12)),
)
PEAK_HINT = "peak unknown: set --config.peak_flops"


def find_peak(device_kind: str) -> Peak | None:
  """The PEAK_FLOPS entry of a device kind (e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite"), None if not listed."""
  for pattern, peak in PEAK_FLOPS:
    if re.search(pattern, device_kind, flags=re.IGNORECASE):
      return peak
  return None


def device_peak(device_kind: str, dtype: str, configured: float = 0.0) -> float | None:
  """Peak FLOP/s of one device for compute dtype "bfloat16" or "float32": `configured` if > 0, else the table's."""
  if configured:
    return float(configured)
  peak = find_peak(device_kind)
  return None if peak is None else getattr(peak, dtype)


def cost_analysis(compiled: Any) -> dict[str, float]:
  """`compiled.cost_analysis()` of one device's program as one dict ({} where the backend reports nothing)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Some backends do not implement it; the costs are then unknown.
    return {}
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0] if cost else None
  return dict(cost) if isinstance(cost, dict) else {}


def cost_flops(compiled: Any) -> float | None:
  """XLA's FLOPs of one device's compiled program, None where it reports none."""
  flops = cost_analysis(compiled).get("flops")
  return float(flops) if flops is not None and math.isfinite(flops) and flops > 0 else None


def update_flops(compiled: Any, num_devices: int, repeats: int = 1) -> float | None:
  """FLOPs of one update (one loop step: every member's), all devices together, from a compiled step program.

  The program may run up to K updates in a fori_loop: XLA counts the body once (module docstring). repeats: the trip
  count of a while loop around the update that XLA counted once (members per device group under lax.map).
  """
  flops = cost_flops(compiled)
  return None if flops is None else flops * num_devices * repeats


@dataclasses.dataclass(frozen=True)
class Utilisation:
  """Achieved FLOP/s and MFU over a window of steps (None: unknown)."""
  flops_per_s: float | None
  mfu: float | None

  def text(self) -> str:
    """The progress line's part: '0.25 TFLOP/s MFU 41.3%' or 'MFU n/a (peak unknown: ...)'."""
    if self.flops_per_s is None:
      return "TFLOP/s n/a (no cost analysis)"
    mfu = f"MFU {100 * self.mfu:.1f}%" if self.mfu is not None else f"MFU n/a ({PEAK_HINT})"
    return f"{self.flops_per_s / 1e12:.3g} TFLOP/s {mfu}"

  def scalars(self) -> dict[str, float]:
    """TensorBoard scalars: train/tflops_per_sec and train/mfu (a fraction), those that are known."""
    out = {}
    if self.flops_per_s is not None:
      out["train/tflops_per_sec"] = self.flops_per_s / 1e12
    if self.mfu is not None:
      out["train/mfu"] = self.mfu
    return out


def measure(flops_per_step: float | None, steps_per_s: float, peak_per_device: float | None,
            num_devices: int) -> Utilisation:
  """Achieved FLOP/s = FLOPs per step x steps/s; MFU = achieved / (peak x devices)."""
  if flops_per_step is None:
    return Utilisation(None, None)
  achieved = flops_per_step * steps_per_s
  return Utilisation(achieved, achieved / (peak_per_device * num_devices) if peak_per_device else None)
