"""Prompt lookup (n-gram) drafting: the tokens that followed the latest earlier occurrence of the text's suffix.

An index per request maps each n-gram (n in [min, max]) to where its most recent earlier occurrence ended, kept up
to date as tokens are appended (O(max - min + 1) dict writes per token), so a proposal costs one lookup per n
instead of a scan of the whole context.
"""

from __future__ import annotations


class NgramIndex:
    def __init__(self, min_n: int, max_n: int):
        self.min_n = min_n
        self.max_n = max_n
        self.tokens: list[int] = []
        # n -> {n-gram: position just after its most recent occurrence that has at least one token after it}
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self._append(t)

    def _append(self, token: int) -> None:
        toks = self.tokens
        end = len(toks)  # the n-grams ending here now have a continuation: `token`, at position `end`
        for n, index in self._index.items():
            if end >= n:
                index[tuple(toks[end - n:end])] = end
        toks.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the longest (then most recent) earlier match of the current suffix."""
        toks = self.tokens
        for n in range(min(self.max_n, len(toks)), self.min_n - 1, -1):
            start = self._index[n].get(tuple(toks[len(toks) - n:]))
            if start is not None:
                return toks[start:start + k]
        return []
