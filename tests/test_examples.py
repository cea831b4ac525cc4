"""The README's library example runs as written and its ensemble is the mean of the snapshots' softmaxes."""
import os
import runpy

import jax
import numpy as np


def test_library_example_runs_and_ensembles_the_last_two_snapshots():
  g = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "examples", "library.py"))
  assert len(g["snapshots"]) == 3
  x = np.asarray(g["x"])
  member_probs = []
  for snap in g["snapshots"][-2:]:  # Naive reference: each snapshot on its own, NumPy softmax.
    logits = np.asarray(g["model"].apply(snap, x, train=False), np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    member_probs.append(e / e.sum(-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(g["probs"]), np.mean(member_probs, 0), atol=2e-5)
  assert jax.tree.leaves(g["stacked"])[0].shape[0] == 3
