"""The models' convolution: XLA's own, or (on CPU) one whose weight gradient XLA:CPU runs without its slow path.

Every model convolution goes through `conv_general_dilated` (passed to `flax.linen.Conv`), which runs one of:

  "xla": `lax.conv_general_dilated` and JAX's own VJP.
  "cpu": the same forward and input-gradient convolutions, and the weight gradient from operands that are
    transposed inside a `lax.cond`. Why: XLA:CPU computes an NHWC weight gradient as a convolution over
    transposed copies of the activations (C, H, W, N) and of the output gradient (H, W, N, K), and fuses the
    elementwise producers of those (BatchNorm, ReLU and the residual adds, up to a whole stage of blocks) into
    the transposes, recomputing them in transposed order: about half of a ResNet-20 train step
    (`python benchmarks/train_step.py --profile`). A conditional's operands are materialised, so the
    transposes read finished activations. 3x3 (k x k) kernels then run the very convolution XLA would have
    run, so the results are bitwise equal to "xla" (tests/test_conv.py); 1 x 1 kernels (DenseNet transitions,
    ResNet-50) use one matrix product instead of XLA's H x W-window convolution, equal to float tolerance.
  "auto" (default): the weight gradient of "cpu" in a program lowered for CPU and of "xla" in one lowered for any
    other platform (GPU and TPU keep their native convolutions; nothing here was measured on them). The choice is
    `jax.lax.platform_dependent`, made when the program is lowered for its platform, so a CUDA or TPU program traced
    on a CPU machine holds no CPU path (tests/test_lowering.py); the CPU path runs in the name scope
    CPU_WEIGHT_GRAD_SCOPE.

The choice is read when a model is traced: call `set_impl` (or `with using(...)`) before the first jit of a step.
Measured: docs/performance.md (benchmarks/train_step.py, benchmarks/conv_ops.py).
"""
import contextlib
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "cpu")
_NHWC = ("NHWC", "HWIO", "NHWC")
CPU_WEIGHT_GRAD_SCOPE = "cpu_conv_weight_grad"
_impl = "auto"


def set_impl(name: str) -> None:
  """Selects the convolution for models traced from now on: "auto", "xla" or "cpu" (see the module docstring)."""
  global _impl
  if name not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {name!r}")
  _impl = name


def get_impl() -> str:
  """The selected convolution ("auto", "xla" or "cpu")."""
  return _impl


def resolved_impl(platform: str | None = None) -> str:
  """The convolution VJP of a model traced now, in a program lowered for `platform` (default: the default backend):
  "xla" or "cpu"."""
  if _impl != "auto":
    return _impl
  return "cpu" if (platform or jax.default_backend()) == "cpu" else "xla"


@contextlib.contextmanager
def using(name: str) -> Iterator[None]:
  """Context in which models are traced with convolution `name`; restores the previous choice on exit."""
  previous = get_impl()
  set_impl(name)
  try:
    yield
  finally:
    set_impl(previous)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         precision: Any = None) -> jax.Array:
  """`lax.conv_general_dilated` with the selected VJP (the signature `flax.linen.Conv` calls).

  The "cpu" path covers 2-D NHWC/HWIO convolutions without dilation or groups (every snapjax model); anything
  else runs XLA's own convolution whatever the choice.
  """
  native = functools.partial(lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                             rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                             feature_group_count=feature_group_count, precision=precision)
  if _impl == "xla" or not _is_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                                          feature_group_count):
    return native()
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return (_cpu_conv if _impl == "cpu" else _auto_conv)(lhs, rhs, strides, pads, precision)


def _is_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1:
    return False
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return False
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  dims = (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          if dimension_numbers is not None else None)
  return dims == nhwc


def _xla_conv(x, w, strides, pads, precision):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_conv(x, w, strides, pads, precision):
  return _xla_conv(x, w, strides, pads, precision)


def _cpu_conv_fwd(x, w, strides, pads, precision):
  return _xla_conv(x, w, strides, pads, precision), (x, w)


