"""Safe checkpoint loading and the converters from the weight layouts people already have.

Loading never unpickles code: ``.safetensors`` files are read with :mod:`safetensors`, anything else
with ``torch.load(..., weights_only=True)``, which only rebuilds tensors and plain containers. A pickle
that asks for anything else (a function call, an arbitrary class) is refused with
:class:`CheckpointError` before any of its code runs.

Layouts understood (keys as they appear under LLaVA's ``model.mm_projector.``):

* ``"llava_mlp"``: LLaVA-1.5's ``mm_projector.bin``, keys ``model.mm_projector.0.*`` and
  ``model.mm_projector.2.*`` (``mlp2x_gelu``; deeper ``mlpNx_gelu`` adds ``.4.*``, ...), or transformers'
  ``multi_modal_projector.linear_1.*`` / ``linear_2.*``. It warm-starts the output MLP
  (``AnchorFormer.projector``) only.
* ``"reference_acformer"``: the reference AcFormer patch's projector,
  ``model.mm_projector.0.layers.{i}.0.*`` (attention), ``0.layers.{i}.1.{0,1,3}.*`` (feed-forward),
  ``0.norm.*``, the unused ``0.latents``, and the MLP at ``1.*`` and ``3.*``. The authors' code trains it
  with 256 anchors (``REFERENCE_NUM_ANCHORS``); loading it into another ``num_anchors`` warns.
* ``"anchor_former"``: this package's own :class:`~anchor_former.AnchorFormer` state dict (possibly
  under a prefix such as ``model.mm_projector.connector.``).

Key prefixes up to and including ``mm_projector.`` (``model.``, ``base_model.model.model.`` of a PEFT
wrapper, ...) are stripped before the layout is read.

Each connector converts the layouts it comes from itself (:meth:`anchor_former.connectors.Connector.convert_checkpoint`;
the reference AcFormer converter lives with :class:`~anchor_former.AnchorFormer` in
:mod:`anchor_former.connectors._acformer`); this module reads files, tells layouts apart and loads the
converted keys with every check (:func:`load_connector_weights`).
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping

import torch
from torch import nn

from anchor_former._optional import require
from anchor_former._state_keys import (
    CheckpointError,
    Layout,
    StateDict,
    is_mlp_key,
    llava_projector_to_mlp,
    own_or_llava_keys,
    strip_projector_prefix,
)
from anchor_former._validation import shape_str
from anchor_former.connectors._acformer import (
    REFERENCE_NUM_ANCHORS,
    AnchorFormer,
    is_reference_acformer,
    reference_acformer_to_anchor_former,
)
from anchor_former.connectors._base import Connector

__all__ = [
    "CheckpointError",
    "Layout",
    "detect_layout",
    "load_connector_weights",
    "load_state_dict",
    "REFERENCE_NUM_ANCHORS",
    "save_state_dict",
    "to_anchor_former",
]

# --- reading and writing -------------------------------------------------------------------------------


# torch.save's legacy (pre-zip) format opens with a pickled magic number: PROTO, then LONG1 of 10 bytes.
_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
# What torch's weights-only unpickler says when a pickle asks for code (a global, a call, an object).
_REFUSED = re.compile(r"GLOBAL|allowlist|reduce|create new object|must be imported to load", re.IGNORECASE)
# What a damaged or foreign file raises inside torch.load / safetensors.
_CORRUPT_ERRORS = (
    EOFError, OSError, RuntimeError, KeyError, ValueError, IndexError, TypeError, AttributeError,
    UnicodeDecodeError, zipfile.BadZipFile, struct.error, pickle.UnpicklingError,
)  # fmt: skip


def _corrupt(path: str, detail: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path!r} is corrupt or not a checkpoint ({detail})")


def _read_safetensors(path: str, device: str) -> StateDict:
    """All tensors of a safetensors file on ``device``; ``"meta"`` reads only the header (shapes, dtypes)."""
    safe_open = require("safetensors", extra="hf", feature="reading .safetensors checkpoints").safe_open
    try:
        with safe_open(path, framework="pt") as f:
            if device != "meta":
                return {k: f.get_tensor(k).to(device) for k in f.keys()}
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                out[k] = (
                    torch.empty(sl.get_shape(), dtype=dtype, device="meta") if dtype else f.get_tensor(k).to("meta")
                )
            return out
    except Exception as err:  # safetensors raises its own SafetensorError (an Exception) for damaged files
        if isinstance(err, CheckpointError):
            raise
        raise _corrupt(path, f"safetensors could not read it: {type(err).__name__}: {err}") from err


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _read_pickle(path: str, map_location: str | torch.device) -> object:
    """``torch.load(weights_only=True)`` with every failure turned into a :class:`CheckpointError` that says
    whether the file is damaged/foreign or was refused because it asks to run code."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not (zipfile.is_zipfile(path) or (head[:1] == b"\x80" and head[2:14] == _LEGACY_MAGIC)):
        raise _corrupt(path, "neither the zip archive torch.save writes nor its legacy pickle format")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not _REFUSED.search(str(err)):
            raise _corrupt(path, f"its pickle is damaged: {_last_line(err)}") from err
        raise CheckpointError(
            f"refused to load {path!r}: would execute code. Its pickle asks for objects other than tensors and "
            "plain containers, which unpickling would construct by running code "
            f"(torch.load(weights_only=True) stopped at: {_last_line(err)}). If you trust the file, re-save its tensors with "
            "anchor_former.checkpoint.save_state_dict (safetensors)."
        ) from err
    except _CORRUPT_ERRORS as err:
        raise _corrupt(path, f"{type(err).__name__}: {_last_line(err)}") from err


