"""DenseNets for 32x32 / 64x64 inputs (Huang et al. 2016), plain and bottleneck-compressed (BC)."""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from snapjax.errors import ConfigError
from snapjax.models.resnet import batch_norm, check_common, check_dropout, conv, pooled_logits


class DenseLayer(nn.Module):
  """BN-ReLU-conv3x3(k) (BC: after BN-ReLU-conv1x1(4k)); dropout after each conv; concat."""
  growth_rate: int
  bottleneck: bool
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool) -> jnp.ndarray:
    y = x_BxHxWxC
    if self.bottleneck:
      y = nn.relu(batch_norm(train, self.dtype, "bn0")(y))
      y = conv(4 * self.growth_rate, 1, 1, self.dtype, "conv0")(y)
      y = _dropout(y, self.dropout_rate, train)
    y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
    y = conv(self.growth_rate, 3, 1, self.dtype, "conv1")(y)
    y = _dropout(y, self.dropout_rate, train)
    return jnp.concatenate([x_BxHxWxC, y], axis=-1)


class DenseNet(nn.Module):
  """Huang et al. 2016 CIFAR DenseNet: 3 dense blocks joined by transitions, growth rate k.

  Layers per block: (depth - 4) / 3, or (depth - 4) / 6 bottleneck layers when `bottleneck`.
  Stem: 3x3 conv with 16 channels (2k when `bottleneck`, as in DenseNet-BC).
  Transition: BN-ReLU-conv1x1(floor(compression * c))-dropout-avgpool 2x2. Head: BN-ReLU,
  global average pool, dense. DenseNet-40 (k=12) has 1.02M params, DenseNet-100 (k=24) 27.2M.
  """
  depth: int
  growth_rate: int
  num_classes: int
  bottleneck: bool = False
  compression: float = 1.0
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  stem_stride: int = 1

  def __post_init__(self):
    self.layers_per_block()
    if isinstance(self.growth_rate, bool) or not isinstance(self.growth_rate, int) or (
        self.growth_rate < 1):
      raise ConfigError(f"growth_rate must be an integer >= 1, got {self.growth_rate!r}")
    if not isinstance(self.bottleneck, bool):
      raise ConfigError(f"bottleneck must be True or False, got {self.bottleneck!r}")
    if isinstance(self.compression, bool) or not isinstance(self.compression, (int, float)) or (
        not 0.0 < self.compression <= 1.0):
      raise ConfigError(f"compression must be a number in (0, 1], got {self.compression!r}")
    check_dropout(self.dropout_rate)
    check_common(self)
    super().__post_init__()

  def layers_per_block(self) -> int:
    """Dense layers in each of the 3 blocks; raises ConfigError if depth does not fit."""
    per_layer = 6 if self.bottleneck else 3
    depth = self.depth
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 4 + per_layer or (
        (depth - 4) % per_layer):
      raise ConfigError(f"depth must be {per_layer}n + 4 with n >= 1 for bottleneck="
                        f"{self.bottleneck}, got {depth!r}")
    return (depth - 4) // per_layer

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = x_BxHxWxC.astype(self.dtype)
    stem_features = 2 * self.growth_rate if self.bottleneck else 16
    x = conv(stem_features, 3, self.stem_stride, self.dtype, "stem_conv")(x)
    for block in range(3):
      for layer in range(self.layers_per_block()):
        x = DenseLayer(self.growth_rate, self.bottleneck, self.dropout_rate, self.dtype,
                       name=f"block{block + 1}_layer{layer + 1}")(x, train)
      if block < 2:
        x = nn.relu(batch_norm(train, self.dtype, f"transition{block + 1}_bn")(x))
        features = math.floor(self.compression * x.shape[-1])
        x = conv(features, 1, 1, self.dtype, f"transition{block + 1}_conv")(x)
        x = _dropout(x, self.dropout_rate, train)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(batch_norm(train, self.dtype, "final_bn")(x))
    return pooled_logits(x, self.num_classes, self.dtype)


def _dropout(x: jnp.ndarray, rate: float, train: bool) -> jnp.ndarray:
  """Dropout with the 'dropout' rng stream, active only in training; a no-op when rate is 0."""
  return nn.Dropout(rate, deterministic=not train)(x) if rate > 0 else x
