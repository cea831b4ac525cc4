"""The programs lower for CUDA and TPU from this CPU machine, and no CPU-only path reaches them (issue 24).

Two choices depend on the backend, both made when a program is lowered (`jax.lax.platform_dependent`), for the
platform it is lowered for: the models' convolution VJP (snapjax/models/conv.py: the weight gradient from
materialised transposes on CPU) and the loop body's convolutions rewritten into XLA:CPU's order
(`dispatch.canonical_convolutions_on_cpu`). Each CPU-only path runs in a name scope that the lowered program's
locations carry; the CPU program must hold both (so these tests can fail), a CUDA or TPU program neither. Lowered
over a mesh of the 4 fake CPU devices, with abstract train states.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from snapjax import checkpoints, dispatch, ensemble, export, members, train_step
from snapjax.models import conv

from helpers import tiny_config, train_parts

pytestmark = pytest.mark.devices(4)

CPU_ONLY = (conv.CPU_WEIGHT_GRAD_SCOPE, dispatch.CANONICAL_CONV_SCOPE)
ACCELERATORS = (("cuda",), ("tpu",))


def _text(lowered) -> str:
  text = lowered.as_text(debug_info=True)  # With locations: the name scopes.
  assert "stablehlo.convolution" in text  # The model is in it (the check below is not vacuous).
  return text


def _assert_cpu_only_paths(text: str, canonical: bool) -> None:
  assert conv.CPU_WEIGHT_GRAD_SCOPE in text
  assert (dispatch.CANONICAL_CONV_SCOPE in text) == canonical


def _assert_no_cpu_path(text: str, platforms) -> None:
  leaked = [scope for scope in CPU_ONLY if scope in text]
  assert not leaked, f"the program lowered for {platforms} holds the CPU-only {leaked}"


def _one_member_update(tiny_data, steps_per_dispatch, **overrides):
  """A one-member run's compiled update (train_step.InMemoryBatches) and its abstract, replicated train state."""
  config = tiny_config(tiny_data, steps_per_dispatch=steps_per_dispatch, **overrides)
  exp, arrays, plan, schedule, tx = train_parts(config)
  key = jax.random.key(0)
  step_fn = train_step.make_train_step(exp.model, tx, schedule, key, smoothout=train_step.make_smoothout(config, plan),
                                       num_shards=exp.mesh.devices.size)
  update = train_step.InMemoryBatches(exp, arrays, plan, key, key, steps_per_dispatch).compile(step_fn)
  state = jax.eval_shape(lambda k: train_step.init_state(exp, tx, k), key)
  return update, checkpoints.abstract_like(state, exp.replicated)


@pytest.mark.parametrize("overrides", [{}, {"dtype": "bfloat16"}, {"smoothout_a": 0.01, "smoothout_chunks": 2}],
                         ids=["float32", "bfloat16", "smoothout"])
def test_one_member_step_lowers_for_cuda_and_tpu_without_the_cpu_paths(tiny_data, overrides):
  update, state = _one_member_update(tiny_data, 4, **overrides)
  _assert_cpu_only_paths(_text(update.lower(state, 0, 4, platforms=("cpu",))), canonical=True)
  for platforms in ACCELERATORS + (("cuda", "tpu"),):
    _assert_no_cpu_path(_text(update.lower(state, 0, 4, platforms=platforms)), platforms)


def test_one_update_per_dispatch_lowers_too(tiny_data):
  """One update per call: no loop body, so no rewrite on CPU either; the CPU VJP only where lowered for CPU."""
  update, state = _one_member_update(tiny_data, 1)
  _assert_cpu_only_paths(_text(update.lower(state, 0, 1, platforms=("cpu",))), canonical=False)
  for platforms in ACCELERATORS:
    _assert_no_cpu_path(_text(update.lower(state, 0, 1, platforms=platforms)), platforms)


def test_member_step_lowers_for_cuda_and_tpu_without_the_cpu_paths(tiny_data):
  """K = 2 members on a (2, 2) member mesh, 4 loop steps per dispatch (members.MemberBatches)."""
  config = tiny_config(tiny_data, num_members=2, member_groups=2, steps_per_dispatch=4, dtype="bfloat16")
  exp, arrays, plan, schedule, tx = train_parts(config)
  mp = members.make_member_plan(config, plan, 4)
  mesh = members.member_mesh(mp.groups)
  keys = members.member_keys(mp)
  make_step = lambda key: train_step.make_train_step(exp.model, tx, schedule, key, num_shards=4)
  update = members.MemberBatches(exp, mesh, arrays, plan, mp, keys, 4).compile(make_step)
  state = jax.eval_shape(members.make_init(exp, tx, mp, mesh), keys["init"])
  _assert_cpu_only_paths(_text(update.lower(state, 0, 4, platforms=("cpu",))), canonical=True)
  for platforms in ACCELERATORS:
    _assert_no_cpu_path(_text(update.lower(state, 0, 4, platforms=platforms)), platforms)


