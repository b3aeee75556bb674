"""NVIDIA kvpress on HF transformers, the reference for kvserve's streaming and snapkv policies (docs/eviction.md).

Runs in kvpress's own virtual environment (it pins another transformers), so it imports nothing from kvserve:

    /work/kvpress-venv/bin/python kvserve/bench/kvpress_ref.py PROMPTS.json OUT.json

PROMPTS.json (written by `python -m kvserve.bench.eviction --tasks kvpress`): the model file, the passkey prompts
as token ids with their keys, the policies and budgets. For each, kvpress compresses the prompt's KV during prefill
(per layer and KV head, as published), then the answer is decoded greedily over the compressed cache and the key's
tokens are scored teacher-forced: the same accuracy and log-likelihood kvserve's benchmark reports.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch


def main(prompts_path: str, out_path: str) -> int:
    from kvpress import SnapKVPress, StreamingLLMPress
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    spec = json.load(open(prompts_path))
    path = spec["model"]
    kw = dict(gguf_file=os.path.basename(path))
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), **kw)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), dtype=getattr(torch, spec["dtype"]), **kw)
    model.eval()
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    results = []
    started = time.time()
    for policy in spec["policies"]:
        for budget in spec["budgets"]:
            for p in spec["prompts"]:
                ids = p["ids"]
                ratio = max(0.0, 1.0 - budget / len(ids))
                if policy == "streaming":
                    press = StreamingLLMPress(compression_ratio=ratio, n_sink=spec["sink_tokens"])
                else:
                    press = SnapKVPress(compression_ratio=ratio, window_size=spec["observation_window"],
                                        kernel_size=spec["pooling_kernel"])
                with torch.inference_mode():
                    cache = DynamicCache()
                    with press(model):
                        out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
                    kept = cache.get_seq_length()
                    first = out.logits[0, -1]
                    # the key's tokens, teacher-forced over the compressed cache
                    fcache = _copy(cache)
                    lp = [torch.log_softmax(first.float(), -1)[p["answer_ids"][0]].item()]
                    pos = len(ids)
                    for i, t in enumerate(p["answer_ids"][:-1]):
                        o = model(torch.tensor([[t]]), past_key_values=fcache, use_cache=True,
                                  position_ids=torch.tensor([[pos + i]]))
                        lp.append(torch.log_softmax(o.logits[0, -1].float(), -1)[p["answer_ids"][i + 1]].item())
                    # greedy answer
                    gen = [int(first.argmax())]
                    for i in range(spec["max_tokens"] - 1):
                        o = model(torch.tensor([[gen[-1]]]), past_key_values=cache, use_cache=True,
                                  position_ids=torch.tensor([[pos + i]]))
                        gen.append(int(o.logits[0, -1].argmax()))
                text = tok.decode(gen, skip_special_tokens=True)
                results.append({"policy": policy, "budget": budget, "length": p["length"], "depth": p["depth"],
                                "hit": p["key"] in text, "key_logprob": sum(lp) / len(lp), "kept_tokens": kept})
                print(f"[{time.time() - started:7.1f}s] kvpress {policy} {budget} len {p['length']} "
                      f"depth {p['depth']:.1f}: {'hit' if results[-1]['hit'] else 'miss'} {text!r}", flush=True)
    json.dump({"results": results, "seconds": time.time() - started,
               "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                            "kvpress": _version("kvpress")}}, open(out_path, "w"), indent=1)
    return 0


def _copy(cache):
    import copy

    return copy.deepcopy(cache)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
