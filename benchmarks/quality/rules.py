"""Token-reduction rules the benchmark compares with the package's ``select`` connector, written here from
the peers' published descriptions, plus deliberately wrong variants of ``select`` for the tests.

Every rule maps one forward of the toy tower (:class:`TowerOutput`) and a budget of T tokens to the
visual tokens the language model sees, ``(B, T, llm_dim)``, using the LLaVA's own trained projector
(``mlp2x_gelu``) on ViT features. Patch indices below are token indices (``1..P``, [CLS] is 0).

Peers:

* :func:`visionzip` — VisionZip (Yang et al., 2024): *dominant* tokens = the top-K patches by the [CLS]
  attention of layer -2 summed over heads, kept in raster order; the other patches are merged into M
  *contextual* tokens: M targets evenly strided through them (stride ``U // M``), every other patch joins
  the target whose layer -2 key (averaged over heads) is most cosine-similar, and a contextual token is
  the target's features plus the mean of its members' (VisionZip's ``target + aggregated``). The split
  follows VisionZip's LLaVA-1.5 settings (54 + 10 of 64 tokens): M = max(1, round(10 T / 64)).
* :func:`divprune` — DivPrune (Alvar et al., 2025): the T projected visual tokens of maximal minimum
  cosine distance, chosen greedily (first the token farthest from its nearest neighbour, then each time
  the token whose nearest chosen token is farthest), kept in raster order.
* :func:`random_k` (seeded), :func:`first_k` (the first T in raster order), :func:`avg_pool` (the 8 x 8
  patch grid average-pooled to a T-cell grid, as LLaVA-NeXT's / the package's pooling connectors do).

Wrong variants of ``select`` with ``score="cls"`` (what a bug would do): :func:`select_reversed` (the right
anchors in reverse raster order), :func:`select_shuffled` (the right anchors in a random order),
:func:`select_lowest` (the K patches of lowest head-summed [CLS] attention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anchor_former import anchor_search

__all__ = [
    "PEER_RULES",
    "WRONG_VARIANTS",
    "Rule",
    "TowerOutput",
    "avg_pool",
    "divprune",
    "first_k",
    "gather",
    "random_k",
    "select_cls",
    "select_lowest",
    "select_reversed",
    "select_shuffled",
    "visionzip",
    "visionzip_split",
]


@dataclass
class TowerOutput:
    """One forward of the tower: ``features`` ``(B, N, D)`` layer -2 tokens ([CLS] first), ``cls_attention``
    ``(B, H, N)`` that layer's [CLS] attention row per head, ``keys`` ``(B, N, E)`` that layer's keys
    averaged over heads (E = head width), ``projector`` the LLaVA's projector (``(..., D) -> (..., llm_dim)``)."""

    features: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor
    projector: torch.nn.Module

    @property
    def patches(self) -> int:
        return self.features.shape[1] - 1


Rule = Callable[[TowerOutput, int, int], torch.Tensor]  # (tower output, budget T, seed) -> (B, T, llm_dim)


