"""The transformers families (one module each); they need the ``hf`` extra, checked here first."""

from anchor_former._optional import require

require("transformers", extra="hf", feature="anchor_former.adapters.hf (transformers models)")
