"""The entry type of the host contract suite: what a family must tell the suite, nothing more.

A :class:`Family` builds a tiny real model and processor of one host family (built offline from configs),
makes inputs for one request, and names the attach arguments of a few situations (full budget, a reduced
trained connector, a re-attach that keeps it, a re-attach and an attach that must fail). ``supports`` says
which rows apply (a family without ``torch.compile`` support leaves ``"compile"`` out, and the row is skipped
with the family's reason).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

#: every row a family can take part in
ROWS = frozenset(
    {
        "identity",
        "bf16",
        "counts",
        "reattach",
        "threads",
        "compile",
        "save",
        "auto",
        "auto_processor",
        "pipeline",
        "bnb",
        "lora",
        "offload",
        "mm_encoder_outputs",
        "kept_tokens",
    }
)


@dataclass(frozen=True)
class Family:
    """One host family of the contract suite.

    Attributes:
        name: the test id (``"llava"``, ``"qwen2_5"``, ``"llava_torch_anyres_spatial"``, ...).
        make_processor: ``() -> processor`` (a real one, built offline; None for a host without one).
        make_model: ``(processor) -> model``: the stock tiny model, fp32, eval mode, seeded.
        inputs: ``(processor, seed) -> dict`` the processor's output for one request (images differ by seed).
        attach: ``(model, processor, **kwargs) -> model`` the family's ``attach_anchor_former``.
        host: the family's :class:`~anchor_former.adapters._host.Host` instance (the rollback row breaks its
            ``install`` on purpose).
        full: attach arguments whose model equals the stock model (full budget).
        reduced: attach arguments of a reduced model (a trained connector where the family has one).
        reattach: arguments of a re-attach of ``reduced`` that keeps the connector (e.g. another K).
        reattach_bad: ``(arguments, regex)``: a re-attach of ``reduced`` that must raise ``ValueError``.
        bad: ``(arguments, regex)``: an attach of the stock model that must raise ``ValueError``.
        tokens: ``(model, inputs) -> (expected, got)`` visual-token counts per sample: written by the processor
            and given by the model.
        tower: ``(model) -> the vision tower module``; projector: ``(model) -> projector module`` or None.
        q_k_modules: the tower's query / key projection module names (LoRA ``target_modules``).
        stock_class / attached_class: the model classes before and after attach.
        reload: ``(folder) -> model``: the family's documented reload of a saved attached model.
        reload_processor: ``(folder) -> processor``: the family's documented processor reload.
        supports: the rows of :data:`ROWS` this family takes part in; skip: row -> reason for the others.
        xfail: row -> reason: rows known to fail today (run as ``xfail(strict=True)``, so a fix shows).
        eager_tokens: ``(attached model, inputs) -> (B, T, llm_dim)``: the image tokens with anchors taken from
            the tower's own eager ``output_attentions`` (the slow reference), or None.
        prompt: one request's text with one image placeholder (the ``pipeline`` row).
        logits: ``(model, inputs) -> logits`` (default ``model(**inputs).logits``).
    """

    name: str
    make_processor: Callable[[], Any]
    make_model: Callable[[Any], nn.Module]
    inputs: Callable[[Any, int], dict]
    attach: Callable[..., nn.Module]
    host: Any
    full: dict[str, Any]
    reduced: dict[str, Any]
    reattach: dict[str, Any]
    reattach_bad: tuple[dict[str, Any], str]
    bad: tuple[dict[str, Any], str]
    tokens: Callable[[nn.Module, dict], tuple[list[int], list[int]]]
    tower: Callable[[nn.Module], nn.Module]
    projector: Callable[[nn.Module], nn.Module] | None
    q_k_modules: tuple[str, ...]
    stock_class: type
    attached_class: type
    reload: Callable[[Any], nn.Module]
    reload_processor: Callable[[Any], Any]
    supports: frozenset[str] = ROWS
    skip: dict[str, str] = field(default_factory=dict)
    xfail: dict[str, str] = field(default_factory=dict)
    eager_tokens: Callable[[nn.Module, dict], Any] | None = None
    prompt: str = ""
    logits: Callable[[nn.Module, dict], Any] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.supports) - ROWS
        if unknown:
            raise ValueError(f"Family {self.name}: unknown rows {sorted(unknown)}; known: {sorted(ROWS)}")

    def __repr__(self) -> str:
        return self.name
