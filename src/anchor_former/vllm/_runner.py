"""Turn on vLLM's post-encoder M-RoPE rewrite for the models that declare they need it (vLLM 0.32, V1 runner).

A Qwen2.5-VL model that keeps K of its merged visual tokens learns WHICH tokens only when its vision
tower has run, but vLLM computes a request's M-RoPE positions at admission. vLLM has a hook for exactly
this, built for video pruning (EVS): the model appends position channels to its embeddings and the
runner calls ``model.recompute_mrope_positions(...)`` on every prefill chunk before the embeddings are
merged (``GPUModelRunner._gather_mm_embeddings``, shared by the CPU runner). The runner calls it only
when its ``is_multimodal_pruning_enabled`` flag is set, and it sets that flag from the engine's
``video_pruning_rate`` (``GPUModelRunner.load_model``), which has nothing to do with this model; the CPU
runner's own ``load_model`` never sets it at all.

:func:`enable_position_rewrite` wraps the runner's ``load_model`` (once; run by the plugin's
registration) so that, after loading, the flag is ALSO set when the loaded model's class declares
``positions_after_encoder = True``. Nothing changes for any other model. The wrapped method is the
installed release's (the plugin refuses other vLLM releases, :data:`~anchor_former.vllm.SUPPORTED_VLLM`).
vLLM's newer model runner (V2) decides this elsewhere; the model refuses to run under it.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["declares_positions_after_encoder", "enable_position_rewrite"]

#: set on the wrapper, so a second registration in the same process does not wrap twice
_WRAPPED = "__anchor_former_position_rewrite__"


def declares_positions_after_encoder(model: Any) -> bool:
    """Whether ``model``'s class asks for the post-encoder rewrite (class attribute ``positions_after_encoder``)."""
    return bool(getattr(type(model), "positions_after_encoder", False))


def _runner_class() -> type:
    """The V1 model runner class of this platform (the CPU runner overrides ``load_model``)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        return CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


def enable_position_rewrite(runner_class: type | None = None) -> None:
    """Wrap ``runner_class.load_model`` (default: this platform's V1 runner) to set the rewrite flag for
    models that declare :func:`declares_positions_after_encoder`. Idempotent."""
    cls = _runner_class() if runner_class is None else runner_class
    load_model = cls.__dict__.get("load_model")
    if load_model is None:
        raise RuntimeError(f"{cls.__qualname__} defines no load_model to wrap (vLLM internals changed)")
    if getattr(load_model, _WRAPPED, False):
        return

    @functools.wraps(load_model)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = load_model(self, *args, **kwargs)
        if declares_positions_after_encoder(self.get_model()):
            self.is_multimodal_pruning_enabled = True  # the runner then calls model.recompute_mrope_positions
        return result

    setattr(wrapped, _WRAPPED, True)
    setattr(cls, "load_model", wrapped)  # noqa: B010 (cls is any runner class)
