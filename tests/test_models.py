"""Model zoo: shapes, parameter counts (published numbers, layer formulas), modes, dtypes."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snapjax import models
from snapjax.errors import ConfigError
from snapjax.models.resnet import BasicBlock

CIFAR_NAMES = ["densenet100", "densenet40", "densenet_bc100", "resnet110", "resnet20", "resnet32",
               "resnet56", "resnet8", "wrn14_2", "wrn32_4"]


def _abstract_variables(model, shape):
  """Variable shapes from init, without running any computation."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _num_params(variables) -> int:
  return sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))


def _key(seed):
  """Test-only "unsafe_rbg" key: its jitted code compiles much faster on CPU than threefry's."""
  return jax.random.key(seed, impl="unsafe_rbg")


def _init(model, x):
  rngs = {"params": _key(0), "dropout": _key(1)}
  return jax.jit(functools.partial(model.init, train=False))(rngs, x)


def _apply(model, train, **kwargs):
  """Jitted model.apply(variables, x) (one compile instead of op-by-op dispatch)."""
  return jax.jit(functools.partial(model.apply, train=train, **kwargs))


def _images(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# Small models that really run (few compiles: variables are cached per model, shared by tests).
SMALL = {
    "resnet8": lambda **kw: models.get("resnet8", 5, **kw),
    "wrn": lambda **kw: models.WideResNet(8, 1, 5, **kw),
    "densenet_bc": lambda **kw: models.DenseNet(10, 4, 5, bottleneck=True, compression=0.5, **kw),
}
X_4x16x16x3 = _images(0, (4, 16, 16, 3))
STEM = lambda mdl, _: mdl.name == "stem_conv"  # capture_intermediates filter.


@functools.cache
def _small_variables(name):
  return _init(SMALL[name](), X_4x16x16x3)


def test_names_sorted_and_complete():
  assert models.names() == sorted(CIFAR_NAMES + ["resnet50"])


@pytest.mark.parametrize("name", sorted(CIFAR_NAMES + ["resnet50"]))
def test_output_shape_and_stem_stride(name):
  native = 224 if name == "resnet50" else 32
  model = models.get(name, 7)
  init = lambda m, x: m.init_with_output(_key(0), x, train=False, capture_intermediates=STEM)
  logits, variables = jax.eval_shape(functools.partial(init, model),
                                     jax.ShapeDtypeStruct((2, native, native, 3), jnp.float32))
  assert (logits.shape, logits.dtype) == ((2, 7), jnp.float32)
  stem_out = variables["intermediates"]["stem_conv"]["__call__"][0]
  assert stem_out.shape[:3] == ((2, 112, 112) if name == "resnet50" else (2, 32, 32))
  if name == "resnet50":
    return
  # Tiny ImageNet: stride 2 in the first conv halves 64x64 to 32x32 and keeps the parameter shapes.
  strided = models.get(name, 7, stem_stride=2)
  logits, strided_variables = jax.eval_shape(functools.partial(init, strided),
                                             jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert logits.shape == (2, 7)
  stem_out = strided_variables["intermediates"]["stem_conv"]["__call__"][0]
  assert stem_out.shape[:3] == (2, 32, 32)
  assert jax.tree.map(jnp.shape, strided_variables) == jax.tree.map(jnp.shape, variables)


@pytest.mark.parametrize("name, num_classes, size, published, tolerance", [
    ("resnet20", 10, 32, 0.27e6, 0.005e6),  # He et al. 2015, Table 6: 0.27M.
    ("resnet110", 10, 32, 1.7e6, 0.03 * 1.7e6),  # He et al. 2015: 1.7M.
    ("densenet40", 10, 32, 1.0e6, 0.05e6),  # Huang et al. 2016, Table 2: 1.0M.
    ("densenet100", 10, 32, 27.2e6, 0.05e6),  # Huang et al. 2016, Table 2: 27.2M.
    ("densenet_bc100", 10, 32, 0.8e6, 0.05e6),  # Huang et al. 2016, Table 2: 0.8M.
    ("resnet50", 1000, 224, 25_557_032, 0),  # torchvision resnet50.
])
def test_param_count_matches_published(name, num_classes, size, published, tolerance):
  variables = _abstract_variables(models.get(name, num_classes), (1, size, size, 3))
  assert abs(_num_params(variables) - published) <= tolerance


def _wrn_formula(depth, k, num_classes):
  """WRN parameter count from the layer shapes: conv k*k*cin*cout, BN 2c, dense c*C + C."""
  n = (depth - 2) // 6
  total = 3 * 3 * 3 * 16  # Stem conv.
  cin = 16
  for stage in range(3):
    cout = 16 * 2**stage * k
    for block in range(n):
      total += 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout
      if cin != cout or (stage > 0 and block == 0):
        total += cin * cout  # 1x1 projection shortcut.
      cin = cout
  return total + 2 * cin + cin * num_classes + num_classes


@pytest.mark.parametrize("depth, widen, num_classes", [(32, 4, 100), (32, 4, 10), (14, 2, 10)])
def test_wrn_param_count_matches_layer_formula(depth, widen, num_classes):
  model = models.get(f"wrn{depth}_{widen}", num_classes)
  variables = _abstract_variables(model, (1, 32, 32, 3))
  assert _num_params(variables) == _wrn_formula(depth, widen, num_classes)
  if (depth, widen, num_classes) == (32, 4, 100):
    # Hand sum per stage: 432 + 343,200 + 1,411,456 + 5,640,960 + 512 (BN) + 25,700 (dense).
    assert _num_params(variables) == 7_422_260


def test_densenet_bc_param_count_matches_layer_loop():
  k, per_block, num_classes = 12, 16, 10
  c, total = 2 * k, 27 * 2 * k
  for block in range(3):
    for _ in range(per_block):
      total += 2 * c + c * 4 * k + 2 * 4 * k + 9 * 4 * k * k
      c += k
    if block < 2:
      total += 2 * c + c * (c // 2)
      c //= 2
  total += 2 * c + c * num_classes + num_classes
  variables = _abstract_variables(models.get("densenet_bc100", num_classes), (1, 32, 32, 3))
  assert _num_params(variables) == total


def test_shortcut_b_adds_two_projections():
  a = _num_params(_abstract_variables(models.get("resnet20", 10), (1, 32, 32, 3)))
  b = _num_params(_abstract_variables(models.get("resnet20", 10, shortcut="B"), (1, 32, 32, 3)))
  assert b - a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_shortcut_a_subsamples_and_zero_pads():
  block = BasicBlock(features=8, stride=2, shortcut="A", dtype=jnp.float32)
  x = _images(0, (2, 6, 6, 4))
  variables = _init(block, x)
  zero_params = jax.tree.map(jnp.zeros_like, variables["params"])
  # Zero kernels and BN shifts make the residual branch exactly 0, leaving ReLU(shortcut).
  out = _apply(block, False)({**variables, "params": zero_params}, x)
  expected = np.zeros((2, 3, 3, 8), np.float32)
  expected[..., :4] = np.maximum(np.asarray(x)[:, ::2, ::2, :], 0)
  np.testing.assert_array_equal(np.asarray(out), expected)


def test_conv_init_is_he_fan_out():
  params = _small_variables("resnet8")["params"]
  for block in ("stage1_block1", "stage2_block1", "stage3_block1"):
    kernel = np.asarray(params[block]["conv2"]["kernel"])
    fan_out = 9 * kernel.shape[-1]
    np.testing.assert_allclose(kernel.std(), math.sqrt(2 / fan_out), rtol=0.05)
    assert abs(kernel.mean()) < 0.1 * math.sqrt(2 / fan_out)


def test_train_mode_updates_batch_stats_and_mixes_batch():
  model, x = SMALL["resnet8"](), X_4x16x16x3
  variables = _small_variables("resnet8")
  train = _apply(model, True, capture_intermediates=STEM, mutable=["batch_stats", "intermediates"])
  logits, state = train(variables, x)
  assert logits.shape == (4, 5)
  stem_NxHxWxC = np.asarray(state["intermediates"]["stem_conv"]["__call__"][0], np.float64)
  stats = state["batch_stats"]["stem_bn"]
  # Flax momentum 0.9: running = 0.9 * running + 0.1 * batch statistic (biased variance).
  np.testing.assert_allclose(stats["mean"], 0.1 * stem_NxHxWxC.mean(axis=(0, 1, 2)), atol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * stem_NxHxWxC.var(axis=(0, 1, 2)),
                             rtol=1e-4)

  other = x.at[1:].set(_images(1, (3, 16, 16, 3)))
  train_other = train(variables, other)[0]
  assert np.abs(np.asarray(logits[0] - train_other[0])).max() > 1e-3

  trained = {**variables, "batch_stats": state["batch_stats"]}
  evaluate = _apply(model, False)
  eval_all, eval_other, eval_alone = evaluate(trained, x), evaluate(trained, other), evaluate(
      trained, x[:1])
  np.testing.assert_allclose(eval_all[0], eval_other[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(eval_all[:1], eval_alone, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(eval_all[0] - logits[0])).max() > 1e-3


@pytest.mark.parametrize("name", ["wrn", "densenet_bc"])
def test_dropout_only_in_train_mode(name):
  model, plain = SMALL[name](dropout_rate=0.5), SMALL[name]()
  variables, x = _small_variables(name), X_4x16x16x3
  apply = _apply(model, True, mutable=["batch_stats"])
  train = lambda seed: apply(variables, x, rngs={"dropout": _key(seed)})[0]
  assert np.abs(np.asarray(train(1) - train(2))).max() > 1e-3
  np.testing.assert_array_equal(train(1), train(1))
  # Eval mode needs no dropout rng and matches the same weights without dropout.
  np.testing.assert_allclose(_apply(model, False)(variables, x),
                             _apply(plain, False)(variables, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, train", [
    ("resnet8", False), ("wrn", False), ("densenet_bc", True)])
def test_bfloat16_compute_keeps_float32_params_and_logits(name, train):
  low, full = SMALL[name](dtype=jnp.bfloat16), SMALL[name]()
  variables, x = _small_variables(name), X_4x16x16x3
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert jax.tree.map(jnp.shape, jax.eval_shape(functools.partial(low.init, train=False),
                                                _key(0), x)) == jax.tree.map(jnp.shape, variables)
  logits, state = _apply(low, train, capture_intermediates=STEM,
                         mutable=["batch_stats", "intermediates"])(variables, x)
  assert state["intermediates"]["stem_conv"]["__call__"][0].dtype == jnp.bfloat16
  assert {p.dtype for p in jax.tree.leaves(state["batch_stats"])} == {jnp.dtype(jnp.float32)}
  reference = _apply(full, train, mutable=["batch_stats"])(variables, x)[0]
  assert logits.dtype == jnp.float32
  atol = 0.03 * float(np.abs(np.asarray(reference)).max())
  assert atol < float(np.abs(np.asarray(reference - reference[::-1])).max())  # Examples differ.
  np.testing.assert_allclose(logits, reference, atol=atol)


def test_get_passes_kwargs_through():
  model = models.get("resnet20", 10, width=8, dtype=jnp.bfloat16, stem_stride=2, shortcut="B")
  assert (model.depth, model.width, model.dtype, model.stem_stride, model.shortcut) == (
      20, 8, jnp.bfloat16, 2, "B")
  assert models.get("densenet_bc100", 100, dropout_rate=0.2).compression == 0.5


def test_unknown_name_lists_known_names_sorted():
  with pytest.raises(ConfigError) as info:
    models.get("resnet18", 10)
  message = str(info.value)
  assert "'resnet18'" in message and "\n" not in message
  assert ", ".join(sorted(CIFAR_NAMES + ["resnet50"])) in message


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 0}, "num_classes"),
    ({"num_classes": 2.5}, "num_classes"),
    ({"name": "resnet20", "foo": 1}, "'foo'"),
    ({"name": "resnet20", "dropout_rate": 0.2}, "'dropout_rate'"),
    ({"name": "resnet50", "stem_stride": 2}, "'stem_stride'"),
    ({"name": "resnet20", "depth": 56}, "depth"),
    ({"name": "resnet20", "shortcut": "C"}, "shortcut"),
    ({"name": "resnet20", "stem_stride": 3}, "stem_stride"),
    ({"name": "resnet20", "dtype": jnp.int32}, "dtype"),
    ({"name": "wrn32_4", "dropout_rate": 1.0}, "dropout_rate"),
    ({"name": "densenet40", "compression": 0.0}, "compression"),
])
def test_get_rejects_bad_arguments(kwargs, match):
  kwargs = {"name": "resnet20", "num_classes": 10, **kwargs}
  with pytest.raises(ConfigError, match=match):
    models.get(**kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda: models.CifarResNet(21, 10), "depth"),
    (lambda: models.WideResNet(32, 0, 10), "widen_factor"),
    (lambda: models.DenseNet(13, 12, 10, bottleneck=True), "depth"),  # Valid without BC.
    (lambda: models.DenseNet(40, 0, 10), "growth_rate"),
    (lambda: models.ResNet50(0), "num_classes"),
])
def test_classes_reject_bad_fields(make, match):
  with pytest.raises(ConfigError, match=match):
    make()
