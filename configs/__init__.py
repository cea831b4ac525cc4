"""The configs `train.py --config configs/NAME.py[:METHOD]` takes, importable as a package from the checkout.

`from configs import quickstart` (the repository root on sys.path: the scripts and benchmarks put it there, pytest
through pyproject.toml's `pythonpath`), or by a name known only at run time with `load("quickstart")`; `names()`
lists them. Each module's `get_config(method)` builds the ConfigDict that train.py builds from the same file.
"""
import importlib
import pkgutil
from types import ModuleType


def names() -> list[str]:
  """The name of every config module here, sorted: ["cifar100_densenet100", ..., "tinyimagenet_wrn32_4"]."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__))


def load(name: str) -> ModuleType:
  """The config module of that name ("quickstart" for configs/quickstart.py); ModuleNotFoundError if none."""
  return importlib.import_module(f"{__name__}.{name}")
