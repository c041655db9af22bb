"""FSDP on CPU: what runs and what is refused (2 processes, gloo; torch 2.14, accelerate 1.16).

* accelerate refuses CPU FSDP without a word: with ``cpu=True`` (what ``--use_cpu`` gives the Trainer)
  its state keeps ``DistributedType.MULTI_CPU``, drops the FSDP plugin, and ``prepare`` wraps the model in
  DDP. So ``anchor_former.train --fsdp`` cannot run on CPU, and refuses it (``tests/test_preflight.py``);
  this test pins accelerate's behaviour: when it starts sharding on CPU, it fails, and the refusal can go.
* torch itself shards on CPU: FSDP2 (``fully_shard`` per unit of the model's ``_no_split_modules``, then
  the root, as accelerate wraps them with ``configs/fsdp.json``) on a tiny attached LLaVA-NeXT model, 2 stage-1 SGD steps, ends with
  the same connector as DDP on the same per-rank batches (and the probe, which reads the tower's layer
  while FSDP has it unsharded, works).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the transformers adapter needs transformers >= 5", allow_module_level=True)
pytest.importorskip("accelerate")

WORLD = 2
# exact: with 2 ranks both reductions compute the same (a + b) / 2 per element (measured: bitwise equal)
ATOL = 0.0


def _init(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _accelerate_state() -> str:
    """What accelerate makes of an FSDP plugin on CPU: ``"<distributed type> <plugin kept> <wrapper class>"``."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    wrapped = accelerator.prepare(torch.nn.Linear(4, 4))
    kept = getattr(accelerator.state, "fsdp_plugin", None) is not None
    return f"{accelerator.distributed_type.value} {kept} {type(wrapped).__name__}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- torch FSDP2 vs DDP on an attached tiny LLaVA-NeXT ---------------------------------------------------------


def _model_and_batch(rank: int):
    """The attached tiny NeXT model (same seed on both ranks) in stage 1, and this rank's one-sample batch."""
    import numpy as np

    from anchor_former.adapters.transformers import attach_anchor_former
    from anchor_former.train import ModelArguments, set_trainable
    from tests.adapters._hf_llava_next import make_model, make_processor

    processor = make_processor()
    model = make_model(processor).train()
    torch.manual_seed(0)
    attach_anchor_former(model, processor, num_anchors=8, depth=1, heads=2, dim_head=8)
    model = set_trainable(model, ModelArguments(model_name_or_path="", stage=1))
    size = ((40, 70), (30, 90))[rank]  # 3 and 4 views: the ranks' towers see different batch shapes
    image = np.random.default_rng(rank).integers(0, 256, (*size, 3), dtype=np.uint8)
    batch = processor(text="USER: <image> what is in the picture ? ASSISTANT: a cat", images=image, return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    return model, dict(batch)


def _steps(model: torch.nn.Module, batch: dict, steps: int = 2) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()


def fsdp_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    try:
        from torch.distributed.fsdp import fully_shard

        accelerate_state = _accelerate_state()
        from torch.nn.parallel import DistributedDataParallel

        model, batch = _model_and_batch(rank)
        # the units configs/fsdp.json gives accelerate: the model's _no_split_modules that it instantiates
        layers = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        _steps(model, batch)
        connector = model.model.multi_modal_projector
        sharded = {k: v.full_tensor() for k, v in connector.state_dict().items()}  # gathers every shard

        reference, batch = _model_and_batch(rank)
        _steps(DistributedDataParallel(reference), batch)
        plain = reference.model.multi_modal_projector.state_dict()
        if rank == 0:
            worst = max((sharded[k] - plain[k]).abs().max().item() for k in plain)
            moved = max(
                (plain[k] - v).abs().max().item()
                for k, v in _model_and_batch(0)[0].model.multi_modal_projector.state_dict().items()
            )
            Path(out).write_text(f"{accelerate_state} {len(layers)} {sorted(sharded) == sorted(plain)} {worst} {moved}")
    finally:
        dist.destroy_process_group()
    # a finished worker skips the interpreter's finalization, where gloo's threads can abort it (SIGABRT); an
    # exception above never gets here and reaches mp.spawn with its traceback
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_cpu_fsdp_accelerate_drops_it_torch_fsdp2_ends_with_the_ddp_connector(tmp_path) -> None:
    """One pair of processes for both findings (each start imports transformers and accelerate)."""
    out = tmp_path / "fsdp.txt"
    mp.spawn(fsdp_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    kind, kept, wrapper, layers, same_keys, worst, moved = out.read_text().split()
    # accelerate: MULTI_CPU, FSDP plugin dropped, the model wrapped in DDP (when this fails, lift the refusal)
    assert (kind, kept, wrapper) == ("MULTI_CPU", "False", "DistributedDataParallel")
    print(f"FSDP2 vs DDP connector: max |difference| {worst}, moved by training {moved}")
    assert int(layers) == 1 + 3 + 2 and same_keys == "True"  # CLIP embeddings, 3 CLIP layers, 2 Llama layers
    assert float(moved) > 1e-2  # the connector trained (the comparison is not between untouched weights)
    assert float(worst) <= ATOL, worst
