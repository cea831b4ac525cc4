"""ImageNet ResNet-50 (He et al. 2015): bottleneck v1.5, as in torchvision and fb.resnet.torch."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from snapjax.models.resnet import batch_norm, check_common, conv, pooled_logits


class Bottleneck(nn.Module):
  """conv1x1(w)-BN-ReLU-conv3x3(w, stride)-BN-ReLU-conv1x1(4w)-BN, add shortcut, ReLU."""
  width: int
  stride: int
  dtype: Any

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool) -> jnp.ndarray:
    y = conv(self.width, 1, 1, self.dtype, "conv1")(x_BxHxWxC)
    y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
    y = conv(self.width, 3, self.stride, self.dtype, "conv2")(y)
    y = nn.relu(batch_norm(train, self.dtype, "bn2")(y))
    y = conv(4 * self.width, 1, 1, self.dtype, "conv3")(y)
    y = batch_norm(train, self.dtype, "bn3")(y)
    x = x_BxHxWxC
    if self.stride != 1 or x.shape[-1] != 4 * self.width:  # Projection shortcut (option B).
      x = conv(4 * self.width, 1, self.stride, self.dtype, "proj_conv")(x)
      x = batch_norm(train, self.dtype, "proj_bn")(x)
    return nn.relu(y + x)


class ResNet50(nn.Module):
  """ResNet-50 v1.5 (stride 2 in the 3x3 conv, not the first 1x1): 25,557,032 params, 1000 classes.

  Stem: 7x7/2 conv (64) - BN - ReLU - 3x3/2 max pool; stages of 3, 4, 6, 3 bottlenecks with widths
  64, 128, 256, 512 (outputs 4x). The stem is fixed, so there is no `stem_stride` field.
  """
  num_classes: int
  dtype: Any = jnp.float32

  def __post_init__(self):
    check_common(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool) -> jnp.ndarray:
    x = x_BxHxWxC.astype(self.dtype)
    x = conv(64, 7, 2, self.dtype, "stem_conv")(x)
    x = nn.relu(batch_norm(train, self.dtype, "stem_bn")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate((3, 4, 6, 3)):
      for block in range(num_blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = Bottleneck(64 * 2**stage, stride, self.dtype,
                       name=f"stage{stage + 1}_block{block + 1}")(x, train)
    return pooled_logits(x, self.num_classes, self.dtype)
