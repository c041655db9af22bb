"""One probed forward of a host's vision tower: safe from several threads, and a clear boundary for
``torch.compile``. Shared by every host family (transformers LLaVA-1.5 / NeXT / OneVision / Qwen-VL and
llava-torch): :func:`probed_forward` runs the tower under an :class:`~anchor_former.probes.AttentionProbe`,
:func:`hooked_forward` under any per-call hooks (Qwen-VL's score hook on one vision block).

An :class:`~anchor_former.probes.AttentionProbe` works through forward hooks on the encoder's modules.
Hooks belong to the module, not to the call, so:

* **threads**: two threads probing the same encoder at the same time would each see the other's
  forward (two captures where one is expected, or, worse, the other request's anchors). Each call here
  builds its own probe and runs the encoder while holding a lock that belongs to that encoder object:
  probed forwards of ONE encoder take turns (the rest of the model, e.g. the language model during
  ``generate``, runs concurrently); different encoders never wait for each other.
* **torch.compile**: dynamo cannot trace hooks that are attached and removed inside the compiled code
  (the pre-hook does not fire, and with ``fullgraph=True`` the hook handle is untraceable). The probed
  forward is therefore excluded from compilation (``torch.compiler.disable``): ``torch.compile(model)``
  compiles everything around it and runs this step eagerly; ``fullgraph=True`` stops at this step with
  :data:`COMPILE_ADVICE` in dynamo's message.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from anchor_former.probes import AttentionProbe, Score

__all__ = ["COMPILE_ADVICE", "hooked_forward", "probed_forward"]

#: why the probed forward is not compiled, and what to do instead (shown by dynamo with ``fullgraph=True``)
COMPILE_ADVICE = (
    "anchor_former: the vision tower runs eagerly under an AttentionProbe (forward hooks attached per call, "
    "which dynamo cannot trace). torch.compile(model) with the default fullgraph=False compiles the rest of "
    "the model around this step; fullgraph=True cannot include it: compile the language model alone, in place "
    "(transformers: model.model.language_model.compile(fullgraph=True)), or the connector"
)

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_of(encoder: nn.Module) -> threading.Lock:
    """The lock of ``encoder`` (created on first use; dropped with the encoder; never pickled with it)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(encoder)
        if lock is None:
            lock = _LOCKS[encoder] = threading.Lock()
        return lock


@torch.compiler.disable(reason=COMPILE_ADVICE)
def probed_forward(
    encoder: nn.Module, run: Callable[[], Any], *, layer: int, score: Score
) -> tuple[Any, AttentionProbe]:
    """Run ``run()`` (one forward of ``encoder``) under a fresh probe, holding ``encoder``'s lock.

    Args:
        encoder: the vision encoder the probe attaches to (a supported family, see
            :func:`~anchor_former.probes.detect_encoder`).
        run: calls the encoder once, e.g. ``lambda: tower(pixel_values)`` with ``pixel_values``
            ``(B, C, H_img, W_img)``.
        layer: ``hidden_states`` index the probe reads.
        score: the probe's score (``"cls"``, ``"map"``, ``"norm"``, ``"received"``).

    Returns:
        ``(run's return value, the detached probe)``: ``probe.features`` ``(B, N, D)`` and
        ``probe.scores`` ``(B, H, N)`` (or ``(B, N)`` for ``"norm"``) belong to this call only.
    """
    probe = AttentionProbe(encoder, layer=layer, score=score)
    with _lock_of(encoder), probe:
        output = run()
    return output, probe


@torch.compiler.disable(reason=COMPILE_ADVICE)
def hooked_forward(
    encoder: nn.Module, run: Callable[[], Any], *, pre_hooks: Mapping[nn.Module, Callable[..., None]]
) -> Any:
    """Run ``run()`` (one forward of ``encoder``) with ``pre_hooks`` registered, holding ``encoder``'s lock.

    Each hook is a forward pre-hook with kwargs (``hook(module, args, kwargs)``) on a submodule of
    ``encoder``; it is registered for this call only, so it sees this call's forward and no other, and
    writes only what its closure owns. Returns ``run()``'s value.
    """
    with _lock_of(encoder):
        handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in pre_hooks.items()]
        try:
            return run()
        finally:
            for handle in handles:
                handle.remove()
