"""Probe benchmark: features + anchors via the attention probes vs the reference path.

Run alone: ``python benchmarks/bench_probe.py [--preset default] [--device cpu]``; the suite folds
:func:`run` into its report. Random-init HF ``CLIPVisionModel`` from a config (no download), layer -2,
``torch.no_grad()`` like LLaVA's vision tower. Paths, all on the same weights and inputs:

* ``sdpa``: the plain forward ``model(pixel_values)`` (SDPA attention) — the baseline of every ratio;
* ``sdpa+hidden_states``: ``model(pixel_values, output_hidden_states=True).hidden_states[-2]``, how
  LLaVA gets its features today (no anchors);
* ``probe``: ``extract_anchors(model, pixel_values, num_anchors=K)`` — features and anchors from one
  SDPA forward;
* ``probe+hidden_states``: the probe attached while the model runs LLaVA's call
  (``output_hidden_states=True``), then ``anchor_search`` — what a LLaVA adapter does;
* ``reference``: the reference's path: an eager copy of the model run with ``output_attentions=True``
  and ``output_hidden_states=True``, then the per-sample, per-head Python loop on the [CLS] row;
* ``received``: ``extract_anchors(..., score="received")`` — the attention each token receives, averaged
  over all queries, recomputed by the probe in query blocks beside one SDPA forward;
* ``eager_received``: the same score the obvious way: an eager copy with ``output_attentions=True`` and
  ``output_hidden_states=True``, the column mean of layer -2's map, then ``anchor_search``.

A second model at SigLIP-so400m/14-384 shapes (no [CLS]; width 1152, 16 heads, 729 tokens) runs
``sdpa``, ``received`` and ``eager_received`` (section ``siglip``). Section ``families`` runs one row per
supported encoder family (random init, the preset's ``families`` shape): the plain forward vs
``extract_anchors`` with the family's default score (``cls``, or ``received`` without [CLS]); families
whose library is not installed are skipped.

Time is the median over interleaved rounds (``_common.measure_interleaved``, ``torch.utils.benchmark.Timer``), so
load that comes and goes on a shared machine hits every path alike. Peak memory is the peak of
tensor memory allocated during the call above what was allocated before it: on CUDA the caching
allocator's statistics; on the CPU (no allocator statistics) a dispatch-level tracker that adds every
new tensor storage when an op creates it and subtracts it when it is freed (kernel-internal scratch
buffers are not seen).
"""

from __future__ import annotations

import argparse
import copy
import json
import weakref
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from anchor_former import AttentionProbe, anchor_search, extract_anchors
from anchor_former.probes import DEFAULT_BLOCK_SIZE, detect_encoder
from anchor_former.probes._probe import watch_site
from anchor_former.probes.registry import SiteCall
from benchmarks._common import environment, measure_interleaved, parse_device, progress
from benchmarks.bench_search import reference_loop

__all__ = ["PRESETS", "run", "summarize", "to_markdown"]