def _cpu_conv_bwd(strides, pads, precision, res, g):
  x, w = res
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, pads, precision), x)
  (dx,) = input_vjp(g)
  return dx, weight_grad(x, g, w, strides, pads, precision)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def _xla_weight_grad(x, g, w, strides, pads, precision):
  """JAX's own weight gradient of the convolution (its transpose rule), as "xla" computes it."""
  _, weight_vjp = jax.vjp(lambda w: _xla_conv(x, w, strides, pads, precision), w)
  return weight_vjp(g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _auto_conv(x, w, strides, pads, precision):
  return _xla_conv(x, w, strides, pads, precision)


def _auto_conv_bwd(strides, pads, precision, res, g):
  """dx as "xla" and "cpu" compute it; dw by the platform the program is lowered for (the module docstring)."""
  x, w = res
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, pads, precision), x)
  (dx,) = input_vjp(g)
  static = dict(strides=strides, pads=pads, precision=precision)
  dw = lax.platform_dependent(x, g, w, cpu=functools.partial(weight_grad, **static),
                              default=functools.partial(_xla_weight_grad, **static))
  return dx, dw


_auto_conv.defvjp(_cpu_conv_fwd, _auto_conv_bwd)


def _materialized(pred: jax.Array, fn, *operands):
  """fn(*operands) computed inside a conditional (both branches fn): XLA cannot fuse the operands' producers in."""
  return lax.cond(pred, fn, fn, *operands)


def weight_grad(x_NxHxWxC: jax.Array, g_NxHoxWoxK: jax.Array, w: jax.Array, strides: tuple[int, int],
                pads: tuple[tuple[int, int], tuple[int, int]], precision: Any = None) -> jax.Array:
  """d(sum(g * conv(x, w))) / dw for an NHWC/HWIO convolution, with its operands materialised (see the docstring).

  k x k kernels: the convolution XLA:CPU itself uses, out[c, i, j, k] = sum_{n,h,w} xpad[n, i + s*h, j + s*w, c] *
  g[n, h, w, k], over x as (C, H, W, N) and g as (Ho, Wo, N, K). 1 x 1 kernels: (C, N*Ho*Wo) @ (N*Ho*Wo, K).
  """
  with jax.named_scope(CPU_WEIGHT_GRAD_SCOPE):
    return _weight_grad(x_NxHxWxC, g_NxHoxWoxK, w, strides, pads, precision)


def _weight_grad(x_NxHxWxC, g_NxHoxWoxK, w, strides, pads, precision):
  kh, kw, c, k = w.shape
  (sh, sw), ((pt, _), (pl, _)) = strides, pads
  n, h, wd, _ = x_NxHxWxC.shape
  _, ho, wo, _ = g_NxHoxWoxK.shape
  # The predicate is never true for a finite kernel, and both branches are the same anyway; it only needs to be
  # unknown to the compiler. The kernel is replicated in data-parallel training, so reading it needs no collective.
  pred = jnp.isnan(w.reshape(-1)[0])
  if kh == kw == 1 and pt == pl == 0:
    x_s = x_NxHxWxC[:, :(ho - 1) * sh + 1:sh, :(wo - 1) * sw + 1:sw, :]
    x_CxP = _materialized(pred, lambda a: a.reshape(-1, c).T, x_s)
    dw_CxK = lax.dot_general(x_CxP, g_NxHoxWoxK.reshape(-1, k), (((1,), (0,)), ((), ())), precision=precision)
    return dw_CxK.reshape(1, 1, c, k)
  x_CxHxWxN, g_HoxWoxNxK = _materialized(
      pred, lambda a, b: (jnp.transpose(a, (3, 1, 2, 0)), jnp.transpose(b, (1, 2, 0, 3))), x_NxHxWxC, g_NxHoxWoxK)
  # Output spatial size kh x kw: pad the far side so the padded input spans exactly kh - 1 + s * (Ho - 1) + 1 rows.
  pb = kh + sh * (ho - 1) - h - pt
  pr = kw + sw * (wo - 1) - wd - pl
  dw_CxKHxKWxK = lax.conv_general_dilated(x_CxHxWxN, g_HoxWoxNxK, (1, 1), ((pt, pb), (pl, pr)), rhs_dilation=(sh, sw),
                                          dimension_numbers=_NHWC, precision=precision)
  return jnp.transpose(dw_CxKHxKWxK, (1, 2, 0, 3))
