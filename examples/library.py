"""snapjax as a library: the paper's schedule drives optax SGD, snapshots at cycle ends, one-jit ensemble.

Then one of the paper's analyses from user code: the last 2 snapshots' weights averaged, with BatchNorm statistics
measured again for the averaged network.
"""
import functools

import jax
import jax.numpy as jnp
import optax

import snapjax

model = snapjax.models.get("resnet8", num_classes=10)
x, y = jax.random.normal(jax.random.key(0), (64, 32, 32, 3)), jnp.arange(64) % 10  # Your data here.
total_steps, num_cycles = 60, 3
tx = optax.sgd(snapjax.snapshot_schedule(0.2, total_steps, num_cycles), momentum=0.9, nesterov=True)
variables = model.init(jax.random.key(1), x, train=False)
params, stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])


@jax.jit
def train_step(params, stats, opt_state, x, y):
  def loss_fn(p):
    logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]

  (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), stats, opt_state


snapshots = []
for t in range(1, total_steps + 1):
  params, stats, opt_state = train_step(params, stats, opt_state, x, y)
  if t in snapjax.snapshot_steps(total_steps, num_cycles):  # The last update of each cycle.
    snapshots.append({"params": params, "batch_stats": stats})

stacked = snapjax.stack_snapshots(snapshots)  # Leaves get a leading axis of size M.
apply_fn = lambda v, x: model.apply(v, x, train=False)  # noqa: E731  Define once: it keys the compile cache.
probs = snapjax.ensemble_predict(apply_fn, stacked, x, last_m=2)  # Mean softmax of the last 2, one jit.
print(f"{len(snapshots)} snapshots; last-2 ensemble error {float(snapjax.error_rate(probs, y)):.3f}, "
      f"NLL {float(snapjax.nll(probs, y)):.3f}")

# An analysis: average the last 2 snapshots' weights instead (SWA-style), then measure that network's
# BatchNorm statistics on training batches (the exact mean over the batches, as SWA's bn_update).
train_apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
averaged = snapjax.recompute_batch_stats(train_apply, snapjax.average_snapshots(stacked, last_m=2), [x])
averaged_probs = jax.nn.softmax(apply_fn(averaged, x))
print(f"weights of the last 2 averaged: error {float(snapjax.error_rate(averaged_probs, y)):.3f}")
