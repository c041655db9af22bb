"""Settings every vLLM test engine shares."""

import os

# the tests inspect the served model inside the engine with LLM.apply_model, which sends a function to the
# engine process (cloudpickle); vLLM accepts that only when told so
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
# 1 GiB of KV cache is plenty for the tiny models (vLLM's CPU default is 4 GiB per engine)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
