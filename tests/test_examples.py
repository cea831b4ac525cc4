"""The README's library example runs as written: its ensemble is the mean of the snapshots' softmaxes, its averaged
weights the NumPy mean of the last two snapshots' with BatchNorm statistics of the averaged network."""
import os
import runpy

import jax
import numpy as np
import pytest


@pytest.mark.slow
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
  # The analysis: parameters are the NumPy mean of the last two snapshots'; statistics are the batch's own,
  # read off a training-mode apply at zero running statistics (snapjax.models' momentum is 0.9).
  averaged = g["averaged"]
  mean = jax.tree.map(lambda a, b: (np.float64(a) + np.float64(b)) / 2, *[s["params"] for s in g["snapshots"][-2:]])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), averaged["params"], mean)
  zeros = jax.tree.map(np.zeros_like, averaged["batch_stats"])
  _, new = g["model"].apply({"params": averaged["params"], "batch_stats": zeros}, x, train=True,
                            mutable=["batch_stats"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.float64(b) / 0.1, rtol=1e-4, atol=1e-5),
               averaged["batch_stats"], new["batch_stats"])
