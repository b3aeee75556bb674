"""Swap-or-recompute preemption (FastSwitch): where a preempted request's KV goes, decided per victim.

Recompute drops the victim's KV and prefills it again on resume (its cost grows with its length, and it delays
everyone sharing the steps). Swap copies the victim's blocks out to a swap space in host memory and back on resume
(block-granular, as worker-side KV operations before a forward pass, never inside one). `SwapCostModel` compares
the two with speeds measured while serving, per victim.
"""

from __future__ import annotations

from dataclasses import dataclass

EWMA = 0.2


@dataclass
class SwappedKV:
    """A preempted request's KV in the swap space: slot k holds the request's block k; KV slots [0, num_tokens),
    after `num_evicted` tokens were evicted (positions [0, num_tokens + num_evicted) were computed)."""

    slots: list[int]
    num_tokens: int
    num_evicted: int = 0


class SwapSpace:
    """Slot allocator of the swap space. Slots freed in a step become reusable only from the next step, so a copy
    out in the same step's operation list can never land on a slot that a copy in still has to read."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._freed_this_step: list[int] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free) - len(self._freed_this_step)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free_later(self, slots: list[int]) -> None:
        self._freed_this_step.extend(slots)

    def begin_step(self) -> None:
        self._free.extend(reversed(self._freed_this_step))
        self._freed_this_step.clear()

    def check_invariants(self, held: list[int]) -> None:
        every = self._free + self._freed_this_step + held
        assert sorted(every) == list(range(self.num_slots)), "swap slots lost or held twice"


@dataclass
class SwapDecision:
    mode: str  # "swap" | "recompute"
    swap_seconds: float  # estimated copy out + copy in
    recompute_seconds: float  # estimated prefill of the computed tokens


class SwapCostModel:
    """Copy bandwidth (bytes/s) and prefill speed (tokens/s), as EWMAs of what the worker measured."""

    def __init__(self, bytes_per_block: int, copy_bytes_per_s: float = 4e9, prefill_tokens_per_s: float = 1000.0):
        self.bytes_per_block = bytes_per_block
        self.copy_bytes_per_s = copy_bytes_per_s
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.copy_samples = 0
        self.prefill_samples = 0

    def observe_copy(self, nbytes: int, seconds: float) -> None:
        self._observe("copy", "copy_bytes_per_s", nbytes, seconds)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        self._observe("prefill", "prefill_tokens_per_s", tokens, seconds)

    def _observe(self, kind: str, rate_attr: str, amount: float, seconds: float) -> None:
        """The first measurement replaces the prior guess; later ones move the EWMA."""
        if amount > 0 and seconds > 0:
            rate, samples = amount / seconds, getattr(self, kind + "_samples")
            setattr(self, rate_attr, rate if not samples else (1 - EWMA) * getattr(self, rate_attr) + EWMA * rate)
            setattr(self, kind + "_samples", samples + 1)

    def decide(self, num_tokens: int, num_blocks: int) -> SwapDecision:
        swap = 2 * num_blocks * self.bytes_per_block / self.copy_bytes_per_s
        recompute = num_tokens / self.prefill_tokens_per_s
        return SwapDecision("swap" if swap < recompute else "recompute", swap, recompute)