def test_epoch_permutations_lower_for_cuda_and_tpu(tiny_data):
  config = tiny_config(tiny_data, num_members=2, member_groups=2)
  exp, arrays, plan, _, _ = train_parts(config)
  one = train_step.make_epoch_permutation_fn(exp.mesh, jax.random.key(0), len(arrays[1]) // 4)
  mp = members.make_member_plan(config, plan, 4)
  mesh = members.member_mesh(mp.groups)
  per_member = members.make_member_permutation_fn(mesh, len(arrays[1]) // 4, mp.strategy)
  sharded = NamedSharding(mesh, P(members.MEMBER_AXIS))
  data_keys = jax.device_put(members.member_keys(mp)["data"], sharded)
  epochs = jax.device_put(np.zeros(2, np.int32), sharded)
  for platforms in ACCELERATORS + (("cpu",),):
    for text in (one.trace(np.int32(3)).lower(lowering_platforms=platforms).as_text(),
                 per_member.trace(data_keys, epochs).lower(lowering_platforms=platforms).as_text()):
      assert "stablehlo.sort" in text or "stablehlo.custom_call" in text, platforms  # The shuffle is in it.


def _stacked_model(tiny_data, num=3):
  config = tiny_config(tiny_data)
  exp, _, _, _, tx = train_parts(config)
  variables = jax.eval_shape(exp.init_variables, jax.random.key(0))
  stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct((num, *a.shape), a.dtype), variables)
  return exp, stacked


def test_evaluator_lowers_for_cuda_and_tpu(tiny_data):
  """ensemble_predict as scoring runs it on a test batch sharded over the data axis."""
  exp, stacked = _stacked_model(tiny_data, num=4)
  x = jax.ShapeDtypeStruct((64, *exp.input_shape), jnp.float32, sharding=NamedSharding(exp.mesh, P("data")))
  predict = jax.jit(lambda s, x: ensemble.ensemble_predict(exp.apply_fn, s, x, return_members=True))
  for platforms in ACCELERATORS + (("cuda", "tpu"),):
    _assert_no_cpu_path(_text(predict.trace(stacked, x).lower(lowering_platforms=platforms)), platforms)


def test_auto_strategy_is_resolved_for_the_platform_the_evaluator_is_lowered_for(tiny_data, monkeypatch):
  """Were "auto" to pick another strategy on CPU than on accelerators, each program would hold its platform's only:
  here CPU "loop" (unrolled: no while loop) against "map" elsewhere (a while loop over the members)."""
  monkeypatch.setitem(ensemble.AUTO_STRATEGY, "cpu", "loop")
  exp, stacked = _stacked_model(tiny_data)
  x = jax.ShapeDtypeStruct((8, *exp.input_shape), jnp.float32)
  apply_fn = lambda v, x: exp.model.apply(v, x, train=False)  # A new function: no cached trace of the old table.
  predict = jax.jit(lambda s, x: ensemble.ensemble_predict(apply_fn, s, x))
  assert "stablehlo.while" not in _text(predict.trace(stacked, x).lower(lowering_platforms=("cpu",)))
  for platforms in ACCELERATORS:
    assert "stablehlo.while" in _text(predict.trace(stacked, x).lower(lowering_platforms=platforms)), platforms


def test_export_lowers_for_cuda_and_tpu(tiny_data):
  exp, stacked = _stacked_model(tiny_data)
  concrete = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), stacked)
  blob = export.export_ensemble(exp.apply_fn, concrete, jax.ShapeDtypeStruct((1, *exp.input_shape), np.uint8),
                                preprocess=lambda x: x.astype(jnp.float32) / 255, platforms=("cuda", "tpu"))
  exported = jax.export.deserialize(blob)
  assert exported.platforms == ("cuda", "tpu")
  text = exported.mlir_module()
  assert "stablehlo.convolution" in text
  _assert_no_cpu_path(text, exported.platforms)
