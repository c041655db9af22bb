"""``anchor_former.attach_anchor_former``: the one top-level verb picks the host adapter from the model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import anchor_former


def test_a_module_of_no_host_is_refused_and_unchanged() -> None:
    model = nn.Linear(3, 3)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"model must be a transformers multimodal model .* got torch\.nn\.modules"):
        anchor_former.attach_anchor_former(model, num_anchors=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_transformers_model_goes_to_the_transformers_adapter() -> None:
    pytest.importorskip("transformers", minversion="5")
    from tests.adapters._hf_llava import inputs_for, make_model, make_processor

    processor = make_processor()
    stock, model = make_model(processor), make_model(processor)
    anchor_former.attach_anchor_former(model, processor, connector="select", num_anchors=6)
    assert model.config.anchor_former["connector"] == "select" and model.config.anchor_former["num_anchors"] == 6
    inputs = inputs_for(processor, batch=1)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 6
    (kept,) = anchor_former.kept_tokens(model, **inputs)
    assert kept.shape == (6,) and bool((kept[1:] > kept[:-1]).all())
    assert type(stock).__name__ == "LlavaForConditionalGeneration"


def test_a_processor_for_a_llava_torch_model_is_refused(tmp_path) -> None:
    pytest.importorskip("llava", reason="needs the original LLaVA code (llava-torch)")
    from tests.adapters._llava_torch import make_model, save_tiny_tower

    model = make_model(save_tiny_tower(tmp_path))
    config = model.config.to_dict()
    with pytest.raises(ValueError, match=r"processor must be None for a llava-torch model .* got object"):
        anchor_former.attach_anchor_former(model, object(), connector="select", num_anchors=4)
    assert model.config.to_dict() == config
    anchor_former.attach_anchor_former(model, connector="select", num_anchors=4)
    assert model.config.anchor_former["connector"] == "select"
