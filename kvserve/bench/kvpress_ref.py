"""NVIDIA kvpress on HF transformers, the reference for kvserve's streaming and snapkv policies (docs/eviction.md).

Runs in kvpress's own virtual environment (it pins another transformers), so it imports nothing from kvserve:

    /work/kvpress-venv/bin/python kvserve/bench/kvpress_ref.py PROMPTS.json OUT.json

PROMPTS.json (written by `python -m kvserve.bench.eviction --tasks kvpress`): the model file, the passkey prompts
as token ids with their keys, the policies and budgets. For each, kvpress compresses the prompt's KV during prefill
(per layer and KV head, as published), then the answer is decoded greedily over the compressed cache and the key's
tokens are scored teacher-forced: the same accuracy and log-likelihood kvserve's benchmark reports.

Policy `snapkv_request` is kvpress's SnapKV scores with kvserve's aggregation: the scores kvpress's SnapKVPress
computed for a prompt (captured from its `snapkv` run, which must come first), summed over layers and KV heads,
choose one kept set (the sinks, the observation window, the top-scoring rest) that every layer and head keeps. Its
rows and the `snapkv` rows carry the kept positions (`kept`; per layer and KV head for `snapkv`), so the caller can
compare them with the set kvserve keeps.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch


def main(prompts_path: str, out_path: str) -> int:
    from kvpress import SnapKVPress, StreamingLLMPress
    from kvpress.utils import compute_n_kept
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    spec = json.load(open(prompts_path))
    path = spec["model"]
    kw = dict(gguf_file=os.path.basename(path))
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), **kw)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), dtype=getattr(torch, spec["dtype"]), **kw)
    model.eval()
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    results = []
    started = time.time()
    window, sinks = spec["observation_window"], spec["sink_tokens"]
    captured: dict[int, torch.Tensor] = {}  # prompt index -> SnapKV's scores summed over layers and KV heads

    class CapturingSnapKV(SnapKVPress):
        """SnapKVPress as published, recording each layer's scores and kept positions per KV head."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.scores, self.kept = {}, {}

        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            scores = super().score(module, hidden_states, keys, values, attentions, kwargs)  # (1, Hkv, P)
            self.scores[module.layer_idx] = scores[0, :, :-self.window_size].float().sum(0)
            n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
            self.kept[module.layer_idx] = scores[0].topk(n_kept, dim=-1).indices.sort(dim=-1).values.tolist()
            return scores

    class FixedSetPress(SnapKVPress):
        """Keeps the same positions in every layer and KV head."""

        keep: torch.Tensor = None

        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            idx = self.keep.view(1, 1, -1, 1).expand(keys.shape[0], keys.shape[1], -1, keys.shape[3])
            return keys.gather(2, idx).contiguous(), values.gather(2, idx).contiguous()

    for policy in spec["policies"]:
        for budget in spec["budgets"]:
            for pi, p in enumerate(spec["prompts"]):
                ids = p["ids"]
                ratio = max(0.0, 1.0 - budget / len(ids))
                extra = {}
                if policy == "streaming":
                    press = StreamingLLMPress(compression_ratio=ratio, n_sink=sinks)
                elif policy == "snapkv":
                    press = CapturingSnapKV(compression_ratio=ratio, window_size=window,
                                            kernel_size=spec["pooling_kernel"])
                elif policy == "snapkv_request":
                    if pi not in captured:
                        raise SystemExit("snapkv_request needs the snapkv policy run before it")
                    press = FixedSetPress(window_size=window)
                    press.keep = per_request_set(captured[pi], len(ids), budget, sinks, window)
                    extra["kept"] = press.keep.tolist()
                else:
                    raise SystemExit(f"unknown policy {policy!r}")
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
                if policy == "snapkv":
                    captured.setdefault(pi, torch.stack([press.scores[i] for i in sorted(press.scores)]).sum(0))
                    extra["kept_per_head"] = [press.kept[i] for i in sorted(press.kept)]  # layer -> KV head -> list
                results.append({"policy": policy, "budget": budget, "length": p["length"], "depth": p["depth"],
                                "hit": p["key"] in text, "key_logprob": sum(lp) / len(lp), "kept_tokens": kept,
                                "prompt": pi, **extra})
                print(f"[{time.time() - started:7.1f}s] kvpress {policy} {budget} len {p['length']} "
                      f"depth {p['depth']:.1f}: {'hit' if results[-1]['hit'] else 'miss'} {text!r}", flush=True)
    json.dump({"results": results, "seconds": time.time() - started,
               "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                            "kvpress": _version("kvpress")}}, open(out_path, "w"), indent=1)
    return 0


def per_request_set(scores: torch.Tensor, length: int, budget: int, sinks: int, window: int) -> torch.Tensor:
    """kvserve's rule on kvpress's scores (over the first length - window positions): the first `sinks` and the last
    `window` positions, then the highest-scoring others up to `budget` (ties to the older). Sorted positions."""
    middle = scores.clone()
    middle[:sinks] = float("-inf")
    n = max(0, min(budget, length) - sinks - window)
    order = torch.argsort(-middle[sinks:], stable=True)[:n] + sinks
    keep = torch.cat([torch.arange(min(sinks, length)), order, torch.arange(length - window, length)])
    return keep.unique().sort().values


def _copy(cache):
    import copy

    return copy.deepcopy(cache)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
