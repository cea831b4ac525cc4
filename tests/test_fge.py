"""FGE's and SWA's schedules against NumPy transcriptions of the reference code, and FGE's collection steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from snapjax import config as config_lib, schedules, train_step
from snapjax.errors import ConfigError


def reference_pretrain_lr(base_lr, epoch, total_epochs):
  """dnn-mode-connectivity train.py learning_rate_schedule, epoch 1-based (its loop runs 1..epochs)."""
  alpha = epoch / total_epochs
  if alpha <= 0.5:
    factor = 1.0
  elif alpha <= 0.9:
    factor = 1.0 - (alpha - 0.5) / 0.4 * 0.99
  else:
    factor = 0.01
  return factor * base_lr


def reference_cyclic_lr(epoch, cycle, alpha_1, alpha_2):
  """dnn-mode-connectivity utils.cyclic_learning_rate: called per epoch, then per iteration with iter / n_iters."""
  def schedule(it):
    t = ((epoch % cycle) + it) / cycle
    if t < 0.5:
      return alpha_1 * (1.0 - 2.0 * t) + alpha_2 * 2.0 * t
    return alpha_1 * (2.0 * t - 1.0) + alpha_2 * (2.0 - 2.0 * t)
  return schedule


def reference_fge_run(lr, lr1, lr2, epochs, pretrain_epochs, cycle, n_iters):
  """Every update's lr and the collection points of train.py (pretrain_epochs of `epochs`) then fge.py."""
  lrs, collected = [], []
  for epoch in range(1, pretrain_epochs + 1):
    lrs += [reference_pretrain_lr(lr, epoch, epochs)] * n_iters
  for epoch in range(epochs - pretrain_epochs):  # fge.py --epochs = what is left of the budget.
    schedule = reference_cyclic_lr(epoch, cycle, lr1, lr2)
    lrs += [schedule(i / n_iters) for i in range(n_iters)]
    if epoch % cycle + 1 == cycle // 2:
      collected.append(len(lrs))  # After this epoch's last update (1-based update count).
  return np.array(lrs), collected


@pytest.mark.parametrize("epochs, pretrain, cycle, n_iters", [(10, 6, 2, 7), (20, 12, 4, 5), (15, 8, 2, 3)])
def test_fge_lr_at_every_update_and_collection_steps_match_the_reference(epochs, pretrain, cycle, n_iters):
  lrs, collected = reference_fge_run(0.1, 0.05, 0.01, epochs, pretrain, cycle, n_iters)
  total = epochs * n_iters
  schedule = schedules.fge_schedule(0.1, 0.05, 0.01, num_epochs=epochs, steps_per_epoch=n_iters,
                                    pretrain_steps=pretrain * n_iters, cycle_epochs=cycle)
  got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total, dtype=jnp.int32)))
  np.testing.assert_allclose(got, lrs, rtol=2e-6, atol=1e-9)
  steps = schedules.fge_snapshot_steps(total, n_iters, pretrain * n_iters, cycle)
  assert steps == collected
  # A collection is the last update before a cycle's midpoint: the lr just above lr2, and the next update's is lr2.
  for s in steps:
    assert lrs[s - 1] == pytest.approx(0.01 + 0.04 / (n_iters * cycle / 2), rel=1e-9)
    if s < total:
      assert got[s] == pytest.approx(0.01, rel=1e-6)


def reference_swa_lr(epoch, lr_init, swa_start, swa_lr):
  """timgaripov/swa train.py schedule (epoch 0-based), with --swa."""
  t = epoch / swa_start
  lr_ratio = swa_lr / lr_init
  if t <= 0.5:
    factor = 1.0
  elif t <= 0.9:
    factor = 1.0 - (1.0 - lr_ratio) * (t - 0.5) / 0.4
  else:
    factor = lr_ratio
  return lr_init * factor


@pytest.mark.parametrize("swa_start, n_iters, epochs", [(161.0, 3, 200), (7.5, 4, 10), (3.0, 16, 4)])
def test_swa_lr_at_every_update_matches_the_reference(swa_start, n_iters, epochs):
  want = np.repeat([reference_swa_lr(e, 0.1, swa_start, 0.05) for e in range(epochs)], n_iters)
  schedule = schedules.swa_schedule(0.1, 0.05, steps_per_epoch=n_iters, swa_start=swa_start)
  got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(epochs * n_iters, dtype=jnp.int32)))
  np.testing.assert_allclose(got, want, rtol=2e-6)


def test_swa_collection_steps_follow_the_reference():
  # swa train.py: collect after epoch index `epoch` when epoch + 1 >= swa_start and (epoch + 1 - swa_start) % c == 0.
  spe, epochs, swa_start, c = 5, 12, 7, 2
  want = [(e + 1) * spe for e in range(epochs) if e + 1 >= swa_start and (e + 1 - swa_start) % c == 0]
  assert list(schedules.averaging_steps(epochs * spe, swa_start * spe, c * spe)) == want


def test_plan_takes_fge_snapshots_and_the_run_uses_fge_schedule(tiny_data):
  c = tiny_config(tiny_data, method="fge", schedule="fge", num_epochs=8.0, fge_pretrain_fraction=0.5)
  plan = train_step.make_plan(c, 512)  # 16 steps/epoch: pretraining 64 updates, cycles of 32.
  assert plan.snapshot_steps == (80, 112)
  schedule = train_step.make_schedule(c, plan.total_steps, plan.steps_per_epoch)
  lrs, _ = reference_fge_run(0.1, 0.05, 0.01, 8, 4, 2, 16)
  np.testing.assert_allclose(np.asarray(jax.vmap(schedule)(jnp.arange(128))), lrs, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("overrides, match", [
    (dict(method="fge"), "method='fge' and schedule='fge' go together"),
    (dict(method="fge", schedule="fge", fge_cycle_epochs=3), "fge_cycle_epochs must be an even integer"),
    (dict(method="fge", schedule="fge", fge_cycle_epochs=2, fge_pretrain_fraction=0.8),
     "fge_cycle_epochs=2 is longer than the 0.8 epochs left"),
    (dict(method="fge", schedule="fge", fge_pretrain_fraction=1.0), "fge_pretrain_fraction must be a finite number in"),
    (dict(method="swa", schedule="step", num_cycles=1), "needs schedule='swa'"),
    (dict(method="swa", schedule="swa"), "needs num_cycles=1"),
    (dict(method="swa", schedule="swa", num_cycles=1, swa_start=5.0), "swa_start=5.0 is past the end"),
    (dict(method="swa", schedule="swa", num_cycles=1, swa_start=-1.0), "swa_start must be None"),
    (dict(method="swa", schedule="swa", num_cycles=1, swa_every_steps=0), "swa_every_steps must be None"),
    (dict(method="swa", schedule="swa", num_cycles=1, swa_bn="mean"), "swa_bn='mean' is not known"),
    (dict(method="swag", schedule="swa", num_cycles=1, swag_rank=0), "swag_rank must be an integer >= 1"),
    (dict(method="swag", schedule="swa", num_cycles=1, swa_bn="average"), "needs swa_bn='recompute'"),
    (dict(method="ema", schedule="step", num_cycles=1, ema_decay=1.0), "ema_decay must be a finite number in"),
    (dict(method="bagging"), "method='bagging' is not known"),
])
def test_bad_method_fields_are_one_line_config_errors(tiny_data, overrides, match):
  with pytest.raises(ConfigError, match=match) as e:
    config_lib.validate(tiny_config(tiny_data, **overrides), 4)
  assert "\n" not in str(e.value)
