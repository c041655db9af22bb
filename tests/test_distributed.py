"""DDP over 2 CPU processes (gloo): AnchorFormer's gradients equal a single-process step on the full batch.

``find_unused_parameters=False`` is DDP's default and fastest mode; it fails if any parameter gets no
gradient (the reference's unused ``latents`` did), so two steps run to let DDP notice.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from anchor_former import AnchorFormer

WORLD = 2
CONFIG = dict(vision_dim=16, llm_dim=24, num_anchors=5, depth=2, heads=2, dim_head=8, ff_mult=2)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (4, 17, 16), anchors (4, 6) and a padding mask that differs across samples."""
    g = torch.Generator().manual_seed(1)
    features = torch.randn(4, 17, 16, generator=g)
    lengths = torch.tensor([17, 12, 15, 9])
    mask = torch.arange(17)[None] < lengths[:, None]
    cls = torch.zeros(1, dtype=torch.long)
    anchors = torch.stack([torch.cat([cls, torch.randperm(int(n) - 1, generator=g)[:5] + 1]) for n in lengths])
    return features, anchors, mask


def train(
    model: torch.nn.Module, features: torch.Tensor, anchors: torch.Tensor, mask: torch.Tensor, steps: int
) -> list:
    """``steps`` SGD steps on the mean squared output; returns the gradients of every step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        model(features, anchors, key_padding_mask=mask).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return grads


def worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for checkpointing in (False, True):
            torch.manual_seed(rank)  # different seeds: DDP must broadcast rank 0's parameters
            model = AnchorFormer(**CONFIG, gradient_checkpointing=checkpointing)
            ddp = DistributedDataParallel(model, find_unused_parameters=False)
            features, anchors, mask = batch()
            local = slice(2 * rank, 2 * rank + 2)  # each rank sees half of the batch
            ddp_grads = train(ddp, features[local], anchors[local], mask[local], steps=2)

            if rank == 0:
                torch.manual_seed(0)
                single = AnchorFormer(**CONFIG)
                single_grads = train(single, features, anchors, mask, steps=2)
                for step in range(2):
                    for a, b in zip(ddp_grads[step], single_grads[step], strict=True):
                        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
                for a, b in zip(model.parameters(), single.parameters(), strict=True):
                    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_without_finalizing()


def _exit_without_finalizing() -> None:
    """End a worker that finished its work: skip the interpreter's finalization, in which gloo's C++ threads
    can still hold DDP's async work and abort the process (``terminate called without an active exception``,
    SIGABRT, seen once on a loaded 2-core machine under torch 2.13). An exception above never gets here, so
    ``mp.spawn`` still reports it with its traceback."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_gradients_equal_single_process_full_batch(tmp_path: Path) -> None:
    """Plain and gradient-checkpointed AnchorFormer, two SGD steps each, in one pair of processes."""
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
