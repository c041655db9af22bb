"""Training-free token reduction: keep the visual anchors, map them with the checkpoint's own projector.

:class:`SelectConnector` has no parameters of its own. It wraps an existing LLaVA projector (``linear``
/ ``mlp{N}x_gelu``, the module a LLaVA checkpoint already trained) and, instead of projecting all
``N - num_prefix_tokens`` patch tokens, projects only the K anchor patches (the tokens the anchor score
ranks highest, found by :func:`~anchor_former.anchor_search`), in ascending token (raster) order. The
LLM then sees K tokens per image instead of every patch: no new weights, no retraining.

Optionally (``num_context = M > 0``) the patches that were not selected are merged into M *context*
tokens appended after the anchors, so the LLM still gets a coarse summary of the rest of the image:

1. the unselected patches of a sample (``U = P - K`` of them, P patches) are listed in raster order;
2. M of them, evenly spaced through that list (list positions ``floor((m + 1/2) * U / M)``), are the
   targets;
3. every unselected patch joins the target whose features are most similar to its own (cosine
   similarity, ties to the lower target; each target joins itself);
4. a context token is the mean of the features of its members, then goes through the projector.

Merging happens on the ViT features, before the projector, so the projector sees inputs of the kind
it was trained on (averages of patch features), and every context token has at least one member.
This is the contextual-token scheme of training-free peers (VisionZip), with features in place of
attention keys, which the ViT forward does not keep.

Output layout per image: ``[CLS]`` (only with ``include_cls=True``), the K anchors ascending, then the
M context tokens in target order. With K = P and M = 0 the output is exactly the projector applied to
every patch token, i.e. the unmodified LLaVA model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from anchor_former._projector import build_projector, projector_flops
from anchor_former._validation import check_floating, check_integer, check_ndim, check_nonnegative_int, shape_str
from anchor_former.connectors._base import Connector, ConnectorConfig
from anchor_former.search import AnchorSearch, cls_scores

__all__ = ["SelectConnector", "SelectConnectorConfig", "merge_context"]


@dataclass(frozen=True)
class SelectConnectorConfig(ConnectorConfig):
    """Configuration of :class:`SelectConnector`; round-trips through :meth:`to_dict` / :meth:`from_dict`."""

    vision_dim: int = 1024
    llm_dim: int = 4096
    num_anchors: int = 144
    num_context: int = 0
    include_cls: bool = False
    projector: str = "mlp2x_gelu"
    num_prefix_tokens: int = 1


def _context_targets(num_unselected: int, num_context: int, device: torch.device) -> torch.Tensor:
    """List positions ``floor((m + 1/2) * U / M)`` of the M targets among U unselected patches, ``(M,)``."""
    m = torch.arange(num_context, device=device, dtype=torch.int64)
    return ((2 * m + 1) * num_unselected) // (2 * num_context)


def merge_context(
    features: torch.Tensor, num_context: int, *, nonfinite: Literal["raise", "exclude"] = "raise"
) -> torch.Tensor:
    """Merge each sample's tokens into ``num_context`` context tokens (the scheme of the module doc).

    Args:
        features: ``(B, U, D)`` the tokens to merge (the unselected patches), in raster order.
        num_context: M, with ``1 <= M <= U``.
        nonfinite: what a token with an inf or NaN feature does. Left in, it poisons all M context tokens:
            the member sums are one matrix product, in which the token's zero weight in the other clusters
            times inf / NaN is NaN (and its own cosine similarities are NaN). ``"raise"`` (default):
            ``ValueError`` naming the sample and the token, since a non-finite ViT feature is a bug upstream
            (an fp16 overflow, a broken image) that the model should not silently absorb. ``"exclude"``: the
            sample is merged as if its non-finite tokens were not in the list (targets are spaced through its
            U' finite tokens; M must be at most U').

    Returns:
        ``(B, M, D)``: context token ``m`` is the mean of the tokens whose most cosine-similar target is
        target ``m`` (targets evenly spaced through the U tokens; each target belongs to itself).

    Raises:
        ValueError: ``features`` not a floating ``(B, U, D)`` tensor, ``num_context`` not in ``[1, U]``,
            ``nonfinite`` not ``"raise"`` / ``"exclude"``; a non-finite token with ``"raise"``, or fewer than M
            finite tokens in a sample with ``"exclude"``. The finiteness check reads one flag from the device
            per call; it is skipped while ``torch.compile`` traces (no host reads in a graph) and on ``meta``.
    """
    check_ndim("features", features, (3,), "(B, U, D)")
    check_floating("features", features)
    b, u, _ = features.shape
    if isinstance(num_context, bool) or not isinstance(num_context, int) or not 1 <= num_context <= u:
        raise ValueError(
            f"num_context must be an integer in [1, U={u}] for features of shape {shape_str(features)} (B, U, D), "
            f"got {num_context!r}"
        )
    if nonfinite not in ("raise", "exclude"):
        raise ValueError(f"nonfinite must be 'raise' or 'exclude', got {nonfinite!r}")
    if features.device.type == "meta" or torch.compiler.is_compiling():
        return _merge(features, num_context)
    finite = torch.isfinite(features).all(dim=-1)  # (B, U)
    if bool(finite.all()):  # the only host read on the happy path
        return _merge(features, num_context)
    if nonfinite == "raise":
        sample, token = (int(i) for i in (~finite).nonzero()[0])
        raise ValueError(
            f"features must be finite: token {token} of sample {sample} (features of shape {shape_str(features)}, "
            f"(B, U, D)) holds inf or NaN, which would make every context token of the sample non-finite; pass "
            "nonfinite='exclude' to merge without such tokens"
        )
    rows = []
    for i in range(b):
        kept = features[i, finite[i]]  # (U', D)
        if kept.shape[0] < num_context:
            raise ValueError(
                f"nonfinite='exclude' leaves {kept.shape[0]} finite tokens in sample {i} of features of shape "
                f"{shape_str(features)}, fewer than num_context={num_context}"
            )
        rows.append(_merge(kept[None], num_context)[0])
    return torch.stack(rows)


def _merge(features: torch.Tensor, num_context: int) -> torch.Tensor:
    """:func:`merge_context` on checked ``(B, U, D)`` features: ``(B, M, D)``."""
    u = features.shape[1]
    targets = _context_targets(u, num_context, features.device)  # (M,)
    # float32 whatever the caller's autocast (meta tensors have no autocast state to change)
    device = features.device.type
    exact = contextlib.nullcontext() if device == "meta" else torch.autocast(device, enabled=False)
    with exact:
        x = features.float()
        unit = torch.nn.functional.normalize(x, dim=-1)  # (B, U, D)
        similarity = unit @ unit[:, targets].transpose(1, 2)  # (B, U, M)
        owner = similarity.argmax(dim=-1)  # (B, U); argmax takes the first of equal maxima
        owner[:, targets] = torch.arange(num_context, device=features.device)  # a target owns itself
        members = torch.nn.functional.one_hot(owner, num_context).to(x.dtype)  # (B, U, M)
        sums = members.transpose(1, 2) @ x  # (B, M, D)
        counts = members.sum(dim=1).unsqueeze(-1)  # (B, M, 1), >= 1
    return (sums / counts).to(features.dtype)


class SelectConnector(Connector):
    """Parameter-free connector: the anchor patches (plus optional context tokens) through a projector.

    Args:
        vision_dim: D, feature width.
        llm_dim: output width.
        num_anchors: K, anchor patches kept per image (``1 <= K <= P``, P patch tokens).
        num_context: M, context tokens merged from the other ``P - K`` patches (0 = none, the default).
        include_cls: put token 0 ([CLS]) first, as LLaVA's ``"cls_patch"`` / transformers' ``"full"``
            feature selection does. Default False: LLaVA-1.5's projector was trained on patch tokens only.
        projector: the wrapped projector's type: ``"mlp2x_gelu"`` (LLaVA-1.5), ``"linear"``,
            ``"mlp{N}x_gelu"``; its state-dict keys are LLaVA's (``projector.0.*``, ``projector.2.*``), so a
            LLaVA ``mm_projector`` state dict loads into ``connector.projector`` unchanged.
        num_prefix_tokens: leading non-patch tokens of the features ([CLS] and registers), never anchors.
        device, dtype: where and how the projector's parameters are created.

    Shapes:
        ``forward(features (B, N, D), anchor_idx (B, K) | attention)`` → ``(B, T, llm_dim)`` with
        ``T = include_cls + K + M``.
    """

    uses_anchors = True
    config_class = SelectConnectorConfig
    _config: SelectConnectorConfig

    def __init__(
        self,
        vision_dim: int = 1024,
        llm_dim: int = 4096,
        *,
        num_anchors: int = 144,
        num_context: int = 0,
        include_cls: bool = False,
        projector: str = "mlp2x_gelu",
        num_prefix_tokens: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._set_widths(vision_dim, llm_dim, num_prefix_tokens)
        check_nonnegative_int("num_context", num_context)
        if include_cls not in (True, False):
            raise ValueError(f"include_cls must be a bool, got {include_cls!r}")
        if include_cls and num_prefix_tokens < 1:
            raise ValueError("include_cls=True needs a [CLS] token at index 0, but num_prefix_tokens=0")
        # the search validates num_anchors; it never returns prefix tokens
        self.search = AnchorSearch(num_anchors, include_cls=False, num_prefix_tokens=num_prefix_tokens)
        self._config = SelectConnectorConfig(
            vision_dim, llm_dim, num_anchors, num_context, bool(include_cls), projector, num_prefix_tokens
        )
        self.projector: nn.Module = build_projector(projector, vision_dim, llm_dim, device=device, dtype=dtype)

    @property
    def num_anchors(self) -> int:
        return self._config.num_anchors

    @property
    def num_context(self) -> int:
        return self._config.num_context

    def _check_budget(self, num_input_tokens: int) -> int:
        """P, the patch count, after checking that K + M fit in it."""
        patches = self._num_patches(num_input_tokens)
        budget = self.num_anchors + self.num_context
        if budget > patches:
            raise ValueError(
                f"num_anchors + num_context must be at most the {patches} patch tokens (N={num_input_tokens} minus "
                f"num_prefix_tokens={self.num_prefix_tokens}), got num_anchors={self.num_anchors} + "
                f"num_context={self.num_context} = {budget}"
            )
        return patches

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """``include_cls + num_anchors + num_context``, independent of N (which must hold K + M patches)."""
        self._check_budget(num_input_tokens)
        return int(self._config.include_cls) + self.num_anchors + self.num_context

    def analytic_flops(self, num_input_tokens: int) -> int:
        """The projector on the output tokens, plus the context merge's two ``(U, M, D)`` products (the
        cosine similarities and the member sums, U = P - K unselected patches)."""
        t = self.num_output_tokens(num_input_tokens)
        unselected = self._num_patches(num_input_tokens) - self.num_anchors
        merge = 2 * 2 * unselected * self.num_context * self.vision_dim
        return projector_flops(self._config.projector, self.vision_dim, self.llm_dim, t) + merge

    def select(
        self, features: torch.Tensor, anchor_idx: torch.Tensor | None = None, *, attention: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ViT features the projector will see, ``(B, T, D)``, in the output layout (no projection)."""
        self._check_features(features)
        patches = self._check_budget(features.shape[1])
        anchors = self._anchor_positions(features, anchor_idx, attention)  # (B, K) ascending token indices
        width = features.shape[-1]
        parts = [features[:, :1]] if self._config.include_cls else []
        parts.append(features.gather(1, anchors.unsqueeze(-1).expand(-1, -1, width)))  # (B, K, D)
        if self.num_context:
            parts.append(merge_context(self._unselected(features, anchors, patches), self.num_context))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(
        self,
        features: torch.Tensor,
        anchor_idx: torch.Tensor | None = None,
        *,
        attention: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Keep the anchors (and context tokens) and project them.

        Args:
            features: ``(B, N, D)`` the selected ViT layer's tokens, prefix tokens included.
            anchor_idx: ``(B, K)`` ascending anchor patch indices, or ``(B, K + 1)`` with [CLS] (0) first,
                as :func:`~anchor_former.anchor_search` with ``include_cls=True`` returns them.
            attention: instead of ``anchor_idx``, anchor scores in any layout
                :func:`~anchor_former.anchor_search` accepts (``(B, H, N, N)``, ``(B, H, N)``, ``(B, N)``).
            key_padding_mask: ``(B, N)`` bool, True = real token; only an all-True mask is accepted
                (the hosts never pad ViT tokens; a padded token could become an anchor or a context member).

        Returns:
            ``(B, include_cls + K + M, llm_dim)``.
        """
        self._check_mask(key_padding_mask, features)
        self._require_no_padding(key_padding_mask, connector="SelectConnector")
        tokens: torch.Tensor = self.projector(self.select(features, anchor_idx, attention=attention))
        return tokens

    def _anchor_positions(
        self, features: torch.Tensor, anchor_idx: torch.Tensor | None, attention: torch.Tensor | None
    ) -> torch.Tensor:
        if (anchor_idx is None) == (attention is None):
            raise ValueError(
                "pass exactly one of anchor_idx and attention; got "
                f"anchor_idx={'None' if anchor_idx is None else shape_str(anchor_idx)}, "
                f"attention={'None' if attention is None else shape_str(attention)}"
            )
        if anchor_idx is None:
            assert attention is not None  # exactly one of the two is given (checked above)
            scores = cls_scores(attention, num_prefix_tokens=self.num_prefix_tokens)  # (B, H, N)
            if scores.shape[0] != features.shape[0] or scores.shape[-1] != features.shape[1]:
                raise ValueError(
                    f"attention must cover the B={features.shape[0]} samples and N={features.shape[1]} tokens of "
                    f"features of shape {shape_str(features)}, got attention of shape {shape_str(attention)}"
                )
            anchors: torch.Tensor = self.search(scores, layout="b h n")
            return anchors
        return self._check_anchor_idx(anchor_idx, features)

    def _check_anchor_idx(self, anchor_idx: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``anchor_idx`` as ``(B, K)`` patch indices (a leading [CLS] column dropped), validated."""
        b, n = features.shape[:2]
        k, prefix = self.num_anchors, self.num_prefix_tokens
        expected = (
            f"(B, K) = ({b}, {k}) ascending patch-token indices in [{prefix}, {n}), or ({b}, {k + 1}) with "
            "[CLS] (index 0) first"
        )
        check_ndim("anchor_idx", anchor_idx, (2,), expected)
        check_integer("anchor_idx", anchor_idx)
        width = anchor_idx.shape[1]
        if anchor_idx.shape[0] != b or width not in (k, k + 1) or (width == k + 1 and prefix < 1):
            raise ValueError(f"anchor_idx must have shape {expected}, got shape {shape_str(anchor_idx)}")
        if anchor_idx.device != features.device:
            raise ValueError(
                f"anchor_idx must be on the device of features ({features.device}), got {anchor_idx.device}"
            )
        idx = anchor_idx.long()
        head = idx[:, 0] if idx.shape[1] == k + 1 else None
        idx = idx[:, 1:] if head is not None else idx
        if torch.compiler.is_compiling() or idx.device.type == "meta":  # no values to read
            return idx
        ok = ((idx >= prefix) & (idx < n)).all() & (idx[:, 1:] > idx[:, :-1]).all()
        if head is not None:
            ok = ok & (head == 0).all()
        if bool(ok):  # the only host read on the happy path
            return idx
        if head is not None and bool((head != 0).any()):
            raise ValueError(f"anchor_idx of shape {shape_str(anchor_idx)} must start with [CLS] (0) in every row")
        ascending = bool((idx[:, 1:] > idx[:, :-1]).all())
        raise ValueError(
            f"anchor_idx must hold {expected}; got values in [{int(idx.min())}, {int(idx.max())}]"
            + ("" if ascending else ", not strictly ascending")
        )

    def _unselected(self, features: torch.Tensor, anchors: torch.Tensor, patches: int) -> torch.Tensor:
        """``(B, P - K, D)`` the patches that are not anchors, in raster order."""
        b, _, width = features.shape
        prefix = self.num_prefix_tokens
        chosen = torch.zeros(b, patches, dtype=torch.bool, device=features.device)
        chosen.scatter_(1, anchors - prefix, True)  # (B, P)
        # a stable sort puts the unchosen (False) patches first, each group in raster order
        rest = torch.sort(chosen.to(torch.uint8), dim=1, stable=True).indices[:, : patches - self.num_anchors]
        return features[:, prefix:].gather(1, rest.unsqueeze(-1).expand(-1, -1, width))  # (B, P - K, D)

    def extra_repr(self) -> str:
        c = self._config
        return (
            f"num_anchors={c.num_anchors}, num_context={c.num_context}, include_cls={c.include_cls}, "
            f"num_prefix_tokens={c.num_prefix_tokens}"
        )
