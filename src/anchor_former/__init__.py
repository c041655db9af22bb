"""anchor-former: the AcFormer vision-language connector as a drop-in PyTorch package.

Public API (also listed in ``docs/api.md``). Modules add their names here explicitly.
"""

from anchor_former import flops
from anchor_former.search import AnchorSearch, anchor_quotas, anchor_search

__version__ = "0.1.0"

__all__ = [
    "AnchorSearch",
    "anchor_quotas",
    "anchor_search",
    "flops",
]
