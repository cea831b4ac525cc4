"""CRC32 of every array of every snapshot of a workdir, to check that a change keeps a run's numbers bit for bit.

  python scripts/snapshot_crcs.py WORKDIR [--out crcs.json] [--against before.json]

Train the same config before and after a change on the same machine (the numbers are bitwise deterministic on one
kind of CPU, not across kinds), then compare: `--against` exits 1 naming the arrays that differ. The snapshots are
read back as eval.py reads them (`evaluation.restore_members`), so a K-member run gives every member's arrays.
"""
import argparse
import json
import os
import sys
import zlib

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # This checkout's snapjax.

from snapjax import evaluation, experiment  # noqa: E402


def snapshot_crcs(workdir: str) -> dict[str, str]:
  """{'STEP/memberK/PATH': CRC32 hex} of every array of every committed snapshot of the workdir."""
  exp = experiment.build(evaluation.load_run_config(workdir))
  out = {}
  for m in evaluation.restore_members([workdir], exp):
    for path, leaf in jax.tree_util.tree_flatten_with_path(m.variables)[0]:
      array = np.ascontiguousarray(np.asarray(leaf))
      out[f"{m.step}/member{m.member}/{jax.tree_util.keystr(path)}"] = f"{zlib.crc32(array.tobytes()):08x}"
  return out


def combined(crcs: dict[str, str]) -> str:
  """One CRC32 over every (array, CRC32) pair, in sorted order: equal runs print the same value."""
  lines = "".join(f"{k}={v}\n" for k, v in sorted(crcs.items()))
  return f"{zlib.crc32(lines.encode()):08x}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("workdir")
  p.add_argument("--out", help="write the CRC32s as JSON here")
  p.add_argument("--against", help="a JSON written by --out: report every array that differs")
  args = p.parse_args(argv)
  crcs = snapshot_crcs(args.workdir)
  print(f"{len(crcs)} arrays, combined CRC32 {combined(crcs)}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(crcs, f, indent=1, sort_keys=True)
  if args.against:
    with open(args.against) as f:
      before = json.load(f)
    differ = sorted(k for k in set(before) | set(crcs) if before.get(k) != crcs.get(k))
    if differ:
      print(f"{len(differ)} of {len(set(before) | set(crcs))} arrays differ from {args.against}, first: {differ[:5]}")
      return 1
    print(f"bitwise equal to {args.against}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
