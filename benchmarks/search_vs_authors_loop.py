"""How often the authors' selection loop and ``anchor_search`` pick different anchors on identical scores.

The authors' AcFormer code (a patch over LLaVA-1.5's CLIP encoder) selects anchors per image and per head
with an ascending ``argsort`` of the head's patch scores and a window over its top end that widens until
the head has added ``K // H`` new tokens. :func:`authors_loop` transcribes that loop step by step. On
tie-free rows with ``K`` divisible by ``H`` it returns exactly what ``anchor_search`` returns (tested in
``tests/test_search_authors_loop.py``). On half-precision scores, rounding creates ties; the authors' loop
then takes whichever tied token its (unstable) sort puts last, ``anchor_search`` the lower index. This
script measures the share of images with at least one different anchor, fp16 and bf16, on the very
same rounded scores fed to both.

Run: ``python benchmarks/search_vs_authors_loop.py [--images 1000] [--device cpu] [--output DIR]``;
writes ``search-vs-authors-loop-<device>.json`` and ``.md`` (default: ``benchmarks/results/``).
Not a timing benchmark: the numbers do not depend on machine load.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch

from anchor_former import anchor_search

__all__ = ["LoopNeverEnds", "authors_loop", "measure", "synthetic_rows"]


class LoopNeverEnds(RuntimeError):
    """The authors' loop would widen its window forever: fewer untaken candidates than the quota."""


def authors_loop(attention_row: torch.Tensor, num_anchors: int) -> list[int]:
    """The authors' selection for one image, step by step; ``attention_row (H, N)``, [CLS] at token 0.

    ``per_head = int(K / H)``. For each head in order: ``ascending`` = the patch tokens (1..N-1) sorted
    by ascending score with ``torch.argsort`` (not stable); the candidate set is the earlier picks, the
    last ``per_head`` entries of ``ascending`` and [CLS]; while it holds fewer than
    ``(h + 1) * per_head + 1`` tokens, the window over the end of ``ascending`` grows by one. The picks
    become ``sorted(set)``. Returns ``[0] + sorted(anchors)``.

    Faithful quirks: with ``per_head = 0`` (``K < H``) the window ``ascending[-0:]`` is the whole list,
    so every token is returned; with ``K % H != 0`` only ``H * (K // H)`` anchors come back; when the
    window covers the whole list and the set is still short (``K`` above the candidates) the original
    loops forever, which this transcription reports by raising :class:`LoopNeverEnds`.
    """
    heads = attention_row.shape[0]
    per_head = int(num_anchors / heads)
    picked: list[int] = []
    for h in range(heads):
        ascending = (torch.argsort(attention_row[h, 1:]) + 1).cpu().tolist()
        window = per_head
        merged = set(picked + ascending[-window:] + [0])
        while len(merged) < h * per_head + per_head + 1:
            if window >= len(ascending):
                raise LoopNeverEnds(f"head {h} needs {per_head} new tokens; only {len(merged) - 1} are left")
            window += 1
            merged = set(picked + ascending[-window:] + [0])
        picked = sorted(merged)
    return picked


def synthetic_rows(kind: str, images: int, heads: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """[CLS] attention rows ``(B, H, N)`` in float32, softmax over synthetic logits.

    ``"gaussian"``: independent N(0, 1) logits per head; ``"peaked"``: the same plus a few shared
    high-attention tokens (+6, the "artifact" tokens real CLIP layers show); ``"agreeing"``: heads share
    most of their logits (0.8 shared + 0.6 own), as heads of a real layer tend to.
    """
    own = torch.randn(images, heads, tokens, generator=generator)
    if kind == "gaussian":
        logits = own
    elif kind == "peaked":
        logits = own.clone()
        hot = torch.randint(1, tokens, (images, 8), generator=generator)
        logits.scatter_add_(2, hot[:, None, :].expand(-1, heads, -1), torch.full((images, heads, 8), 6.0))
    elif kind == "agreeing":
        logits = 0.8 * torch.randn(images, 1, tokens, generator=generator) + 0.6 * own
    else:
        raise ValueError(f"kind must be 'gaussian', 'peaked' or 'agreeing', got {kind!r}")
    return torch.softmax(logits, dim=-1)


def measure(rows: torch.Tensor, num_anchors: int) -> dict[str, Any]:
    """Share of images whose anchors differ between :func:`authors_loop` and ``anchor_search`` on ``rows``."""
    ours = anchor_search(rows, num_anchors).cpu().tolist()
    differ = sum(authors_loop(rows[i], num_anchors) != ours[i] for i in range(rows.shape[0]))
    tied = [
        (rows[i, h, 1:].unique().numel() < rows.shape[-1] - 1)
        for i in range(rows.shape[0])
        for h in range(rows.shape[1])
    ]
    return {
        "images": rows.shape[0],
        "differ": differ,
        "share": differ / rows.shape[0],
        "rows_with_ties": sum(tied) / len(tied),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    heads, tokens = 16, 577  # LLaVA-1.5's CLIP ViT-L/14-336
    results = []
    for kind in ("gaussian", "peaked", "agreeing"):
        rows32 = synthetic_rows(kind, args.images, heads, tokens, gen).to(args.device)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            rows = rows32.to(dtype)  # the same rounded scores go to both
            for k in (144, 256):
                r = {"scores": kind, "dtype": str(dtype).removeprefix("torch."), "num_anchors": k, **measure(rows, k)}
                results.append(r)
                print(json.dumps(r), flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu_name()
    meta = {
        "what": "share of images with >= 1 different anchor: the authors' loop vs anchor_search, identical scores",
        "device": device, "torch": torch.__version__, "heads": heads, "tokens": tokens, "images": args.images,
        "scores": "synthetic softmax rows (see synthetic_rows); the argsort runs on --device",
    }  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    slug = "cuda" if args.device.startswith("cuda") else "cpu"
    (args.output / f"search-vs-authors-loop-{slug}.json").write_text(json.dumps({**meta, "results": results}, indent=1))
    lines = [
        f"# Authors' loop vs anchor_search on identical scores ({slug})",
        "",
        f"{meta['what']}. {args.images} images per row, H={heads}, N={tokens}; argsort on {device}, "
        f"torch {torch.__version__}. Synthetic scores: {meta['scores']}.",
        "",
        "| scores | dtype | K | images differing | share | head rows with ties |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['scores']} | {r['dtype']} | {r['num_anchors']} | {r['differ']} / {r['images']} | "
        f"{100 * r['share']:.1f} % | {100 * r['rows_with_ties']:.0f} % |"
        for r in results
    ]
    (args.output / f"search-vs-authors-loop-{slug}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
