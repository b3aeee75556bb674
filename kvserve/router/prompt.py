"""A request body to the hash chain of its prompt's full blocks, computed as the backends compute it (same tokenizer,
chat template, cache_salt and chain): what the router matches against the backends' summaries."""

from __future__ import annotations

from pydantic import ValidationError

from kvserve.core.hashing import hash_block_chain
from kvserve.model.tokenizer import Tokenizer
from kvserve.server import protocol as p

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


class PromptHasher:
    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    def prompt_ids(self, path: str, body: dict) -> tuple[list[int], str | None, str | None]:
        """(token ids of the (first) prompt, cache_salt, session_id); ([], None, None) for a body the backend will
        refuse anyway (it answers the error)."""
        try:
            if path == CHAT_PATH:
                req = p.ChatCompletionRequest.model_validate(body)
                ids = self.tok.apply_chat_template(req.template_messages(), req.add_generation_prompt)
            else:
                req = p.CompletionRequest.model_validate(body)
                first = req.prompts()[0]
                ids = self.tok.encode(first, add_special_tokens=req.add_special_tokens) if isinstance(first, str) \
                    else list(first)
        except (ValidationError, ValueError, TypeError, IndexError):
            return [], None, None
        except Exception:  # noqa: BLE001 - a template error: the backend reports it
            return [], None, None
        return ids, req.cache_salt, req.session_id

    def block_hashes(self, path: str, body: dict, block_size: int, hash_bytes: int) -> tuple[list[bytes], str | None]:
        """The truncated hashes of the blocks a backend could serve from its prefix cache (never the block holding
        the last prompt token, whose logits are needed), and the session id."""
        ids, salt, session = self.prompt_ids(path, body)
        usable = max(len(ids) - 1, 0) // block_size
        chain = hash_block_chain(ids[:usable * block_size], block_size, salt)
        return [h[:hash_bytes] for h in chain], session
