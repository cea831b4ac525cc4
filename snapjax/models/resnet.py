"""CIFAR ResNets (He et al. 2015) and pre-activation Wide-ResNets (Zagoruyko & Komodakis 2016).

Also holds the layer helpers and argument checks shared by the other model files.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from snapjax.errors import ConfigError
from snapjax.models import conv as conv_lib

# He et al. 2015 init as in fb.resnet.torch and the DenseNet Torch code: N(0, 2 / (k * k * c_out)).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
  """Bias-free k x k convolution with symmetric k // 2 padding (as in Torch), float32 params.

  Runs snapjax.models.conv's convolution (on CPU a faster weight gradient; XLA's own elsewhere).
  """
  pad = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      use_bias=False, kernel_init=conv_kernel_init, dtype=dtype, param_dtype=jnp.float32,
      conv_general_dilated=conv_lib.conv_general_dilated, name=name)


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  """BatchNorm with running statistics in `batch_stats` (momentum 0.9, eps 1e-5), float32 params."""
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
      param_dtype=jnp.float32, name=name)


def pooled_logits(x_BxHxWxC: jnp.ndarray, num_classes: int, dtype: Any) -> jnp.ndarray:
  """Global average pool then a dense classifier (Flax default init, zero bias); float32 logits."""
  pooled_BxC = jnp.mean(x_BxHxWxC, axis=(1, 2))
  logits_BxK = nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, name="classifier")(
      pooled_BxC)
  return logits_BxK.astype(jnp.float32)


def check_int(arg: str, value: Any, minimum: int) -> None:
  """Raises ConfigError unless `value` is an int (not bool) >= minimum."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"{arg} must be an integer >= {minimum}, got {value!r}")


def check_common(module: nn.Module) -> None:
  """Validates the fields every model shares: num_classes, dtype and (if present) stem_stride."""
  check_int("num_classes", module.num_classes, 1)
  try:
    floating = jnp.issubdtype(jnp.dtype(module.dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise ConfigError(f"dtype must be a floating dtype such as jnp.float32 or jnp.bfloat16, "
                      f"got {module.dtype!r}")
  stem_stride = getattr(module, "stem_stride", 1)
  if isinstance(stem_stride, bool) or stem_stride not in (1, 2):
    raise ConfigError(f"stem_stride must be 1 (32x32 inputs) or 2 (64x64 Tiny ImageNet), "
                      f"got {stem_stride!r}")


def check_dropout(rate: Any) -> None:
  """Raises ConfigError unless 0 <= rate < 1."""
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
    raise ConfigError(f"dropout_rate must be a number in [0, 1), got {rate!r}")


def blocks_per_stage(depth: Any) -> int:
  """n for a depth = 6n + 2 three-stage CIFAR ResNet; raises ConfigError otherwise."""
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
    raise ConfigError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), "
                      f"got {depth!r}")
  return (depth - 2) // 6


class BasicBlock(nn.Module):
  """Post-activation basic block: conv-BN-ReLU-conv-BN, add shortcut, ReLU."""
  features: int
  stride: int
  shortcut: str
  dtype: Any

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool) -> jnp.ndarray:
    y = conv(self.features, 3, self.stride, self.dtype, "conv1")(x_BxHxWxC)
    y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
    y = conv(self.features, 3, 1, self.dtype, "conv2")(y)
    y = batch_norm(train, self.dtype, "bn2")(y)
    x = x_BxHxWxC
    if self.stride != 1 or x.shape[-1] != self.features:
      if self.shortcut == "A":  # Subsample, then zero-pad the new channels (no parameters).
        x = x[:, ::self.stride, ::self.stride, :]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.features - x.shape[-1])))
      else:  # "B": 1x1 projection.
        x = conv(self.features, 1, self.stride, self.dtype, "proj_conv")(x)
        x = batch_norm(train, self.dtype, "proj_bn")(x)
    return nn.relu(y + x)


class CifarResNet(nn.Module):
  """He et al. 2015 CIFAR ResNet: depth 6n + 2, 3 stages of n basic blocks (width, 2w, 4w channels).

  shortcut "A" (default, as in the paper's reference code): parameter-free subsample + zero-pad
  where the shape changes; "B": 1x1 conv + BN projection there. ResNet-110/A has 1.73M params.
  """
  depth: int
  num_classes: int
  width: int = 16
  shortcut: str = "A"
  dtype: Any = jnp.float32
  stem_stride: int = 1

  def __post_init__(self):
    blocks_per_stage(self.depth)
    check_int("width", self.width, 1)
    if self.shortcut not in ("A", "B"):
      raise ConfigError(f"shortcut must be 'A' or 'B', got {self.shortcut!r}")
    check_common(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = x_BxHxWxC.astype(self.dtype)
    x = conv(self.width, 3, self.stem_stride, self.dtype, "stem_conv")(x)
    x = nn.relu(batch_norm(train, self.dtype, "stem_bn")(x))
    for stage in range(3):
      for block in range(blocks_per_stage(self.depth)):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, stride, self.shortcut, self.dtype,
                       name=f"stage{stage + 1}_block{block + 1}")(x, train)
    return pooled_logits(x, self.num_classes, self.dtype)


class WideBlock(nn.Module):
  """Pre-activation wide block: BN-ReLU-conv3x3-dropout-BN-ReLU-conv3x3, plus shortcut."""
  features: int
  stride: int
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool) -> jnp.ndarray:
    act = nn.relu(batch_norm(train, self.dtype, "bn1")(x_BxHxWxC))
    if self.stride != 1 or x_BxHxWxC.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, self.dtype, "proj_conv")(act)
    else:
      shortcut = x_BxHxWxC
    y = conv(self.features, 3, self.stride, self.dtype, "conv1")(act)
    y = nn.relu(batch_norm(train, self.dtype, "bn2")(y))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(self.features, 3, 1, self.dtype, "conv2")(y)
    return y + shortcut


class WideResNet(nn.Module):
  """Pre-activation Wide-ResNet (Zagoruyko & Komodakis 2016) on the CIFAR ResNet depth 6n + 2 grid.

  Layout: 3x3 stem conv with 16 channels (not widened, as in Zagoruyko & Komodakis), then 3 stages
  of n = (depth - 2) / 6 pre-activation blocks with 16k, 32k, 64k channels (k = widen_factor;
  strides 1, 2, 2), a 1x1 conv shortcut (no BN) where the channels or stride change, dropout
  between a block's two convs, final BN-ReLU, global average pool, dense. Depth counts the stem,
  the 6n 3x3 convs and the classifier (1x1 shortcuts not counted), so the paper's WRN-32-4 is
  depth 32 (n = 5), widen_factor 4: 64/128/256 channels, the ResNet-32 layout 4x wider.
  """
  depth: int
  widen_factor: int
  num_classes: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  stem_stride: int = 1

  def __post_init__(self):
    blocks_per_stage(self.depth)
    check_int("widen_factor", self.widen_factor, 1)
    check_dropout(self.dropout_rate)
    check_common(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = x_BxHxWxC.astype(self.dtype)
    x = conv(16, 3, self.stem_stride, self.dtype, "stem_conv")(x)
    for stage in range(3):
      for block in range(blocks_per_stage(self.depth)):
        stride = 2 if stage > 0 and block == 0 else 1
        x = WideBlock(16 * 2**stage * self.widen_factor, stride, self.dropout_rate, self.dtype,
                      name=f"stage{stage + 1}_block{block + 1}")(x, train)
    x = nn.relu(batch_norm(train, self.dtype, "final_bn")(x))
    return pooled_logits(x, self.num_classes, self.dtype)
