"""snapjax.models.conv: the "cpu" convolution's gradients against jax.grad of lax.conv_general_dilated."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from snapjax import models
from snapjax.models import conv as conv_lib

NHWC = ("NHWC", "HWIO", "NHWC")


def _normal(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _grads(conv_fn, x, w, g, **kwargs):
  """jax.grad of sum(g * conv(x, w)) with respect to x and w, jitted."""
  def loss(x, w):
    return jnp.sum((conv_fn(x, w, **kwargs) * g).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


def _native(x, w, strides, padding, **kwargs):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC, **kwargs)


def _ours(x, w, strides, padding, **kwargs):
  dims = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  return conv_lib.conv_general_dilated(x, w, strides, padding, dimension_numbers=dims, **kwargs)


# (batch, height, width, in, out, kernel, stride, padding): the models' shapes in miniature, odd sizes, the
# ResNet-50 stem (7x7/2, pad 3), asymmetric and 'SAME'/'VALID' padding.
SHAPES = [
    (4, 8, 8, 3, 16, 3, 1, ((1, 1), (1, 1))),
    (4, 9, 9, 5, 7, 3, 1, ((1, 1), (1, 1))),
    (4, 9, 7, 5, 7, 3, 2, ((1, 1), (1, 1))),
    (2, 10, 10, 4, 6, 3, 2, ((1, 1), (1, 1))),
    (2, 15, 15, 3, 8, 7, 2, ((3, 3), (3, 3))),
    (3, 8, 8, 6, 5, 3, 1, ((0, 2), (1, 0))),
    (3, 8, 8, 6, 5, 3, 2, "SAME"),
    (3, 8, 8, 6, 5, 3, 1, "VALID"),
    (4, 8, 8, 6, 3, 1, 1, ((0, 0), (0, 0))),
    (4, 9, 9, 6, 10, 1, 2, ((0, 0), (0, 0))),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_conv_matches_jax_grad_of_lax_conv(shape):
  n, h, w_, c, k, kernel, stride, padding = shape
  x = _normal(0, (n, h, w_, c))
  w = _normal(1, (kernel, kernel, c, k))
  y = _native(x, w, (stride, stride), padding)
  g = _normal(2, y.shape)
  with conv_lib.using("cpu"):
    ours = jax.jit(functools.partial(_ours, strides=(stride, stride), padding=padding))(x, w)
    dx, dw = _grads(_ours, x, w, g, strides=(stride, stride), padding=padding)
  ref_dx, ref_dw = _grads(_native, x, w, g, strides=(stride, stride), padding=padding)
  np.testing.assert_array_equal(ours, y)  # The forward pass is XLA's convolution itself.
  np.testing.assert_array_equal(dx, ref_dx)  # So is the input gradient.
  if kernel > 1:  # The weight gradient is the convolution XLA:CPU runs for it, on the same operands.
    np.testing.assert_array_equal(dw, ref_dw)
  else:  # A matrix product instead: another summation order.
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref_dw))))


def test_weight_grad_against_a_numpy_loop():
  """An independent reference: dW[i, j, c, k] = sum over n, h, w of xpad[n, s*h + i, s*w + j, c] * g[n, h, w, k]."""
  x, g = _normal(3, (2, 7, 6, 3)), _normal(4, (2, 4, 3, 5))  # 3x3, stride 2, padding (1, 2) x (1, 1).
  w = jnp.zeros((3, 3, 3, 5))
  dw = jax.jit(functools.partial(conv_lib.weight_grad, strides=(2, 2), pads=((1, 2), (1, 1))))(x, g, w)
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 2), (1, 1), (0, 0)))
  want = np.zeros((3, 3, 3, 5))
  for i in range(3):
    for j in range(3):
      patch = xp[:, i:i + 2 * 4 - 1:2, j:j + 2 * 3 - 1:2, :]
      want[i, j] = np.einsum("nhwc,nhwk->ck", patch, np.asarray(g, np.float64))
  np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1)])
def test_bfloat16_gradients_match_and_keep_the_dtype(kernel, stride):
  x = _normal(5, (4, 8, 8, 8), jnp.bfloat16)
  w = _normal(6, (kernel, kernel, 8, 8), jnp.bfloat16)
  pad = ((kernel // 2,) * 2,) * 2
  g = _normal(7, _native(x, w, (stride, stride), pad).shape, jnp.bfloat16)
  with conv_lib.using("cpu"):
    dx, dw = _grads(_ours, x, w, g, strides=(stride, stride), padding=pad)
  ref_dx, ref_dw = _grads(_native, x, w, g, strides=(stride, stride), padding=pad)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_array_equal(dx, ref_dx)
  np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(ref_dw, np.float32), rtol=1e-2, atol=1e-2)


def test_unsupported_convolutions_fall_back_to_xla():
  """Groups or dilation: XLA's own convolution, so the jaxpr has no custom VJP."""
  x, w = _normal(8, (2, 8, 8, 4)), _normal(9, (3, 3, 2, 4))
  dims = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  with conv_lib.using("cpu"):
    grouped = jax.make_jaxpr(lambda x, w: conv_lib.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=dims, feature_group_count=2))(x, w)
    dilated = jax.make_jaxpr(lambda x, w: conv_lib.conv_general_dilated(
        x, w[:, :, :2], (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dims))(x[..., :2], w)
    plain = jax.make_jaxpr(lambda x, w: conv_lib.conv_general_dilated(
        x, w[:, :, :2], (1, 1), "SAME", dimension_numbers=dims))(x[..., :2], w)
  assert "custom_vjp" not in str(grouped) and "custom_vjp" not in str(dilated)
  assert "custom_vjp" in str(plain)


def test_impl_selection():
  assert conv_lib.get_impl() == "auto"
  assert conv_lib.resolved_impl() == ("cpu" if jax.default_backend() == "cpu" else "xla")
  assert conv_lib.resolved_impl("cpu") == "cpu"
  assert conv_lib.resolved_impl("cuda") == conv_lib.resolved_impl("tpu") == "xla"
  with conv_lib.using("xla"):
    assert conv_lib.resolved_impl() == "xla"
    with conv_lib.using("cpu"):
      assert conv_lib.resolved_impl() == "cpu"
    assert conv_lib.get_impl() == "xla"
  assert conv_lib.get_impl() == "auto"
  with pytest.raises(ValueError, match="conv impl must be one of"):
    conv_lib.set_impl("cudnn")


# Small models covering every kind of convolution the zoo has: 3x3 (strides 1, 2), 1x1 projections (stride 2)
# and DenseNet-BC's 1x1 bottlenecks and transitions; train mode, so BatchNorm uses the batch statistics.
SMALL_MODELS = {
    "resnet8": lambda: models.get("resnet8", 5),
    "resnet8_shortcut_b": lambda: models.CifarResNet(8, 5, shortcut="B"),
    "wrn": lambda: models.WideResNet(8, 2, 5),
    "densenet_bc": lambda: models.DenseNet(10, 4, 5, bottleneck=True, compression=0.5),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_model_outputs_and_gradients_match_xla_convolutions(name):
  model = SMALL_MODELS[name]()
  x, labels = _normal(10, (8, 16, 16, 3)), jnp.arange(8) % 5
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)

  def loss(params):
    logits, new_vars = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                   mutable=["batch_stats"])
    return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels]), (logits, new_vars)

  results = {}
  for impl in ("xla", "cpu", "auto"):
    with conv_lib.using(impl):
      results[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  # "auto" lowered for CPU is the "cpu" path (its platform-dependent branch resolved at lowering), bitwise.
  jax.tree.map(np.testing.assert_array_equal, results["auto"], results["cpu"])
  (loss_x, (logits_x, stats_x)), grads_x = results["xla"]
  (loss_c, (logits_c, stats_c)), grads_c = results["cpu"]
  np.testing.assert_array_equal(logits_c, logits_x)
  np.testing.assert_array_equal(loss_c, loss_x)
  jax.tree.map(np.testing.assert_array_equal, stats_c, stats_x)
  # 3x3-only models are bitwise equal; 1x1 kernels sum in another order.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_c), jax.tree.leaves(grads_x)):
    if name == "resnet8":
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    else:
      scale = float(jnp.max(jnp.abs(b))) or 1.0
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.devices(4)
def test_sharded_train_steps_are_bitwise_equal_to_xla_convolutions():
  """Three SGD steps of ResNet-8 on a batch split over 4 devices: the trainer's step, either convolution."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from snapjax import config as config_lib, train_step
  from snapjax.experiment import DATA_AXIS, make_mesh

  c = config_lib.base_config()
  c.model = "resnet8"
  model = models.get("resnet8", 10)
  schedule = train_step.make_schedule(c, 100)
  tx = train_step.make_optimizer(c, schedule)
  mesh = make_mesh()
  batch = NamedSharding(mesh, P(DATA_AXIS))
  x = jax.device_put(_normal(11, (16, 16, 16, 3)), batch)
  y = jax.device_put(jnp.arange(16) % 10, batch)
  variables = model.init(jax.random.key(0), x[:1], train=False)
  states = {}
  for impl in ("xla", "cpu"):
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
             "batch_stats": variables["batch_stats"], "opt_state": tx.init(variables["params"])}
    with conv_lib.using(impl):
      step = jax.jit(train_step.make_train_step(model, tx, schedule, jax.random.key(1)))
      for _ in range(3):
        state, _ = step(state, x, y)
    states[impl] = state
  jax.tree.map(np.testing.assert_array_equal, states["cpu"], states["xla"])