# CLIP ViT-L/14-336 is LLaVA-1.5's encoder: width 1024, 16 heads, 24 layers, 577 tokens.
_VIT_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "num_hidden_layers": 24,
}
# SigLIP-so400m/14-384 (LLaVA-OneVision's encoder): width 1152, 16 heads, 27 layers, 729 tokens, no [CLS].
_SO400M_384 = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "num_hidden_layers": 27,
}
PRESETS: dict[str, dict[str, Any]] = {
    # seconds, for the smoke test
    "tiny": {
        "vit": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "num_hidden_layers": 3,
        },
        "batch": 2,
        "anchors": 8,
        "dtype": "float32",
        "rounds": 2,
        "min_block_s": 0.01,
        "siglip": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "num_hidden_layers": 3,
        },
        "families": {
            "width": 32,
            "heads": 4,
            "layers": 2,
            "image_size": 32,
            "patch_size": 8,
            "rounds": 1,
            "min_block_s": 0.0,
        },
    },
    # a first look: ViT-L width and heads with 2 layers at 224 px (257 tokens), fewer rounds, small family models
    "quick": {
        "vit": {**_VIT_L_336, "num_hidden_layers": 2, "image_size": 224},
        "batch": 1,
        "anchors": 64,
        "dtype": "float32",
        "rounds": 2,
        "min_block_s": 0.0,
        "siglip": {**_SO400M_384, "num_hidden_layers": 2, "image_size": 224},
        "families": {
            "width": 192,
            "heads": 3,
            "layers": 2,
            "image_size": 224,
            "patch_size": 16,
            "rounds": 2,
            "min_block_s": 0.0,
        },
    },
    # CPU: ViT-L/14-336 token count, width and heads, but 4 of its 24 layers and batch 1, so the whole run
    # fits in ~40 s on 2 idle cores. Fewer layers make the probe's fixed cost look 6x larger, and the
    # reference's stack of attention maps 6x smaller, than at full depth.
    "default": {
        "vit": {**_VIT_L_336, "num_hidden_layers": 4},
        "batch": 1,
        "anchors": 144,
        "dtype": "float32",
        "rounds": 5,
        "min_block_s": 0.3,
        "siglip": {**_SO400M_384, "num_hidden_layers": 4},
        "families": {
            "width": 384,
            "heads": 6,
            "layers": 4,
            "image_size": 224,
            "patch_size": 16,
            "rounds": 3,
            "min_block_s": 0.1,
        },
    },
    # GPU: LLaVA-1.5-7B's vision tower as it runs there: full ViT-L/14-336, fp16, batch 32.
    "llava-1.5-7b": {
        "vit": _VIT_L_336,
        "batch": 32,
        "anchors": 144,
        "dtype": "float16",
        "rounds": 7,
        "min_block_s": 0.5,
        "siglip": _SO400M_384,
        "families": {
            "width": 1024,
            "heads": 16,
            "layers": 24,
            "image_size": 336,
            "patch_size": 14,
            "rounds": 5,
            "min_block_s": 0.3,
        },
    },
}


class _PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive, at op granularity."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._sizes or key in inputs or storage.nbytes() == 0:
                continue  # a view of an input (weights included), or an in-place result: no new memory
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)  # storages keep their Python object while alive
        return out


def _cpu_peaks(results: dict[str, dict[str, Any]], paths: dict[str, Any], label: str | None = None) -> None:
    """Each path's peak extra tensor memory on the CPU (one more untimed call each) into ``results``."""
    if label:
        progress(f"{label}: peak memory of each path (one call each, tracked per op)")
    for name, fn in paths.items():
        results[name]["peak_extra_mib"] = _cpu_peak_extra_mib(fn)


def _family_paths(
    model: Any, spec: Any, pixels: torch.Tensor, inputs: dict[str, Any], *, k: int, score: Literal["cls", "received"]
) -> dict[str, Any]:
    """The plain forward and ``extract_anchors`` of one family's model."""
    return {
        "sdpa": lambda: spec.run(pixels, **inputs),
        "probe": lambda: extract_anchors(model, pixels, num_anchors=k, score=score, inputs=inputs).anchor_idx,
    }


def _cpu_peak_extra_mib(fn) -> float:
    with torch.no_grad(), _PeakTensorMemory() as tracker:
        result = fn()
    del result
    return tracker.peak / 2**20


def _build(cfg: dict[str, Any], device: torch.device, *, siglip: bool = False):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    dtype = getattr(torch, cfg["dtype"])
    if siglip:
        # attn_implementation reaches the configs through **kwargs, which their typed signatures do not show
        model: torch.nn.Module = SiglipVisionModel(SiglipVisionConfig(**cfg["siglip"], attn_implementation="sdpa"))  # type: ignore[call-arg]
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**cfg["vit"], attn_implementation="sdpa"))  # type: ignore[call-arg]
    model = model.to(device=device, dtype=dtype).eval()
    eager: Any = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return model, eager


