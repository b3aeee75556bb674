"""Tokenizer and chat template (HF tokenizers, from the GGUF metadata or an HF directory) and incremental detokenization."""

from __future__ import annotations

import logging
import os


class Tokenizer:
    def __init__(self, source: tuple[str, str | None], chat_template: str | None = None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        logging.getLogger("transformers").setLevel(logging.ERROR)
        directory, gguf_file = source
        if gguf_file:
            self.hf = _load_gguf_tokenizer(directory, gguf_file)
        else:
            self.hf = AutoTokenizer.from_pretrained(directory)
        if chat_template and not getattr(self.hf, "chat_template", None):
            self.hf.chat_template = chat_template
        self.vocab_size = len(self.hf)
        self.eos_token_id = self.hf.eos_token_id
        self.all_special_ids = set(self.hf.all_special_ids)
        self._max_token_chars: int | None = None

    def same_vocabulary(self, other: "Tokenizer") -> bool:
        """True if both map every token string to the same id (a draft model must tokenize like its target)."""
        return self.hf.get_vocab() == other.hf.get_vocab()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        """Text of one token for logprob listings (may be a partial UTF-8 character)."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    @property
    def max_token_chars(self) -> int:
        """Characters in the longest token: a text longer than n times this cannot fit in n tokens."""
        if self._max_token_chars is None:
            self._max_token_chars = max(map(len, self.hf.get_vocab()), default=64)
        return self._max_token_chars

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def render_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use a completion prompt instead")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **kwargs)

    def encode_segments(self, segments: list, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        """(token ids, start of every segment after the first) of a prompt given as segments (docs/kvreuse.md):
        strings are tokenized alone, special tokens added to the first only; token-id lists are taken as they are.
        Raises ValueError naming the bad segment."""
        if not isinstance(segments, (list, tuple)) or not segments:
            raise ValueError("prompt_segments must be a non-empty list of strings or token-id lists")
        ids: list[int] = []
        starts: list[int] = []
        for i, seg in enumerate(segments):
            if isinstance(seg, str):
                part = self.encode(seg, add_special_tokens=add_special_tokens and i == 0)
            elif isinstance(seg, (list, tuple)) and all(type(t) is int for t in seg):
                part = list(seg)
            else:
                raise ValueError(f"prompt segment {i} must be a string or a list of token ids")
            if not part:
                raise ValueError(f"prompt segment {i} is empty (it has no tokens)")
            if i:
                starts.append(len(ids))
            ids.extend(part)
        return ids, starts

    def chat_segments(self, messages: list[dict], parts: list[list[str]], add_generation_prompt: bool = True
                      ) -> tuple[list[int], list[int]]:
        """A chat prompt as segments: the text parts of every message with two or more (`parts[i]`, joined as
        messages[i]'s content; a RAG turn's documents and question) are segments; everything before the first of
        them (the system prompt, earlier turns, the template's headers) is segment 0, the context the documents are
        cached after in prefix mode; the template's own text between parts of different messages, and after the
        last, are segments of their own."""
        text = self.render_chat_template(messages, add_generation_prompt)
        pieces, pos = [], 0
        for message_parts in parts:
            if len(message_parts) < 2:
                continue  # one part: nothing to reuse apart, it stays with the text around it
            for part in message_parts:
                at = text.find(part, pos)
                if at < 0:
                    raise ValueError("the chat template changes the messages' text, so its parts cannot be segments")
                pieces += [text[pos:at], part]
                pos = at + len(part)
        pieces.append(text[pos:])
        ids: list[int] = []
        starts: list[int] = []
        for piece in pieces:
            part = self.encode(piece, add_special_tokens=False) if piece else []
            if part:
                if ids:
                    starts.append(len(ids))
                ids.extend(part)
        return ids, starts

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        text = self.render_chat_template(messages, add_generation_prompt, **kwargs)
        # the template already contains any BOS/special tokens it wants
        return self.encode(text, add_special_tokens=False)


def _load_gguf_tokenizer(directory: str, gguf_file: str):
    """Converting a GGUF vocabulary to an HF tokenizer takes seconds; do it once per file and keep the result."""
    import hashlib

    from transformers import AutoTokenizer

    path = os.path.join(directory, gguf_file)
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = os.environ.get("KVSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvserve")
    cache = os.path.join(root, "tokenizers", key)
    if os.path.isfile(os.path.join(cache, "tokenizer.json")):
        try:
            return AutoTokenizer.from_pretrained(cache)
        except Exception:  # a damaged cache entry: rebuild it below
            pass
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    try:
        tmp = f"{cache}.tmp{os.getpid()}"
        tok.save_pretrained(tmp)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        if os.path.isdir(cache):
            import shutil
            shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only home: just convert every time
    return tok


class IncrementalDetokenizer:
    """Streams text for a growing list of token ids without ever emitting half a UTF-8 character.

    Decodes a small window (a few tokens of context + the new ones) and emits the part past the context, so leading
    spaces of BPE/SentencePiece tokens come out right and the cost per token stays constant.
    """

    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_ids: list[int], final: bool = False) -> str:
        self.ids.extend(token_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""
