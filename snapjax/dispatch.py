"""Several training steps per dispatch: one compiled loop over the update, and where a dispatch must end.

`run_steps` runs 1..K updates in one `jax.lax.fori_loop` (the count is an argument, so any count up to K is one
compiled program); `dispatch_end` picks the last update of the next dispatch so that a dispatch never crosses a step
where the loop acts on the host (a snapshot, a save, a log line, a new epoch's order of the data).

On CPU a loop body is not compiled like the top level: XLA:CPU rewrites convolutions into the NHWC/HWIO order its
fast kernels need only in the entry computation (xla/service/cpu/conv_canonicalization.cc), so in a loop body the
gradients' convolutions fall back to a generic emitter, which sums in another order (and is slower).
`canonical_convolutions` does that rewrite in JAX before lowering, which makes K updates in one loop bitwise equal to
K single-step dispatches on CPU (tests/test_dispatch.py). `canonical_convolutions_on_cpu` applies it only where the
program is lowered for CPU (`jax.lax.platform_dependent`): a CUDA or TPU program of the same function keeps its
convolutions as they are, whatever machine lowers it (tests/test_lowering.py).
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core, source_info_util

PyTree = Any


def dispatch_end(step: int, max_steps: int, total: int, *, at: tuple[int, ...] = (),
                 every: tuple[int | None, ...] = ()) -> int:
  """The last update (1-based) of the dispatch that follows update `step`.

  At most max_steps updates, never past `total`, a step in `at` or a multiple of a period in `every` (None or 0:
  no period): those are the steps after which the host acts, so a dispatch ends exactly there.
  """
  end = min(step + max_steps, total)
  for period in every:
    if period:
      end = min(end, (step // period + 1) * period)
  return min([end, *(s for s in at if s > step)])


def run_steps(update: Callable[..., tuple[PyTree, PyTree]], max_steps: int, state: PyTree, *args: Any,
              num_steps: jax.Array) -> tuple[PyTree, PyTree]:
  """num_steps (1..max_steps, traced) calls state, metrics = update(state, *args) in one compiled loop.

  Returns the last state and every update's metrics stacked along a leading axis of length max_steps (rows past
  num_steps are zeros). Traced inside jit: the count is a runtime value, so every count shares one program.
  """
  metrics = jax.eval_shape(update, state, *args)[1]
  stacked = jax.tree.map(lambda m: jnp.zeros((max_steps, *m.shape), m.dtype), metrics)

  def body(i, carry):
    state, stacked = carry
    state, metrics = update(state, *args)
    return state, jax.tree.map(lambda s, m: s.at[i].set(m), stacked, metrics)

  return jax.lax.fori_loop(0, num_steps, body, (state, stacked))


CANONICAL_CONV_SCOPE = "cpu_canonical_conv"  # The name scope of the rewritten convolutions (in a program's locations).


def canonical_convolutions_on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
  """fn, with `canonical_convolutions` where the program is lowered for CPU and as it is on every other platform.

  The choice is made when the program is lowered, for the platform it is lowered for (`jax.lax.platform_dependent`),
  not from the devices of the machine that traces it. Traced inside jit.
  """
  canonical = canonical_convolutions(fn)
  return lambda *args: jax.lax.platform_dependent(*args, cpu=canonical, default=fn)


def canonical_convolutions(fn: Callable[..., Any]) -> Callable[..., Any]:
  """fn with every convolution written in NHWC/HWIO order, between transposes: what XLA:CPU does to the top level.

  Traced inside jit: fn is traced to a jaxpr and replayed with each convolution (also inside nested jit calls)
  rewritten, the rest bound as it is. Convolutions already in that order, and any other computation, are unchanged.
  It is XLA:CPU's rewrite, so code that fn makes platform-dependent (`jax.lax.platform_dependent`, e.g. the models'
  convolution VJP) is replayed as its CPU branch.
  """

  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    out = _replay(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return wrapped


def _replay(jaxpr, consts, args) -> list[Any]:
  env = {}

  def read(v):
    return v.val if isinstance(v, jax_core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    # Each equation replayed under its own names (as jax.core.eval_jaxpr does): profiles and lowered programs keep
    # the model's name scopes.
    names = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with source_info_util.user_context(eqn.source_info.traceback, name_stack=names):
      out = _replay_eqn(eqn, [read(v) for v in eqn.invars])
    env.update(zip(eqn.outvars, out))
  return [read(v) for v in jaxpr.outvars]


def _replay_eqn(eqn, invals) -> list[Any]:
  if eqn.primitive is jax.lax.conv_general_dilated_p:
    with eqn.ctx.manager:
      return [_canonical_conv(*invals, **eqn.params)]
  if eqn.primitive.name in ("jit", "pjit", "closed_call") and "jaxpr" in eqn.params:
    sub = eqn.params["jaxpr"]  # Inlined, as XLA inlines nested calls into the entry computation.
    return _replay(sub.jaxpr, sub.consts, invals)
  if eqn.primitive.name == "cond" and eqn.params.get("branches_platforms"):  # lax.platform_dependent.
    sub = eqn.params["branches"][_cpu_branch(eqn.params["branches_platforms"])]
    return _replay(sub.jaxpr, sub.consts, invals[1:])  # invals[0]: the platform's branch index.
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
  return out if eqn.primitive.multiple_results else [out]


def _cpu_branch(branches_platforms) -> int:
  """The branch of a platform-dependent conditional that runs on CPU: the one naming "cpu", else the default."""
  for i, platforms in enumerate(branches_platforms):
    if platforms is not None and "cpu" in platforms:
      return i
  return next(i for i, platforms in enumerate(branches_platforms) if platforms is None)


def _canonical_conv(lhs: jax.Array, rhs: jax.Array, *, dimension_numbers, **params) -> jax.Array:
  """One conv_general_dilated as XLA:CPU's ConvCanonicalization writes it: input (batch, spatial..., feature),
  kernel (spatial..., in, out), output (batch, spatial..., feature), transposed in and back out."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers  # (batch/out, feature/in, spatial...) dimension indices.
  n = len(lhs_spec)
  nhwc = (0, n - 1, *range(1, n - 1))  # The specs of the canonical order.
  hwio = (n - 1, n - 2, *range(n - 2))
  if (tuple(lhs_spec), tuple(rhs_spec), tuple(out_spec)) == (nhwc, hwio, nhwc):
    return jax.lax.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=dimension_numbers, **params)
  with jax.named_scope(CANONICAL_CONV_SCOPE):
    lhs_t = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    rhs_t = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    out = jax.lax.conv_general_dilated_p.bind(
        lhs_t, rhs_t, dimension_numbers=jax.lax.ConvDimensionNumbers(nhwc, hwio, nhwc), **params)
    order = (out_spec[0], *out_spec[2:], out_spec[1])  # Output dimension of each canonical dimension.
    inverse = [0] * n
    for i, d in enumerate(order):
      inverse[d] = i
    return jnp.transpose(out, inverse)
