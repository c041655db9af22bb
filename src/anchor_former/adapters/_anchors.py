"""The anchor settings every adapter derives the same way, whatever the host (no host imports)."""

from __future__ import annotations

from typing import Any

__all__ = ["anchor_kwargs"]


def anchor_kwargs(
    connector: str,
    num_anchors: int,
    patches: int,
    kwargs: dict[str, Any],
    *,
    has_cls: bool,
    score: str,
    stock_cls: bool,
) -> dict[str, Any]:
    """``kwargs`` plus the anchor settings of ``connector`` (``num_anchors``, ``include_cls``), checked.

    Args:
        connector: the connector name; only ``"acformer"`` and ``"select"`` take anchor settings, the
            others get ``kwargs`` back unchanged.
        num_anchors: K, at least 1; with ``num_context`` (``"select"``) at most ``patches`` together.
        patches: the patch tokens of one view of the vision tower.
        kwargs: the user's further connector arguments (they win over the derived ``include_cls``).
        has_cls: token 0 of the tower is [CLS].
        score: the anchor score; ``"acformer"`` queries with [CLS] when it is the [CLS] row.
        stock_cls: the stock model fed [CLS] to its projector (LLaVA's ``"cls_patch"``, transformers'
            ``"full"``); ``"select"`` keeps [CLS] exactly then, so that its full budget is the stock model.

    Raises:
        ValueError: ``num_anchors`` not an integer >= 1, or the budget above ``patches``.
    """
    if connector not in ("acformer", "select"):
        return kwargs
    if isinstance(num_anchors, bool) or not isinstance(num_anchors, int) or num_anchors < 1:
        raise ValueError(f"num_anchors must be an integer >= 1, got {num_anchors!r}")
    context = kwargs.get("num_context", 0) if connector == "select" else 0
    budget = num_anchors + (context if isinstance(context, int) and context > 0 else 0)
    if budget > patches:
        what = "num_anchors + num_context" if connector == "select" else "num_anchors"
        detail = f" (num_anchors={num_anchors}, num_context={context})" if connector == "select" else ""
        raise ValueError(f"{what} must be at most the {patches} patch tokens of the vision tower, got {budget}{detail}")
    include_cls = has_cls and (stock_cls if connector == "select" else score == "cls")
    return {"num_anchors": num_anchors, "include_cls": include_cls, **kwargs}
