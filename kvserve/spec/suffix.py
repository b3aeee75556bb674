"""Suffix decoding (Arctic Inference's, as in vLLM): drafts from suffix trees over earlier text.

Two trees answer each proposal: one over the request's own prompt and output so far, and one over the outputs of
earlier finished requests of the same tenant and cache_salt (never another client's: acceptance rates, visible as
latency, would leak their text). The longest suffix of the context found in a tree selects a node; the draft
follows its most frequent children while the path's estimated probability stays above `min_token_prob`, for at
most `max_spec_factor` x the matched length tokens. The tree with the better-scoring draft wins.

Memory is bounded: paths are at most `max_depth` tokens, and the finished-output cache holds at most
`max_cached_requests` outputs (the oldest is subtracted from its tree when a new one comes in).
"""

from __future__ import annotations

from collections import OrderedDict


class _Node:
    __slots__ = ("count", "children")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[int, _Node] = {}


class SuffixTree:
    """Counts of every substring of at most `max_depth` tokens of the sequences added."""

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.root = _Node()
        self._active: list[_Node] = []  # nodes of the suffixes (length 1..max_depth-1) of the sequence being added
        self.num_nodes = 0

    def append(self, token: int) -> None:
        """Extend the sequence being added by one token (every suffix ending at it gains a count)."""
        new_active = []
        for node in [self.root, *self._active]:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
                self.num_nodes += 1
            child.count += 1
            new_active.append(child)
        self._active = new_active[: self.max_depth - 1]

    def add(self, tokens: list[int]) -> None:
        """Add one whole sequence (its substrings never join those of a sequence added before it)."""
        self._active = []
        for t in tokens:
            self.append(t)
        self._active = []

    def remove(self, tokens: list[int]) -> None:
        """Subtract a sequence added with `add`; nodes that reach a zero count go (with their subtrees)."""
        for i in range(len(tokens)):
            node = self.root
            for t in tokens[i:i + self.max_depth]:
                child = node.children[t]
                child.count -= 1
                if child.count == 0:
                    del node.children[t]
                    self.num_nodes -= _subtree_size(child)
                    break
                node = child

    def speculate(self, context: list[int], max_tokens: int, max_spec_factor: float,
                  min_token_prob: float) -> tuple[list[int], float]:
        """(draft, score): from the longest suffix of `context` that has a continuation in the tree. Paths are at
        most max_depth tokens, so a match of length m leaves room for max_depth - m drafted tokens: matches are
        capped to leave room for max_tokens of them (at least half the depth stays for matching)."""
        n = min(len(context), self.max_depth - 1, max(self.max_depth // 2, self.max_depth - max_tokens))
        for length in range(n, 0, -1):
            node = self.root
            for t in context[len(context) - length:]:
                node = node.children.get(t)
                if node is None:
                    break
            if node is None or not node.children:
                continue
            limit = min(max_tokens, int(max_spec_factor * length + 1e-9))
            return _greedy_path(node, limit, min_token_prob)
        return [], 0.0


def _greedy_path(node: _Node, limit: int, min_token_prob: float) -> tuple[list[int], float]:
    draft: list[int] = []
    prob, score = 1.0, 0.0
    while len(draft) < limit and node.children:
        tok, child = max(node.children.items(), key=lambda kv: kv[1].count)
        prob *= child.count / node.count
        if prob < min_token_prob:
            break
        draft.append(tok)
        score += prob
        node = child
    return draft, score


def _subtree_size(node: _Node) -> int:
    size, stack = 0, [node]
    while stack:
        n = stack.pop()
        size += 1
        stack.extend(n.children.values())
    return size


class SuffixCache:
    """Finished outputs per (tenant, cache_salt) scope, at most `max_requests` in all, oldest dropped first."""

    def __init__(self, max_depth: int, max_requests: int):
        self.max_depth = max_depth
        self.max_requests = max_requests
        self.trees: dict[tuple[str, str], SuffixTree] = {}
        self._cached: OrderedDict[str, tuple[tuple[str, str], list[int]]] = OrderedDict()

    def add(self, request_id: str, scope: tuple[str, str], output: list[int]) -> None:
        if self.max_requests == 0 or not output or request_id in self._cached:
            return
        output = list(output)
        self.trees.setdefault(scope, SuffixTree(self.max_depth)).add(output)
        self._cached[request_id] = (scope, output)
        while len(self._cached) > self.max_requests:
            _, (old_scope, old) = self._cached.popitem(last=False)
            tree = self.trees[old_scope]
            tree.remove(old)
            if not tree.root.children:
                del self.trees[old_scope]

    def tree(self, scope: tuple[str, str]) -> SuffixTree | None:
        return self.trees.get(scope)

    @property
    def num_requests(self) -> int:
        return len(self._cached)

    @property
    def num_nodes(self) -> int:
        return sum(t.num_nodes for t in self.trees.values())
