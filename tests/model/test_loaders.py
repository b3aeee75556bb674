"""Loaders and architectures on tiny random models built in the test: HF directories (sharded safetensors, Qwen2 QKV
bias, llama3 RoPE scaling, untied embeddings) and GGUF files written with the gguf package (quantized types, llama.cpp's
Q/K row permutation). Each must give HF transformers' greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.engine.llm_engine import EngineArgs, LLMEngine
from kvserve.model.llama import LlamaModel
from kvserve.model.loader import load_gguf, load_hf_dir, unpermute_qk
from kvserve.model.quant import as_float

VOCAB = 49152  # the SmolLM2 tokenizer's, so the engine can reuse it
PROMPTS = [[1, 504, 3458, 282, 4649, 314], list(range(200, 260)), [42] * 3 + list(range(1000, 1100, 3))]


def tiny_config(kind: str):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
    if kind == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True, rope_theta=10000.0, use_sliding_window=False)
    if kind == "llama3":
        return LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    return LlamaConfig(**common, tie_word_embeddings=True)


def tiny_hf_model(kind: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the init so that logits are far from ties
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def kvserve_greedy(model: LlamaModel, tokenizer, prompts, n, budget=32):
    engine = LLMEngine(EngineArgs(dtype="float32", num_blocks=64, max_num_batched_tokens=budget),
                       model=model, tokenizer=tokenizer)
    llm = LLM.from_engine(engine)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_tiny_hf_dir_matches_transformers(tmp_path, fp32_parts, kind):
    hf = tiny_hf_model(kind)
    hf.save_pretrained(tmp_path, max_shard_size="1MB")  # sharded safetensors + index
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_hf_dir(str(tmp_path))
    assert loaded.config.attention_bias == (kind == "qwen2")
    assert loaded.config.tie_word_embeddings == (kind != "llama3")
    if kind == "llama3":
        assert dict(loaded.config.rope_scaling)["rope_type"] == "llama3"
    model = LlamaModel(loaded.config, loaded.weights, torch.float32)
    ours = kvserve_greedy(model, fp32_parts[1], PROMPTS, 12)
    with torch.inference_mode():
        theirs = [hf_greedy(hf, p, 12) for p in PROMPTS]
    assert ours == theirs


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, hf_model, types: dict[str, "object"]):
    import gguf

    cfg = hf_model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight"}
    expected = {}
    for hf_name, arr in sd.items():
        if hf_name == "lm_head.weight":
            continue
        if hf_name in names:
            gname = names[hf_name]
        else:
            _, _, i, rest = hf_name.split(".", 3)
            gname = f"blk.{i}.{per_layer[rest]}"
        if gname.endswith("attn_q.weight"):
            arr = permute_qk(arr, cfg.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            arr = permute_qk(arr, cfg.num_key_value_heads)
        qtype = types.get(gname.split(".")[-2], gguf.GGMLQuantizationType.F32) if arr.ndim == 2 \
            else gguf.GGMLQuantizationType.F32
        data = gguf.quants.quantize(arr, qtype)
        deq = gguf.quants.dequantize(data, qtype).reshape(arr.shape)
        if gname.endswith("attn_q.weight"):
            deq = unpermute_qk(deq, cfg.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            deq = unpermute_qk(deq, cfg.num_key_value_heads)
        expected[hf_name] = deq
        w.add_tensor(gname, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_gguf_quantized_types_and_qk_permutation(tmp_path, fp32_parts):
    import gguf
    from gguf import GGMLQuantizationType as T

    hf = tiny_hf_model("llama")
    types = {"attn_q": T.Q8_0, "attn_k": T.Q4_0, "attn_v": T.Q4_1, "attn_output": T.F16, "ffn_gate": T.BF16,
             "ffn_up": T.Q5_0, "ffn_down": T.Q8_0, "token_embd": T.Q8_0}
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, hf, types)
    loaded = load_gguf(str(path))
    assert loaded.config.tie_word_embeddings and loaded.config.num_kv_heads == 2
    for name, ref in expected.items():
        np.testing.assert_array_equal(as_float(loaded.weights[name]).numpy(), ref, err_msg=name)
    # the dequantized model, loaded back into transformers, is the oracle for the forward pass
    sd = {k: torch.from_numpy(v.copy()) for k, v in expected.items()}
    hf.load_state_dict(sd, strict=False)
    hf.tie_weights()
    model = LlamaModel(loaded.config, loaded.weights, torch.float32)
    ours = kvserve_greedy(model, fp32_parts[1], PROMPTS, 10)
    with torch.inference_mode():
        theirs = [hf_greedy(hf, p, 10) for p in PROMPTS]
    assert ours == theirs
    assert gguf.GGMLQuantizationType.Q4_K.name in __import__("kvserve.model.loader",
                                                               fromlist=["x"]).SUPPORTED_GGUF_TYPES


def test_missing_model_has_clear_error(tmp_path):
    from kvserve.model.loader import ModelNotFoundError, load_model

    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path))
