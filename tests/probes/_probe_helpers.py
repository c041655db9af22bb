"""Helpers shared by the probe tests (a plain module: conftest names can clash across test folders)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from anchor_former.probes import DEFAULT_BLOCK_SIZE
from anchor_former.probes._probe import watch_site
from anchor_former.probes.registry import AttentionSite, QueryKeySite, SiteCall


def eager_copy(model: nn.Module) -> nn.Module:
    """A copy of an HF model that runs eager attention (the only path that returns attention maps)."""
    ref = copy.deepcopy(model)
    if hasattr(ref, "set_attn_implementation"):  # transformers 5.x; 4.37 CLIP/DINOv2/SigLIP are eager-only
        ref.set_attn_implementation("eager")
    return ref


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def reference_block(layer: int, num_layers: int) -> int:
    """The block whose output is hidden_states[layer] (hidden_states has num_layers + 1 entries)."""
    return layer - 1 if layer > 0 else num_layers + layer


def column_mean(attentions: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
    """``received`` from an eager ``(B, H, N, N)`` map: the mean over (non-padding) query rows, per column."""
    probs = attentions.double()
    if padding is None:
        return probs.mean(2).float()
    keep = (~padding).double()[:, None, :, None]  # (B, 1, N, 1)
    return ((probs * keep).sum(2) / keep.sum(2)).float()


def site_call(model: nn.Module, run: Callable[[], Any], site: AttentionSite) -> SiteCall:
    """The first finished call of ``site``'s attention while ``run()`` runs, as the probe's hooks record it."""
    seen: list[SiteCall] = []
    handles = watch_site(site, seen.append)
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return seen[0]


def mutants(site: AttentionSite, call: SiteCall, score: str) -> dict[str, torch.Tensor]:
    """Deliberately broken scores for ``site``'s call: the tolerance of an exactness test must reject each."""

    def compute(s: AttentionSite) -> torch.Tensor:
        return s.received(call, block_size=DEFAULT_BLOCK_SIZE) if score == "received" else s.row(call)

    good = compute(site)
    broken = {
        "uniform": torch.full_like(good, 1.0 / good.shape[-1]),
        "heads averaged": good.mean(1, keepdim=True).expand_as(good),
    }
    if isinstance(site, QueryKeySite):
        width = call.output_of(site.key.module)["key"].shape[-1]
        broken["scale without 1/sqrt(E)"] = compute(replace(site, scale=site.scale * width**0.5))
        if site.rotary is not None:
            broken["keys without rotary"] = compute(replace(site, rotary=None))
        if site.padding_mask is not None and site.padding_mask(call.args, call.kwargs) is not None:
            broken["padding ignored"] = compute(replace(site, padding_mask=None))
    return broken


def assert_close_and_bites(
    got: torch.Tensor, expected: torch.Tensor, broken: dict[str, torch.Tensor], atol: float = 1e-5
) -> None:
    """``got`` matches ``expected`` to ``atol`` and every broken variant does not."""
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    for name, tensor in broken.items():
        err = (tensor.float() - expected).abs().max().item() if tensor.shape == expected.shape else float("inf")
        assert err > atol, f"the broken variant '{name}' passes atol={atol} (max error {err:.2e})"


def check_exact_family(
    model: nn.Module,
    run: Callable[..., Any],
    *,
    score: str,
    layer: int,
    num_layers: int,
    attentions: Callable[[], tuple[torch.Tensor, ...]] | None = None,
    padding: torch.Tensor | None = None,
) -> Any:
    """The exactness checks every family passes, on a transformers model with an eager twin.

    ``run(m, **kw)`` calls model ``m`` on the test inputs with extra keyword arguments. Checks: the probe's
    ``score`` of ``layer`` equals the eager twin's ``output_attentions`` (row 0 for ``"cls"``, column mean
    over non-padding queries for ``"received"``) to 1e-5 and each broken variant does not; the features are
    ``hidden_states[layer]``; outputs are bit-identical with and without the probe; no hook is left.
    ``attentions`` overrides how the eager maps are obtained. Returns the probe.
    """
    from anchor_former.probes import AttentionProbe

    with torch.no_grad():
        plain = run(model, output_hidden_states=True)
        before = hook_count(model)
        with AttentionProbe(model, layer=layer, score=score) as probe:
            probed = run(model, output_hidden_states=True)
        assert hook_count(model) == before
        maps = attentions() if attentions is not None else run(eager_copy(model), output_attentions=True).attentions
    block = reference_block(layer, num_layers)
    attn = maps[block]
    expected = attn[:, :, 0].float() if score == "cls" else column_mean(attn, padding)
    site = probe.encoder.sites[block]
    broken = mutants(site, site_call(model, lambda: run(model), site), score)
    assert_close_and_bites(probe.attention, expected, broken)
    assert torch.equal(probe.features, probed.hidden_states[layer])
    assert torch.equal(plain.last_hidden_state, probed.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(plain.hidden_states, probed.hidden_states, strict=True))
    return probe


def randomize(model: nn.Module) -> nn.Module:
    """Re-draw every parameter (some inits zero the q/k weights, giving exactly uniform attention that no
    broken variant can miss): matrices N(0, 0.3^2), vectors N(0, 0.1^2), norm weights 1 + N(0, 0.1^2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.3 if p.ndim > 1 else 0.1
            p.copy_(torch.randn_like(p) * std + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model
