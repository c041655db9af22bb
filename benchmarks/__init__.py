"""The anchor-former benchmark suite (not part of the installed package).

Run it from the repository root as a package, ``python -m benchmarks.run`` (or ``python benchmarks/run.py``
from anywhere); each benchmark also runs alone, e.g. ``python -m benchmarks.bench_search --preset tiny``.
Modules import each other as ``benchmarks.<name>``.
"""
