"""Snapshots restore on any device count: with README's plain-orbax line and with snapjax's own restore."""
import os
import pickle
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from snapjax import checkpoints

import helpers

STEP = 7


def _readme_restore_line() -> str:
  """README's plain-orbax restore line, `variables = ocp.StandardCheckpointer().restore(...)`, as written."""
  with open(os.path.join(helpers.ROOT, "README.md")) as f:
    lines = [l for l in f.read().splitlines() if "StandardCheckpointer().restore(" in l]
  assert len(lines) == 1, lines
  return lines[0]


@pytest.mark.devices(2)
def test_snapshot_saved_on_2_devices_restores_on_1_with_readmes_line(tmp_path):
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  replicated = NamedSharding(mesh, P())
  rng = np.random.default_rng(0)
  saved = {"params": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
                      "half": rng.normal(size=(5,)).astype(jnp.bfloat16)},
           "batch_stats": {"bn": {"mean": rng.normal(size=(2, 4)).astype(np.float32)}}}
  variables = jax.device_put(saved, replicated)
  workdir = str(tmp_path / "run")
  ckpt = checkpoints.RunCheckpoints(workdir)
  ckpt.save_snapshot(STEP, variables, {"step": STEP})
  ckpt.wait()
  path = ckpt.snapshot_path(STEP) + "/variables"
  ckpt.close()

  # README's line, path replaced, in a process with 1 CPU device; then snapjax's own restore there.
  line = re.sub(r'"[^"]*"', lambda _: repr(path), _readme_restore_line(), count=1)
  out = str(tmp_path / "restored.pkl")
  script = textwrap.dedent(f"""
      import os
      import pickle
      import jax, numpy as np
      import orbax.checkpoint as ocp
      from snapjax import checkpoints
      assert jax.device_count() == 1, jax.devices()
      {line}
      leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
      abstract = checkpoints.abstract_like(variables, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
      ckpt = checkpoints.RunCheckpoints({workdir!r}, read_only=True)
      own, meta = ckpt.restore_snapshot({STEP}, abstract)
      ckpt.close()
      own = dict(jax.tree_util.tree_flatten_with_path(own)[0])
      arrays = {{}}
      for p, a in leaves:
        arrays["readme" + jax.tree_util.keystr(p)] = np.asarray(a)
        arrays["own" + jax.tree_util.keystr(p)] = np.asarray(own[p])
      with open({out!r}, "wb") as f:
        pickle.dump(arrays, f)  # Not npz: it loses bfloat16.
  """)
  proc = helpers.run_python(["-c", script], helpers.subprocess_env(1), 120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out, "rb") as f:
    restored = pickle.load(f)
  assert len(restored) == 2 * len(jax.tree.leaves(saved))
  for p, want in jax.tree_util.tree_flatten_with_path(saved)[0]:
    for how in ("readme", "own"):
      got = restored[how + jax.tree_util.keystr(p)]
      assert got.dtype == want.dtype and got.shape == want.shape, (how, p, got.dtype, got.shape)
      np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=f"{how} {p}")
