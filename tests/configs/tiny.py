"""Tiny run for subprocess tests: set --config.fashion_mnist_dir to a directory made by helpers.make_tiny_fashion_mnist."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helpers  # noqa: E402


def get_config():
  return helpers.tiny_config("")
