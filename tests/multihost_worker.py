"""train.py with test probes, for the subprocess tests in test_multihost.py: same flags as train.py.

Probes, set by environment variables (all optional):
  SNAPJAX_WORKER_REPORT=path   write a JSON report (per process: path + ".<process index>") at exit: the rows of
                               each training array this process materialised, its addressable shards, the result.
  SNAPJAX_WORKER_STOP_AT=k     preempt at step k (training.Hooks.stop_at, as the in-process tests do).
  SNAPJAX_WORKER_SIGTERM_AT=k:i send SIGTERM to process i itself at step k (a real preemption notice, one host).
  SNAPJAX_WORKER_AGREE_EVERY=n  hosts compare their preemption flags every n steps (when the JAX service is off).
  SNAPJAX_WORKER_RESTORED=path save the restored train state (this process's copy) to path + ".npz".
  SNAPJAX_WORKER_SAVED=path    save each train state passed to save_state to path + ".<step>.npz" (process 0).
  SNAPJAX_WORKER_PERTURB_ULPS=k move every initial parameter k float32 ulps up or down (random signs, seed 0):
                               a perturbation of the size of summation-order noise (tests/measure_drift.py).
"""
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import train  # noqa: E402
from snapjax import cli, experiment, training  # noqa: E402

_records: list[dict] = []
_result: dict = {}


def _install_probes() -> None:
  """Spy on the host->device placement of the training arrays (a public JAX function, wrapped)."""
  original_callback = jax.make_array_from_callback

  def make_array_from_callback(shape, sharding, callback, *args, **kwargs):
    rows = []

    def spy(index):
      rows.append(index[0].indices(shape[0])[:2])
      return callback(index)

    out = original_callback(shape, sharding, spy, *args, **kwargs)
    _records.append({
        "shape": list(shape), "rows": sorted(rows),
        "addressable_rows": sorted(s.index[0].indices(shape[0])[:2] for s in out.addressable_shards),
        "addressable_devices": sorted(s.device.id for s in out.addressable_shards),
        "fully_addressable": out.is_fully_addressable})
    return out

  jax.make_array_from_callback = make_array_from_callback


def _hooks() -> training.Hooks:
  """The probes that the environment asks for, as training hooks."""
  hooks = training.Hooks()
  stop_at = os.environ.get("SNAPJAX_WORKER_STOP_AT")
  sigterm_at = os.environ.get("SNAPJAX_WORKER_SIGTERM_AT")
  if stop_at:
    hooks.stop_at = lambda step: step == int(stop_at)
  elif sigterm_at:
    step_k, process_i = map(int, sigterm_at.split(":"))

    def sigterm(step):
      if step == step_k and jax.process_index() == process_i:
        os.kill(os.getpid(), signal.SIGTERM)
      return False

    hooks.stop_at = sigterm
  agree_every = os.environ.get("SNAPJAX_WORKER_AGREE_EVERY")
  if agree_every:
    hooks.agree_every = int(agree_every)
  restored_path = os.environ.get("SNAPJAX_WORKER_RESTORED")
  if restored_path:
    hooks.on_state_restored = lambda step, state: _dump(restored_path, state)
  saved_path = os.environ.get("SNAPJAX_WORKER_SAVED")
  if saved_path:

    def saved(step, state):
      if jax.process_index() == 0:  # One writer: every process holds the same replicated state.
        _dump(f"{saved_path}.{step}", state)

    hooks.on_state_saved = saved
  perturb = os.environ.get("SNAPJAX_WORKER_PERTURB_ULPS")
  if perturb:
    hooks.on_init = lambda state: _perturb(state, int(perturb))
  return hooks


def _perturb(state, ulps: int):
  """Every parameter moved `ulps` float32 ulps up or down (random signs, seed 0)."""
  leaves, treedef = jax.tree.flatten(state["params"])
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  moved = []
  for key, p in zip(keys, leaves):
    for _ in range(ulps):
      p = jnp.nextafter(p, jnp.where(jax.random.bernoulli(key, 0.5, p.shape), jnp.inf, -jnp.inf).astype(p.dtype))
    moved.append(p)
  return {**state, "params": jax.tree.unflatten(treedef, moved)}


def _dump(path: str, state) -> None:
  """This process's copy of a replicated pytree, as path.npz keyed by the leaves' key paths."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v.addressable_data(0)) for k, v in leaves})


def _write_report() -> None:
  path = os.environ.get("SNAPJAX_WORKER_REPORT")
  if not path:
    return
  report = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "device_ids": [d.id for d in jax.devices()], "local_device_ids": [d.id for d in jax.local_devices()],
            "mesh_device_ids": [d.id for d in experiment.make_mesh().devices.flat],
            "arrays": _records, "result": _result}
  with open(f"{path}.{jax.process_index()}", "w") as f:
    json.dump(report, f)


def main(argv):
  try:
    _result.update(train.run(argv, hooks=_hooks()).to_dict())
  finally:
    _write_report()


if __name__ == "__main__":
  _install_probes()
  cli.run_guarded(lambda: app.run(main, flags_parser=cli.parse_flags))
