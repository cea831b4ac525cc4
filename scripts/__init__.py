"""The repository's scripts, importable for their tests: `from scripts import paper_table, study`.

Each runs as `python scripts/NAME.py` (it puts the repository root on sys.path first).
"""
