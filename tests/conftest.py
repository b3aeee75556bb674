"""Shared fixtures: the real SmolLM2 weights loaded once per session, in float32, for kvserve and for HF transformers."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("KVSERVE_NO_TQDM", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def fp32_parts():
    """(LlamaModel, Tokenizer, name) in float32, shared by every engine a test builds."""
    import torch

    from kvserve.model.llama import LlamaModel
    from kvserve.model.loader import load_model
    from kvserve.model.tokenizer import Tokenizer

    loaded = load_model(None)
    model = LlamaModel(loaded.config, loaded.weights, torch.float32)
    tok = Tokenizer(loaded.tokenizer_source, loaded.chat_template)
    return model, tok, loaded.name


def _test_engine_args(**kw):
    """EngineArgs for engines on the shared float32 weights, with a small KV pool unless a test asks otherwise."""
    from kvserve.engine.core import EngineArgs

    return EngineArgs(**{"dtype": "float32", "kv_cache_memory_gb": 0.25, **kw})


@pytest.fixture(scope="session")
def make_engine(fp32_parts):
    from kvserve.engine.llm_engine import LLMEngine

    model, tok, name = fp32_parts

    def build(**kw):
        return LLMEngine(_test_engine_args(**kw), model=model, tokenizer=tok, model_name=name)

    return build


@pytest.fixture(scope="session")
def make_async_llm(fp32_parts):
    """AsyncLLM over an in-process (thread) engine core sharing the session's weights; call `await llm.start()`."""
    from kvserve.engine.async_llm import AsyncLLM, InprocCoreClient
    from kvserve.engine.core import EngineCore

    model, tok, name = fp32_parts

    def build(**kw):
        args = _test_engine_args(**kw)
        return AsyncLLM(InprocCoreClient(lambda: EngineCore(args, model=model, tokenizer=tok, model_name=name)),
                        tokenizer=tok)

    return build


@pytest.fixture(scope="session")
def hf_model():
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from kvserve.model.loader import default_model_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    model.eval()
    return model