def _last_line(err: BaseException) -> str:
    """The informative line of an error message (torch's weights-only errors end with the reason)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    reason = [line for line in lines if "WeightsUnpickler error" in line or "GLOBAL" in line]
    return (reason or lines or [type(err).__name__])[-1][:300]


def load_state_dict(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> StateDict:
    """Read a flat ``{name: tensor}`` checkpoint without executing code.

    Args:
        path: a ``.safetensors`` file, or a PyTorch file (``.bin``, ``.pt``, ``.pth``) holding a dict of
            tensors (what ``torch.save(module.state_dict(), path)`` writes).
        map_location: where the tensors go; ``"meta"`` works for both formats (shapes and dtypes only;
            safetensors then reads just the header).

    Raises:
        CheckpointError: naming the path, when the file is missing; corrupt or not a checkpoint (truncated,
            empty, random bytes, another format); refused because its pickle needs anything besides tensors
            and plain containers (it would run code on load; nothing of it runs); or not a flat mapping
            from names to tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint path {path!r} is not a file")
    if path.endswith(".safetensors"):
        return _read_safetensors(path, str(map_location))
    obj = _read_pickle(path, map_location)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path!r} must hold a dict of tensors, got {type(obj).__name__}")
    bad = [
        f"{k!r} ({type(v).__name__})"
        for k, v in obj.items()
        if not (isinstance(k, str) and isinstance(v, torch.Tensor))
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint {path!r} must be a flat dict of name -> tensor; these entries are not: {', '.join(bad[:8])}"
            + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        )
    return dict(obj)


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, metadata: dict[str, str] | None = None
) -> None:
    """Write ``state_dict`` as safetensors (contiguous CPU copies; shared storage is fine)."""
    save_file = require("safetensors.torch", extra="hf", feature="saving checkpoints (safetensors)").save_file
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, os.fspath(path), metadata=metadata)


# --- layouts ---------------------------------------------------------------------------------------------


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> Layout:
    """Which layout a projector state dict has (after :func:`strip_projector_prefix`).

    Raises:
        CheckpointError: no known layout; the message lists a few of the keys.
    """
    keys = set(strip_projector_prefix(state_dict))
    if keys and all(is_mlp_key(k) for k in keys):
        return "llava_mlp"
    if is_reference_acformer(state_dict):
        return "reference_acformer"
    inner = {k.split("connector.", 1)[-1] for k in keys}
    if any(k.startswith("layers.") for k in inner) and any(k.startswith("projector.") for k in inner):
        return "anchor_former"
    sample = ", ".join(sorted(keys)[:6]) or "(no keys)"
    raise CheckpointError(
        "unrecognised projector checkpoint layout; expected LLaVA's mm_projector.{0,2}.* (or transformers' "
        "multi_modal_projector.linear_{1,2}.*), the reference AcFormer mm_projector.0.layers.* / 1.* / 3.*, or an "
        f"AnchorFormer state dict (layers.*, norm.*, projector.*); got keys such as: {sample}"
    )


def to_anchor_former(state_dict: Mapping[str, torch.Tensor]) -> tuple[StateDict, Layout]:
    """Convert any known layout to AnchorFormer keys; returns ``(state_dict, layout)``.

    For ``"llava_mlp"`` only the output MLP is present (keys ``projector.*``): load it with
    ``strict=False`` semantics, i.e. :func:`load_checked` ``(..., partial=True)``.
    """
    layout = detect_layout(state_dict)
    if layout == "reference_acformer":
        return reference_acformer_to_anchor_former(state_dict), layout
    return own_or_llava_keys(state_dict)


