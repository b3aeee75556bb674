"""Admission order for a large offline batch: prompts grouped by shared prefix (BatchLLM, Zheng et al. 2024).

The scheduler admits in the order requests are added and the prefix cache holds only what the pool can keep. In
arrival order, the requests sharing a prefix are spread over the whole batch: by the time the next one is admitted
the prefix's blocks may have been evicted by everything admitted in between, and it is computed again. Adding the
batch grouped by shared prefix lets each prefix be computed once, by the first request of its group, and reused by
the rest while they still pin it or it is fresh in the LRU.

The groups come from the global prefix tree of the batch, over full KV blocks (only whole blocks can be cached and
matched). A depth-first walk keeps every subtree contiguous, so requests sharing a deeper prefix are adjacent
inside the group that shares a shorter one; siblings with the deeper shared prefix go first (more tokens saved per
group while the pool is still empty). Within a group, longer decodes go first: they finish last, so starting them
early lets the short ones fill the batch behind them instead of a few long ones running alone at the end.

Pure Python (the engine's front end imports it, never torch). Deterministic: ties go to the lower input index.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["prefix_grouped_order"]


class _Node:
    __slots__ = ("children", "count", "depth", "ends", "first", "deepest")

    def __init__(self, depth: int, first: int):
        self.children: dict[tuple[int, ...], _Node] = {}
        self.count = 0  # requests whose full blocks pass through this node
        self.depth = depth  # blocks from the root
        self.ends: list[int] = []  # requests with no further full block
        self.first = first  # lowest input index through this node
        self.deepest = 0  # depth of the deepest node with count >= 2 in this subtree (set after the build)


def prefix_grouped_order(prompts: Sequence[Sequence[int]], max_tokens: Sequence[int | None],
                         block_size: int = 16) -> list[int]:
    """A permutation of range(len(prompts)): the order to add the requests to the engine.

    A request belongs to the group of the deepest tree node it shares with another request (the root when it shares
    no full block). Groups sharing a deeper prefix come before their parent's own requests and before siblings with a
    shallower one; inside a group, larger `max_tokens` first (None: up to the context, the largest).
    O(total prompt tokens) to build the tree, then a sort per group.
    """
    if len(max_tokens) != len(prompts):
        raise ValueError("max_tokens must have one entry per prompt")
    if block_size < 1:
        raise ValueError("block_size must be positive")
    root = _Node(0, 0)
    root.count = len(prompts)
    for i, ids in enumerate(prompts):
        node = root
        for start in range(0, len(ids) - block_size + 1, block_size):
            key = tuple(ids[start:start + block_size])
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Node(node.depth + 1, i)
            child.count += 1
            node = child
        node.ends.append(i)

    # deepest shared depth per subtree, bottom-up without recursion (a prompt can be thousands of blocks deep)
    post: list[_Node] = []
    stack = [root]
    while stack:
        node = stack.pop()
        post.append(node)
        stack.extend(c for c in node.children.values() if c.count >= 2)
    for node in reversed(post):
        node.deepest = max([node.depth if node.count >= 2 else 0] +
                           [c.deepest for c in node.children.values() if c.count >= 2])

    def decode_first(i: int) -> tuple[float, int]:
        n = max_tokens[i]
        return (-(float("inf") if n is None else n), i)

    order: list[int] = []
    # walk: a node's shared children (deepest first) before its own group; the stack holds nodes still to expand
    # and, after them, the node's own group as a list of indices
    work: list[_Node | list[int]] = [root]
    while work:
        item = work.pop()
        if isinstance(item, list):
            order.extend(sorted(item, key=decode_first))
            continue
        own = list(item.ends)
        shared = []
        for c in item.children.values():
            if c.count >= 2:
                shared.append(c)
            else:  # a lone path below this node: the request's deepest shared prefix is this node's
                own.append(c.first)
        shared.sort(key=lambda c: (-c.deepest, c.first))
        work.append(own)
        work.extend(reversed(shared))
    return order
