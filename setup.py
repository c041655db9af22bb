"""Build hook for the optional compiled CPU kernel of the anchor search (everything else is in pyproject.toml).

``optional=True``: without a working C compiler the install still succeeds and the search uses its
PyTorch paths (same results).
"""

import sys

from setuptools import Extension, setup

# -pthread: the kernel splits large batches over POSIX threads (one thread on Windows).
extra_compile_args = ["/O2"] if sys.platform == "win32" else ["-O3", "-std=c99", "-pthread"]
extra_link_args = [] if sys.platform == "win32" else ["-pthread"]

setup(
    ext_modules=[
        Extension(
            "anchor_former._native",
            sources=["src/anchor_former/_native.c"],
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            optional=True,
        )
    ]
)