def _received_paths(model, eager, pixels: torch.Tensor, k: int, *, has_cls: bool) -> dict[str, Any]:
    """``received`` (the probe) and ``eager_received`` (column mean of eager ``output_attentions``)."""

    def received():
        r = extract_anchors(model, pixels, num_anchors=k, score="received")
        return r.features, r.anchor_idx

    def eager_received():
        out = eager(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        scores = out.attentions[-2].float().mean(2)  # (B, H, N) column mean over the queries
        return out.hidden_states[-2], anchor_search(scores, k, include_cls=has_cls, num_prefix_tokens=int(has_cls))

    return {"received": received, "eager_received": eager_received}


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of anchors two ``(B, K)`` index sets have in common."""
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a.cpu(), b.cpu(), strict=True)) / b.numel()


def _ratios(results: dict[str, dict[str, Any]]) -> None:
    base = results["sdpa"]
    for entry in results.values():
        entry["time_ratio"] = entry["median_ms"] / base["median_ms"]
        entry["peak_ratio"] = entry["peak_extra_mib"] / base["peak_extra_mib"]


def _siglip_section(cfg: dict[str, Any], device: torch.device, no_grad) -> dict[str, Any]:
    """sdpa / received / eager_received at the preset's SigLIP shapes (no [CLS])."""
    vit = cfg["siglip"]
    progress(f"probe: building {vit['num_hidden_layers']}-layer SigLIP ViT on {device}")
    model, eager = _build(cfg, device, siglip=True)
    size = vit["image_size"]
    pixels = torch.randn(cfg["batch"], 3, size, size, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device=device, dtype=getattr(torch, cfg["dtype"]))
    tokens = (vit["image_size"] // vit["patch_size"]) ** 2
    k = min(cfg["anchors"], tokens // 2)
    paths = {
        "sdpa": lambda: model(pixel_values=pixels).last_hidden_state,
        **_received_paths(model, eager, pixels, k, has_cls=False),
    }
    with torch.no_grad():
        got, want = paths["received"]()[1], paths["eager_received"]()[1]
    same, overlap = torch.equal(got.cpu(), want.cpu()), _overlap(got, want)
    results = measure_interleaved(
        {n: no_grad(fn) for n, fn in paths.items()},
        device,
        rounds=cfg["rounds"],
        min_block_s=cfg["min_block_s"],
        label=f"probe: SigLIP {', '.join(paths)}",
    )
    if device.type == "cpu":
        _cpu_peaks(results, paths, "probe: SigLIP")
    _ratios(results)
    return {
        "shapes": {
            "batch": cfg["batch"],
            "layers": vit["num_hidden_layers"],
            "width": vit["hidden_size"],
            "heads": vit["num_attention_heads"],
            "tokens": tokens,
            "anchors": k,
            "dtype": cfg["dtype"],
            "layer": -2,
        },
        "received_anchors_equal_eager": same,
        "received_anchor_overlap_with_eager": overlap,
        "paths": results,
    }


def _family_models(shape: dict[str, Any]) -> dict[str, Any]:
    """``name -> (builder, model kwargs builder)`` for every family whose library imports."""
    import importlib

    width, heads, layers, image, patch = (shape[k] for k in ("width", "heads", "layers", "image_size", "patch_size"))
    hf = {
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image,
        "patch_size": patch,
    }
    grid = image // patch
    builders: dict[str, Any] = {}

    def hf_family(name: str, model: str, config: str, **extra: Any) -> None:
        try:
            tf = importlib.import_module("transformers")
            builders[name] = lambda: getattr(tf, model)(getattr(tf, config)(**hf, **extra))
        except ImportError:
            pass

    hf_family("clip", "CLIPVisionModel", "CLIPVisionConfig")
    hf_family("dinov2", "Dinov2Model", "Dinov2Config")
    hf_family("dinov3", "DINOv3ViTModel", "DINOv3ViTConfig", num_register_tokens=4)
    hf_family("siglip", "SiglipVisionModel", "SiglipVisionConfig")
    hf_family("internvit", "InternVLVisionModel", "InternVLVisionConfig", use_qk_norm=True)
    hf_family("blip2", "Blip2VisionModel", "Blip2VisionConfig")
    hf_family("aimv2", "Aimv2VisionModel", "Aimv2VisionConfig")
    hf_family("altclip", "AltCLIPVisionModel", "AltCLIPVisionConfig")
    hf_family("chinese_clip", "ChineseCLIPVisionModel", "ChineseCLIPVisionConfig")
    hf_family("metaclip_2", "MetaClip2VisionModel", "MetaClip2VisionConfig")
    if "clip" in builders:
        hf_s2 = {k: v for k, v in hf.items() if k != "image_size"}
        tf = importlib.import_module("transformers")
        builders["siglip2"] = lambda: tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**hf_s2, num_patches=grid * grid))
        builders["idefics"] = lambda: importlib.import_module(
            "transformers.models.idefics.vision"
        ).IdeficsVisionTransformer(
            tf.IdeficsVisionConfig(embed_dim=width, **{k: v for k, v in hf.items() if k != "hidden_size"})
        )
    try:
        timm = importlib.import_module("timm.models")
        timm_kw = {
            "img_size": image,
            "patch_size": patch,
            "embed_dim": width,
            "depth": layers,
            "num_heads": heads,
            "num_classes": 0,
        }
        builders["timm_vit"] = lambda: timm.vision_transformer.VisionTransformer(**timm_kw)
        builders["timm_eva"] = lambda: timm.eva.Eva(**timm_kw, use_rot_pos_emb=True, ref_feat_shape=grid)
    except ImportError:
        pass
    try:
        oc = importlib.import_module("open_clip.transformer")
        builders["open_clip"] = lambda: oc.VisionTransformer(
            image_size=image, patch_size=patch, width=width, layers=layers, heads=heads, mlp_ratio=4.0, output_dim=width
        )
    except ImportError:
        pass
    return builders


def _families_section(cfg: dict[str, Any], device: torch.device, no_grad) -> dict[str, Any]:
    """One row per family: the plain forward vs ``extract_anchors`` (``cls``, or ``received`` without [CLS])."""
    shape = cfg["families"]
    image, patch, batch = shape["image_size"], shape["patch_size"], cfg["batch"]
    dtype = getattr(torch, cfg["dtype"])
    rows: dict[str, Any] = {}
    for name, build in _family_models(shape).items():
        progress(f"probe: family {name}")
        torch.manual_seed(0)
        model = build().to(device=device, dtype=dtype).eval()
        spec = detect_encoder(model)
        score: Literal["cls", "received"] = "cls" if spec.has_cls else "received"
        inputs: dict[str, Any] = {}
        if spec.layout is not None:  # SigLIP2 NaFlex: patch rows, all real
            n = (image // patch) ** 2
            pixels = torch.randn(batch, n, 3 * patch * patch, generator=torch.Generator().manual_seed(0))
            inputs = {
                "pixel_attention_mask": torch.ones(batch, n, dtype=torch.long, device=device),
                "spatial_shapes": torch.tensor([[image // patch] * 2] * batch, device=device),
            }
        else:
            pixels = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(0))
        pixels = pixels.to(device=device, dtype=dtype)
        k = min(cfg["anchors"], (image // patch) ** 2 // 2)
        paths = _family_paths(model, spec, pixels, inputs, k=k, score=score)
        results = measure_interleaved(
            {n: no_grad(fn) for n, fn in paths.items()},
            device,
            rounds=shape["rounds"],
            min_block_s=shape["min_block_s"],
        )
        if device.type == "cpu":
            _cpu_peaks(results, paths)
        _ratios(results)
        rows[name] = {
            "score": score,
            "tokens": int(spec.num_prefix_tokens + (image // patch) ** 2),
            "sdpa_ms": results["sdpa"]["median_ms"],
            "probe_ms": results["probe"]["median_ms"],
            "time_ratio": results["probe"]["time_ratio"],
            "peak_ratio": results["probe"]["peak_ratio"],
            "sdpa_peak_extra_mib": results["sdpa"]["peak_extra_mib"],
            "probe_peak_extra_mib": results["probe"]["peak_extra_mib"],
        }
        progress(f"probe: family {name}: probe {rows[name]['time_ratio']:.2f}x the plain forward's time")
    return {"shape": shape, "rows": rows}


def run(*, preset: str = "default", device: torch.device | str = "cpu") -> dict[str, Any]:
    """Time and peak memory of each path at the preset's shapes; ratios are path / ``sdpa``."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    device = torch.device(device)
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    progress(f"probe: building {cfg['vit']['num_hidden_layers']}-layer CLIP ViT ({preset}) on {device}")
    model, eager = _build(cfg, device)
    vit = cfg["vit"]
    pixels = torch.randn(
        cfg["batch"], 3, vit["image_size"], vit["image_size"], generator=torch.Generator().manual_seed(0)
    )
    pixels = pixels.to(device=device, dtype=getattr(torch, cfg["dtype"]))
    k = cfg["anchors"]

    def sdpa():
        return model(pixel_values=pixels).last_hidden_state

    def sdpa_hidden():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]

    def probe():
        r = extract_anchors(model, pixels, num_anchors=k)
        return r.features, r.anchor_idx

    def probe_hidden():
        with AttentionProbe(model, layer=-2) as p:
            feats = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        return feats, anchor_search(p.scores, k, num_prefix_tokens=p.num_prefix_tokens)

    def reference():
        out = eager(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        return out.hidden_states[-2], reference_loop(out.attentions[-2][:, :, 0], k)

    paths = {
        "sdpa": sdpa,
        "sdpa+hidden_states": sdpa_hidden,
        "probe": probe,
        "probe+hidden_states": probe_hidden,
        "reference": reference,
        **_received_paths(model, eager, pixels, k, has_cls=True),
    }

    with torch.no_grad():  # the anchors must agree before anything is timed
        feats, idx = probe()
        ref_feats, ref_idx = reference()
    ref_idx = torch.tensor(ref_idx)
    same_anchors = torch.equal(idx.cpu(), ref_idx)
    # in half precision the reference's row is rounded to fp16 (ties among ~1/N probabilities) while the
    # probe's is float32, so near-ties may fall differently: report the overlap too
    overlap = (
        sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(idx.cpu(), ref_idx, strict=True)) / ref_idx.numel()
    )
    max_feat_diff = (feats.float() - ref_feats.float()).abs().max().item()
    with torch.no_grad():
        got, want = paths["received"]()[1], paths["eager_received"]()[1]
    received_same, received_overlap = torch.equal(got.cpu(), want.cpu()), _overlap(got, want)

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn()

        return call

    results = measure_interleaved(
        {name: no_grad(fn) for name, fn in paths.items()},
        device,
        rounds=cfg["rounds"],
        min_block_s=cfg["min_block_s"],
        label=f"probe: CLIP {', '.join(paths)}",
    )
    if device.type == "cpu":
        _cpu_peaks(results, paths, "probe: CLIP")
    progress("probe: the probe's parts alone (row, received, search)")
    # the probe's own parts, timed alone on one recorded call of layer -2's attention (its hooked queries and
    # keys): the [CLS] row, the received score, and the search
    spec = detect_encoder(model)
    site = spec.sites[-2]
    calls: list[SiteCall] = []
    handles = watch_site(site, calls.append)
    try:
        with torch.no_grad():
            model(pixel_values=pixels)
    finally:
        for handle in handles:
            handle.remove()
    call = calls[0]
    row = site.row(call)
    parts = measure_interleaved(
        {
            "row": lambda: site.row(call),
            "received": lambda: site.received(call, block_size=DEFAULT_BLOCK_SIZE),
            "search": lambda: anchor_search(row, k, num_prefix_tokens=spec.num_prefix_tokens),
        },
        device,
        rounds=cfg["rounds"],
        min_block_s=cfg["min_block_s"] / 10,
    )
    if device.type == "cpu":
        received_peak = _cpu_peak_extra_mib(lambda: site.received(call, block_size=DEFAULT_BLOCK_SIZE))
    else:
        received_peak = measure_interleaved(
            {"received": lambda: site.received(call, block_size=DEFAULT_BLOCK_SIZE)}, device, rounds=1, min_block_s=0.0
        )["received"]["peak_extra_mib"]
    _ratios(results)
    base = results["sdpa"]
    siglip = _siglip_section(cfg, device, no_grad)
    progress(
        f"probe: one row per encoder family ({cfg['families']['layers']} layers, width {cfg['families']['width']})"
    )
    families = _families_section(cfg, device, no_grad)
    return {
        "benchmark": "probe",
        "preset": preset,
        "environment": environment(device),
        "shapes": {
            "batch": cfg["batch"],
            "layers": vit["num_hidden_layers"],
            "width": vit["hidden_size"],
            "heads": vit["num_attention_heads"],
            "tokens": (vit["image_size"] // vit["patch_size"]) ** 2 + 1,
            "anchors": k,
            "dtype": cfg["dtype"],
            "layer": -2,
        },
        "memory_source": "cuda allocator" if device.type == "cuda" else "dispatch-level tensor tracker",
        "probe_anchors_equal_reference": same_anchors,
        "probe_anchor_overlap_with_reference": overlap,
        "probe_vs_reference_max_feature_diff": max_feat_diff,
        "paths": results,
        "probe_parts_ms": {name: e["median_ms"] for name, e in parts.items()},
        "probe_parts_ratio": {name: e["median_ms"] / base["median_ms"] for name, e in parts.items()},
        "received_block_size": DEFAULT_BLOCK_SIZE,
        "received_part_peak_mib": received_peak,
        "received_anchors_equal_eager": received_same,
        "received_anchor_overlap_with_eager": received_overlap,
        "siglip": siglip,
        "families": families,
    }


def to_markdown(report: dict[str, Any]) -> str:
    """A markdown table of :func:`run`'s report: each path's time and peak memory as ratios to SDPA."""
    lines = [
        f"Features + anchors, preset {report.get('preset')}, shapes {report.get('shapes')}, on "
        f"{report.get('environment', {}).get('device', '?')}; ratios to the plain "
        "SDPA forward in the same run (target on GPU: probe <= 1.01x time, <= 1.02x peak memory). "
        f"Probe anchors equal the reference's on this run's {report.get('shapes', {}).get('dtype', '?')} inputs: "
        f"{report.get('probe_anchors_equal_reference')} (in fp16/bf16 the reference's unstable argsort breaks ties "
        "differently for a share of images: benchmarks/results/search-vs-authors-loop-cpu.md).",
        "",
        "| path | time (ms) | x sdpa | peak extra (MiB) | x sdpa |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, e in report["paths"].items():
        lines.append(
            f"| {name} | {e['median_ms']:.1f} | {e['time_ratio']:.3f} | {e['peak_extra_mib']:.1f} | "
            f"{e['peak_ratio']:.3f} |"
        )
    siglip = report.get("siglip")
    if siglip:
        lines += [
            "",
            f"SigLIP (no [CLS]), shapes {siglip['shapes']}; `received` anchors equal eager's: "
            f"{siglip['received_anchors_equal_eager']}.",
            "",
            "| path | time (ms) | x sdpa | peak extra (MiB) | x sdpa |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, e in siglip["paths"].items():
            lines.append(
                f"| {name} | {e['median_ms']:.1f} | {e['time_ratio']:.3f} | {e['peak_extra_mib']:.1f} | "
                f"{e['peak_ratio']:.3f} |"
            )
    families = report.get("families")
    if families:
        lines += [
            "",
            f"One row per family, random init, shape {families['shape']}: `extract_anchors` vs the plain forward.",
            "",
            "| family | score | tokens | sdpa (ms) | probe (ms) | time x | peak x |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in families["rows"].items():
            lines.append(
                f"| {name} | {r['score']} | {r['tokens']} | {r['sdpa_ms']:.1f} | {r['probe_ms']:.1f} | "
                f"{r['time_ratio']:.3f} | {r['peak_ratio']:.3f} |"
            )
    return "\n".join(lines)


def summarize(report: dict[str, Any]) -> list[str]:
    """One sentence for the run's summary: the [CLS] probe against the plain forward and the reference path."""
    paths = report["paths"]
    probe, reference = paths["probe"], paths["reference"]
    shapes = report["shapes"]
    return [
        f"Anchor probe ({shapes['layers']}-layer random-init CLIP, width {shapes['width']}, {shapes['tokens']} "
        f"tokens, batch {shapes['batch']}): features and anchors "
        f"from one SDPA forward took {probe['time_ratio']:.2f}x the plain forward's time and "
        f"{probe['peak_ratio']:.2f}x its peak extra memory, against {reference['time_ratio']:.2f}x and "
        f"{reference['peak_ratio']:.2f}x for the reference's `output_attentions` path; same anchors as the "
        f"reference: {'yes' if report['probe_anchors_equal_reference'] else 'no'}."
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = run(preset=args.preset, device=parse_device(args.device))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "paths"}, indent=2))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
