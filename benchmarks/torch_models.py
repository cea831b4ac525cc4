"""PyTorch twins of snapjax's CIFAR ResNet (option-A shortcuts) and DenseNet, for side-by-side benchmarks.

Same layers, shapes and parameter counts as snapjax.models.CifarResNet(shortcut="A") and
snapjax.models.DenseNet(bottleneck=False, compression=1): bias-free 3x3 convs, BatchNorm (eps 1e-5,
torch momentum 0.1 = Flax momentum 0.9), global average pool, a dense classifier with bias. Only speed is
compared, so initialisation is PyTorch's default.
"""
import re

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
  """conv-BN-ReLU-conv-BN, plus the option-A shortcut (subsample, zero-pad the new channels), ReLU."""

  def __init__(self, c_in: int, c_out: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = _conv(c_in, c_out, 3, stride), nn.BatchNorm2d(c_out)
    self.conv2, self.bn2 = _conv(c_out, c_out, 3), nn.BatchNorm2d(c_out)
    self.stride, self.pad = stride, c_out - c_in

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.stride != 1 or self.pad:
      x = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.pad))
    return F.relu(y + x)


class CifarResNet(nn.Module):
  """He et al. 2015 CIFAR ResNet, depth 6n + 2, widths 16/32/64, option-A shortcuts (as snapjax's default)."""

  def __init__(self, depth: int, num_classes: int = 10, width: int = 16, in_channels: int = 3):
    super().__init__()
    n = (depth - 2) // 6
    self.stem, self.stem_bn = _conv(in_channels, width, 3), nn.BatchNorm2d(width)
    blocks, c = [], width
    for stage in range(3):
      for block in range(n):
        stride = 2 if stage > 0 and block == 0 else 1
        blocks.append(BasicBlock(c, width * 2**stage, stride))
        c = width * 2**stage
    self.blocks = nn.Sequential(*blocks)
    self.classifier = nn.Linear(c, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.blocks(F.relu(self.stem_bn(self.stem(x))))
    return self.classifier(x.mean(dim=(2, 3)))


class DenseNet(nn.Module):
  """Huang et al. 2016 CIFAR DenseNet without bottleneck or compression (DenseNet-40: depth 40, k = 12)."""

  def __init__(self, depth: int = 40, growth_rate: int = 12, num_classes: int = 10):
    super().__init__()
    layers = (depth - 4) // 3
    self.stem = _conv(3, 16, 3)
    c, self.blocks, self.transitions = 16, nn.ModuleList(), nn.ModuleList()
    for block in range(3):
      dense = nn.ModuleList()
      for _ in range(layers):
        dense.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), _conv(c, growth_rate, 3)))
        c += growth_rate
      self.blocks.append(dense)
      if block < 2:
        self.transitions.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), _conv(c, c, 1), nn.AvgPool2d(2)))
    self.final_bn = nn.BatchNorm2d(c)
    self.classifier = nn.Linear(c, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.stem(x)
    for block, dense in enumerate(self.blocks):
      for layer in dense:
        x = torch.cat([x, layer(x)], dim=1)
      if block < 2:
        x = self.transitions[block](x)
    x = F.relu(self.final_bn(x))
    return self.classifier(x.mean(dim=(2, 3)))


def get(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
  """The PyTorch twin of the snapjax model `name` (resnet<6n+2> or densenet40); in_channels: ResNets only (1 for
  Fashion-MNIST)."""
  if name.startswith("resnet") and name[6:].isdigit():
    return CifarResNet(int(name[6:]), num_classes, in_channels=in_channels)
  if name == "densenet40":
    return DenseNet(40, 12, num_classes)
  raise ValueError(f"no PyTorch twin for model {name!r}; known: resnet<6n+2> (resnet20, resnet56, ...), densenet40")


def num_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def _copy_conv(conv: nn.Conv2d, kernel_HxWxIxO) -> None:
  conv.weight.copy_(torch.from_numpy(np.asarray(kernel_HxWxIxO).transpose(3, 2, 0, 1).copy()))


def _copy_bn(bn: nn.BatchNorm2d, params, stats) -> None:
  for dst, src in ((bn.weight, params["scale"]), (bn.bias, params["bias"]), (bn.running_mean, stats["mean"]),
                   (bn.running_var, stats["var"])):
    dst.copy_(torch.from_numpy(np.asarray(src).copy()))


@torch.no_grad()
def load_flax_variables(model: nn.Module, variables) -> None:
  """Copies a snapjax model's {'params', 'batch_stats'} into its twin (HWIO kernels -> OIHW), in place."""
  p, s = variables["params"], variables["batch_stats"]
  if isinstance(model, CifarResNet):
    _copy_conv(model.stem, p["stem_conv"]["kernel"])
    _copy_bn(model.stem_bn, p["stem_bn"], s["stem_bn"])
    names = sorted((k for k in p if k.startswith("stage")), key=lambda k: tuple(int(t) for t in re.findall(r"\d+", k)))
    for block, name in zip(model.blocks, names):
      for i in (1, 2):
        _copy_conv(getattr(block, f"conv{i}"), p[name][f"conv{i}"]["kernel"])
        _copy_bn(getattr(block, f"bn{i}"), p[name][f"bn{i}"], s[name][f"bn{i}"])
  elif isinstance(model, DenseNet):
    _copy_conv(model.stem, p["stem_conv"]["kernel"])
    for b, dense in enumerate(model.blocks):
      for l, layer in enumerate(dense):
        name = f"block{b + 1}_layer{l + 1}"
        _copy_bn(layer[0], p[name]["bn1"], s[name]["bn1"])
        _copy_conv(layer[2], p[name]["conv1"]["kernel"])
    for t, transition in enumerate(model.transitions):
      _copy_bn(transition[0], p[f"transition{t + 1}_bn"], s[f"transition{t + 1}_bn"])
      _copy_conv(transition[2], p[f"transition{t + 1}_conv"]["kernel"])
    _copy_bn(model.final_bn, p["final_bn"], s["final_bn"])
  else:
    raise TypeError(f"no weight mapping for {type(model).__name__}")
  model.classifier.weight.copy_(torch.from_numpy(np.asarray(p["classifier"]["kernel"]).T.copy()))
  model.classifier.bias.copy_(torch.from_numpy(np.asarray(p["classifier"]["bias"]).copy()))