def gather(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``features[b, index[b]]``: ``(B, N, D)``, ``(B, K)`` -> ``(B, K, D)``."""
    return features.gather(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def visionzip_split(budget: int) -> tuple[int, int]:
    """``(dominant K, contextual M)`` with K + M = ``budget``, VisionZip's LLaVA-1.5 ratio (54 + 10 of 64)."""
    context = max(1, round(10 * budget / 64))
    return budget - context, context


def visionzip(out: TowerOutput, budget: int, seed: int = 0) -> torch.Tensor:
    dominant, context = visionzip_split(budget)
    scores = out.cls_attention[:, :, 1:].sum(dim=1)  # (B, P): head-summed [CLS] attention
    keep = scores.topk(dominant, dim=1).indices.sort(dim=1).values + 1  # (B, K) token indices, raster order
    b, n, _ = out.features.shape
    rest_mask = torch.ones(b, n, dtype=torch.bool)
    rest_mask[:, 0] = False
    rest_mask.scatter_(1, keep, False)
    rest = rest_mask.nonzero()[:, 1].view(b, n - 1 - dominant)  # (B, U) unselected patches, raster order
    hidden, metric = gather(out.features, rest), F.normalize(gather(out.keys, rest), dim=-1)
    u = rest.shape[1]
    targets = torch.arange(0, u, max(1, u // context))[:context]  # (M,)
    others = torch.ones(u, dtype=torch.bool)
    others[targets] = False
    similarity = metric[:, others] @ metric[:, targets].transpose(1, 2)  # (B, U - M, M)
    assign = F.one_hot(similarity.argmax(dim=2), context).to(hidden.dtype)  # (B, U - M, M)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)  # (B, M, 1)
    contextual = hidden[:, targets] + assign.transpose(1, 2) @ hidden[:, others] / counts  # (B, M, D)
    return out.projector(torch.cat([gather(out.features, keep), contextual], dim=1))


def divprune(out: TowerOutput, budget: int, seed: int = 0) -> torch.Tensor:
    tokens = out.projector(out.features[:, 1:])  # (B, P, llm_dim)
    unit = F.normalize(tokens, dim=-1)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # (B, P, P)
    chosen: list[torch.Tensor] = []
    for i in range(budget):
        if i == 0:  # each token's distance to its nearest other token (the diagonal is its own 0)
            scores = distance.topk(2, dim=1, largest=False).values[:, 1]  # (B, P)
        else:
            rows = distance.gather(1, torch.stack(chosen, 1).unsqueeze(-1).expand(-1, -1, distance.shape[2]))
            scores = rows.min(dim=1).values  # (B, P): distance to the nearest chosen token
        chosen.append(scores.argmax(dim=1))
    keep = torch.stack(chosen, 1).sort(dim=1).values  # (B, T) patch positions, raster order
    return gather(tokens, keep)


def random_k(out: TowerOutput, budget: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = out.features.shape[0]
    keep = torch.rand(b, out.patches, generator=g).topk(budget, dim=1).indices.sort(dim=1).values + 1
    return out.projector(gather(out.features, keep))


def first_k(out: TowerOutput, budget: int, seed: int = 0) -> torch.Tensor:
    return out.projector(out.features[:, 1 : budget + 1])


_POOL_GRID = {32: (8, 4), 16: (4, 4), 8: (4, 2), 4: (2, 2)}


def avg_pool(out: TowerOutput, budget: int, seed: int = 0) -> torch.Tensor:
    b, n, d = out.features.shape
    side = round((n - 1) ** 0.5)
    grid = out.features[:, 1:].transpose(1, 2).reshape(b, d, side, side)  # (B, D, 8, 8)
    pooled = F.adaptive_avg_pool2d(grid, _POOL_GRID[budget])  # (B, D, rows, cols)
    return out.projector(pooled.flatten(2).transpose(1, 2))  # (B, T, D) raster order -> (B, T, llm_dim)


def _anchors(out: TowerOutput, budget: int) -> torch.Tensor:
    """The package's anchor search on the [CLS] rows: ``(B, K)`` ascending token indices."""
    return anchor_search(out.cls_attention, budget, include_cls=False, layout="b h n")


def select_cls(out: TowerOutput, budget: int, seed: int = 0) -> torch.Tensor:
    """The package's ``select`` with ``score="cls"``, no context, written on the tower output (reference)."""
    return out.projector(gather(out.features, _anchors(out, budget)))


def select_reversed(out: TowerOutput, budget: int, seed: int = 0) -> torch.Tensor:
    return out.projector(gather(out.features, _anchors(out, budget).flip(1)))


def select_shuffled(out: TowerOutput, budget: int, seed: int = 0) -> torch.Tensor:
    anchors = _anchors(out, budget)
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(anchors.shape, generator=g).argsort(dim=1)
    return out.projector(gather(out.features, anchors.gather(1, order)))


def select_lowest(out: TowerOutput, budget: int, seed: int = 0) -> torch.Tensor:
    """The K patches the [CLS] ranks last: lowest head-summed attention, kept in raster order.

    Not the per-head search run on negated scores: a head's least-attended patches are often objects too
    (attention logits of object tokens are extreme either way), and on the toy towers of training seeds
    0 / 1 / 2 that search kept 50 / 98 / 89 % of the objects of 200 scenes at 16 tokens (the head-summed
    lowest 16: 1 / 11 / 8 %)."""
    scores = out.cls_attention[:, :, 1:].sum(dim=1)  # (B, P): head-summed [CLS] attention
    keep = scores.topk(budget, dim=1, largest=False).indices.sort(dim=1).values + 1  # (B, K) raster order
    return out.projector(gather(out.features, keep))


PEER_RULES: dict[str, Rule] = {
    "visionzip": visionzip,
    "divprune": divprune,
    "random": random_k,
    "first": first_k,
    "avgpool": avg_pool,
}
WRONG_VARIANTS: dict[str, Rule] = {
    "reversed": select_reversed,
    "shuffled": select_shuffled,
    "lowest": select_lowest,
}
