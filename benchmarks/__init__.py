"""The benchmarks, importable for their tests: `from benchmarks import cost_analysis`.

Each runs as `python benchmarks/NAME.py` (it puts the repository root on sys.path first); benchmarks/README.md
has their results.
"""