def _kind_problem(value: object, target: torch.Tensor) -> str | None:
    """Why ``value`` cannot be copied into ``target`` by ``load_state_dict`` (None if it can)."""
    if not isinstance(value, torch.Tensor):
        return f"a {type(value).__name__}, not a tensor"
    if value.layout != torch.strided:
        return f"a {value.layout} tensor, not a dense one"
    if value.is_quantized:
        return f"a quantized tensor ({value.dtype})"
    if value.device.type == "meta" and target.device.type != "meta":
        return "a meta tensor (it has no values)"
    if _family(value) != _family(target):
        return f"dtype {value.dtype} ({_family(value)}) for a {target.dtype} ({_family(target)}) tensor"
    return None


def _family(t: torch.Tensor) -> str:
    return "complex" if t.is_complex() else "floating" if t.is_floating_point() else "integer/bool"


def load_checked(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, partial: bool = False, what: str = "checkpoint"
) -> None:
    """``module.load_state_dict`` that checks everything first and changes nothing on failure.

    Every value is checked (a dense, non-quantized tensor with values, of the target's dtype family: a
    floating tensor for a floating parameter, ...) and converted to the target's dtype and device
    *before* the first copy, so the copy itself cannot fail half-way.

    Args:
        module: the module to load into.
        state_dict: keys relative to ``module``.
        partial: allow keys of ``module`` to be missing from ``state_dict`` (a warm start of a part).
        what: how to call the checkpoint in messages.

    Raises:
        CheckpointError: unexpected keys, missing keys (unless ``partial``), shape mismatches or values of
            the wrong kind (non-tensor, sparse, meta, quantized, complex for real, ...); the message
            names each key. The module is unchanged then.
    """
    target = module.state_dict()
    unexpected = sorted(set(state_dict) - set(target))
    missing = [] if partial else sorted(set(target) - set(state_dict))
    known = {k: v for k, v in state_dict.items() if k in target and isinstance(target[k], torch.Tensor)}
    wrong_kind = [f"{k}: {why}" for k, v in known.items() if (why := _kind_problem(v, target[k]))]
    mismatched = [
        f"{k}: checkpoint {shape_str(v)} vs module {shape_str(target[k])}"
        for k, v in known.items()
        if isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(target[k].shape)
    ]
    problems = []
    if unexpected:
        problems.append(
            f"unexpected keys {unexpected[:8]}" + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
        )
    if missing:
        problems.append(f"missing keys {missing[:8]}" + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    if mismatched:
        problems.append("shape mismatches " + "; ".join(mismatched[:8]))
    if wrong_kind:
        problems.append("values of the wrong kind " + "; ".join(wrong_kind[:8]))
    if problems:
        raise CheckpointError(f"{what} does not fit {type(module).__name__}: " + "; ".join(problems))
    converted = dict(state_dict)
    for k, v in known.items():
        try:  # before any copy: a failure here leaves the module as it was
            converted[k] = v.detach().to(device=target[k].device, dtype=target[k].dtype)
        except (RuntimeError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"{what} does not fit {type(module).__name__}: {k} cannot be converted to {target[k].dtype} on "
                f"{target[k].device}: {err}"
            ) from err
    module.load_state_dict(converted, strict=not partial)


def load_connector_weights(
    connector: nn.Module, checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor]
) -> Layout:
    """Load a checkpoint of any known layout into a connector; returns the layout found.

    Args:
        connector: an :class:`~anchor_former.AnchorFormer` or another connector with an output MLP at
            ``.projector`` (or a bare LLaVA ``linear`` / ``mlpNx_gelu`` projector).
        checkpoint: a path (read by :func:`load_state_dict`) or a state dict. LLaVA ``mm_projector``
            weights fill the output MLP only (the rest keeps its values); the reference AcFormer layout and
            this package's own layout (any prefix up to ``mm_projector.`` / ``connector.``) fill everything.

    Raises:
        CheckpointError: unsafe file, unknown layout, or keys/shapes that do not fit (named); the connector
            is unchanged then.
    """
    state = dict(checkpoint) if isinstance(checkpoint, Mapping) else load_state_dict(checkpoint)
    if isinstance(connector, Connector):
        if isinstance(connector, AnchorFormer):
            detect_layout(state)  # an AcFormer reads only known layouts (names the keys otherwise)
        converted, layout = connector.convert_checkpoint(state)
    elif not hasattr(connector, "projector"):  # a bare LLaVA projector (nn.Linear / nn.Sequential)
        converted, layout = llava_projector_to_mlp(state), "llava_mlp"
        load_checked(connector, converted, what="LLaVA projector checkpoint")
        return layout
    else:  # another module with an output projector at .projector
        converted, layout = own_or_llava_keys(state)
    load_checked(connector, converted, partial=layout == "llava_mlp", what=f"{layout} checkpoint")
    return layout
