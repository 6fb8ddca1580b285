"""kvpilot's serving engine. `from kvpilot.serving import LLM, SamplingParams`.

Exports resolve lazily so that light modules (`kvpilot.serving.contract`, used by the operator)
can be imported without pulling in torch.
"""

import importlib

__all__ = ["LLM", "AsyncLLM", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]

_EXPORTS = {
    "LLM": "kvpilot.serving.llm",
    "AsyncLLM": "kvpilot.serving.engine.async_llm",
    "LLMEngine": "kvpilot.serving.engine.llm_engine",
    "EngineConfig": "kvpilot.serving.engine.config",
    "RequestOutput": "kvpilot.serving.engine.outputs",
    "SamplingParams": "kvpilot.serving.sampling_params",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvpilot.serving' has no attribute {name!r}")
