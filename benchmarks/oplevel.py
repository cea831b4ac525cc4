"""Per-op time of one compiled snapjax step (jax.profiler) and of a PyTorch step (torch.profiler), by category.

Used by train_step.py --profile. The JAX side traces a few steps, reads the trace's XLA:CPU op events (each
top-level HLO instruction, and those inside conditionals, as executed by XLA's worker threads) and joins them
with the compiled module's optimized HLO text to name each op's kind:

  conv fwd / conv dgrad / conv wgrad: a convolution (XLA:CPU runs it as a YNNPACK `ynn_fusion` or a plain
    `convolution`), sorted by its metadata (forward vs `transpose(...)` = backward) and its sizes (a backward
    convolution whose output is smaller than both operands is a weight gradient); a dot likewise;
  transpose/copy: layout changes, with whatever XLA fused into them;
  elementwise/reduce: every other fusion (BatchNorm, ReLU, residual adds, optimizer update, ...).

Times are the profiler's per-op durations summed over XLA's threads, per step; their total can exceed the
step's wall time when two ops ran at once on the two cores.
"""
import collections
import glob
import gzip
import json
import re
import tempfile

import jax

STEPS = 3


def _hlo_ops(hlo_text: str) -> tuple[dict, dict]:
  """(instruction name -> (shape, opcode, line), computation name -> its lines) of an HLO module's text."""
  ops, comps, current = {}, collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line)
    if head:
      current = head.group(1)
      continue
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+?(?:\{[^}]*\})?) ([\w\-]+)\(", line)
    if m:
      ops[m.group(1)] = (m.group(2).split("{")[0], m.group(3), line)
      if current:
        comps[current].append(line)
  return ops, comps


def _numel(shape: str) -> int:
  dims = re.findall(r"\[([\d,]*)\]", shape)
  n = 1
  for d in (dims[0].split(",") if dims and dims[0] else []):
    n *= int(d)
  return n


def _operand_shapes(line: str, ops: dict) -> list[str]:
  args = line.split("=", 1)[1]
  args = args[args.index("(") + 1:]
  return [ops[o][0] for o in re.findall(r"%([\w.\-]+)", args.split("), ")[0]) if o in ops]


def _classify(name: str, ops: dict, comps: dict) -> str:
  if name not in ops:
    return "other"
  shape, opcode, line = ops[name]
  body = [line]
  called = re.search(r"calls=%?([\w.\-]+)", line)
  if called:
    body += comps.get(called.group(1), [])
  text = "\n".join(body)
  inner = [ln for ln in body if re.search(r"= \S+ (convolution|dot)\(", ln)]
  if inner:
    kind = "conv" if " convolution(" in inner[0] else "dot"
    out = _numel(shape)
    operands = [_numel(s) for s in _operand_shapes(line, ops)]
    if len(operands) >= 2 and all(out < o for o in operands) and out < 1e6:
      return f"{kind} wgrad"  # Output (a kernel gradient) smaller than both operands (activations, gradients).
    meta = re.search(r'op_name="([^"]*)"', inner[0])
    backward = bool(meta and "transpose(" in meta.group(1))
    if kind == "dot":
      return "dot (classifier)"
    return "conv dgrad" if backward else "conv fwd"
  if opcode in ("transpose", "copy") or re.search(r"= \S+ (transpose|copy)\(", text):
    return "transpose/copy"
  if opcode in ("conditional", "while", "call"):
    return "control flow"
  return "elementwise/reduce"


def jax_op_times(run, compiled, steps: int = STEPS) -> tuple[dict, dict]:
  """({op name: ms per step}, {category: ms per step}) of `run()` (one step) under jax.profiler."""
  trace_dir = tempfile.mkdtemp(prefix="snapjax-profile-")
  jax.profiler.start_trace(trace_dir)
  for _ in range(steps):
    run()
  jax.profiler.stop_trace()
  path = sorted(glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz"))[-1]
  with gzip.open(path) as f:
    trace = json.load(f)
  threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  per_op = collections.defaultdict(float)
  for e in trace["traceEvents"]:
    if e.get("ph") != "X" or "XLAEigen" not in threads.get((e["pid"], e.get("tid")), ""):
      continue
    if e["name"].startswith(("ThunkExecutor", "end:", "Threadpool", "SlinkyThreadPool")):
      continue
    per_op[e["name"]] += e["dur"] / 1e3 / steps
  ops, comps = _hlo_ops(compiled.as_text())
  per_cat = collections.defaultdict(float)
  for name, ms in per_op.items():
    per_cat[_classify(name, ops, comps)] += ms
  return dict(per_op), dict(per_cat)


def print_jax_profile(impl, top: int = 12) -> None:
  per_op, per_cat = jax_op_times(lambda: impl.run(1), impl.compiled)
  ops, comps = _hlo_ops(impl.compiled.as_text())
  total = sum(per_cat.values())
  print(f"op time summed over XLA's threads: {total:.0f} ms/step\n")
  print("| category | ms/step | share |")
  print("|---|---|---|")
  for cat, ms in sorted(per_cat.items(), key=lambda kv: -kv[1]):
    if ms >= 0.05:
      print(f"| {cat} | {ms:.1f} | {ms / total:.0%} |")
  print(f"\n| top {top} ops | kind | output | operands | ms/step |")
  print("|---|---|---|---|---|")
  for name, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
    shape, _, line = ops.get(name, ("?", "?", ""))
    operands = ", ".join(_operand_shapes(line, ops)[:3]) if line else ""
    print(f"| {name} | {_classify(name, ops, comps)} | {shape} | {operands} | {ms:.1f} |")


_TORCH_CATEGORIES = [
    ("conv fwd", ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution")),
    ("conv bwd (dgrad + wgrad)", ("aten::convolution_backward",)),
    ("batchnorm fwd", ("aten::native_batch_norm", "aten::_batch_norm_impl_index", "aten::batch_norm")),
    ("batchnorm bwd", ("aten::native_batch_norm_backward",)),
]


def print_torch_profile(impl, steps: int = STEPS, top: int = 12) -> None:
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      impl.run(1)
  rows = [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()]
  per_cat = collections.defaultdict(float)
  for key, ms in rows:
    cat = next((c for c, keys in _TORCH_CATEGORIES if key in keys), "other (elementwise, optimizer, autograd)")
    per_cat[cat] += ms
  total = sum(per_cat.values())
  print(f"self CPU time of the main thread's ops: {total:.0f} ms/step\n")
  print("| category | ms/step | share |")
  print("|---|---|---|")
  for cat, ms in sorted(per_cat.items(), key=lambda kv: -kv[1]):
    print(f"| {cat} | {ms:.1f} | {ms / total:.0%} |")
  print(f"\n| top {top} ops | ms/step |")
  print("|---|---|")
  for key, ms in sorted(rows, key=lambda kv: -kv[1])[:top]:
    print(f"| {key} | {ms:.1f} |")
