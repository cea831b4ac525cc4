"""Model zoo: the paper's networks as Flax Linen modules, looked up by name with `get`."""
import dataclasses
from typing import Any

import flax.linen as nn

from snapjax.errors import ConfigError
from snapjax.models.densenet import DenseNet
from snapjax.models.imagenet_resnet import ResNet50
from snapjax.models.resnet import CifarResNet, WideResNet

__all__ = ["CifarResNet", "DenseNet", "ResNet50", "WideResNet", "get", "names"]

# name -> (class, fields the name fixes).
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "resnet8": (CifarResNet, {"depth": 8}),
    "resnet20": (CifarResNet, {"depth": 20}),
    "resnet32": (CifarResNet, {"depth": 32}),
    "resnet56": (CifarResNet, {"depth": 56}),
    "resnet110": (CifarResNet, {"depth": 110}),
    "wrn32_4": (WideResNet, {"depth": 32, "widen_factor": 4}),
    # Small, with dropout (Fashion-MNIST's dropout baseline): 2 blocks per stage, 32/64/128 channels. The
    # depth counts as wrn32_4's (stem, 3x3 convs, classifier): Zagoruyko & Komodakis, who count the
    # shortcuts too, call this layout WRN-16-2.
    "wrn14_2": (WideResNet, {"depth": 14, "widen_factor": 2}),
    "densenet40": (DenseNet, {"depth": 40, "growth_rate": 12}),
    "densenet100": (DenseNet, {"depth": 100, "growth_rate": 24}),
    "densenet_bc100": (DenseNet, {"depth": 100, "growth_rate": 12, "bottleneck": True,
                                  "compression": 0.5}),
    "resnet50": (ResNet50, {}),
}


def names() -> list[str]:
  """Sorted names `get` accepts."""
  return sorted(_REGISTRY)


def get(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds the registered model `name` with `num_classes` outputs; kwargs set its other fields."""
  if name not in _REGISTRY:
    raise ConfigError(f"unknown model name {name!r}; known names: {', '.join(names())}")
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
  cls, fixed = _REGISTRY[name]
  allowed = sorted(f.name for f in dataclasses.fields(cls)
                   if f.init and f.name not in ("parent", "name", "num_classes", *fixed))
  for key in sorted(kwargs):
    if key in fixed:
      raise ConfigError(f"model {name!r} fixes {key}={fixed[key]!r}; build {cls.__name__} "
                        f"directly for other values")
    if key not in allowed:
      raise ConfigError(f"model {name!r} does not accept argument {key!r}; allowed: "
                        f"{', '.join(allowed)}")
  return cls(num_classes=num_classes, **fixed, **kwargs)
