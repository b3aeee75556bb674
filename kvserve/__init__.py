"""kvserve: a KV-cache-centric LLM serving engine. `from kvserve import LLM, SamplingParams`."""

from kvserve.sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that importing the pure-Python core (kvserve.core) never pulls in torch.
    if name in ("LLM", "LLMEngine", "EngineArgs"):
        from kvserve.engine import llm_engine
        return getattr(llm_engine, name)
    if name in ("RequestOutput", "CompletionOutput"):
        from kvserve import outputs
        return getattr(outputs, name)
    raise AttributeError(name)
