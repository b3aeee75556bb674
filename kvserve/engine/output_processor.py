"""RequestUpdates -> RequestOutputs: incremental detokenization, stop strings (never leaked), logprobs, metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kvserve.core.outputs import RequestUpdate, TokenLogprobs
from kvserve.core.request import FinishReason
from kvserve.engine.protocol import KVTransferParams, sequence_ids
from kvserve.model.tokenizer import IncrementalDetokenizer, Tokenizer
from kvserve.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from kvserve.sampling import SamplingParams


@dataclass
class SeqState:
    index: int
    seq_id: str
    detok: IncrementalDetokenizer
    params: SamplingParams
    text: str = ""  # all decoded text (may include a stop string not yet cut)
    emitted: int = 0  # characters of `text` already handed out as deltas
    sent_ids: int = 0  # token ids already handed out as deltas
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_evicted_tokens: int = 0  # KV eviction: tokens whose KV this sequence dropped
    continued: bool = False  # P/D prefill: if it ends at max_tokens, a decode instance continues it

    @property
    def holdback(self) -> int:
        """Characters kept back from streaming while they could still be the start of a stop string."""
        if not self.params.stop or self.params.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.params.stop) - 1


@dataclass
class GroupState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[SeqState]
    prompt_logprobs: list[PositionLogprobs | None] | None
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    num_blended_tokens: int = 0  # CacheBlend: prompt tokens reused from the segment cache (docs/kvreuse.md)
    num_recomputed_tokens: int = 0  # ... of which recomputed

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.groups: dict[str, GroupState] = {}
        self.seq_to_group: dict[str, tuple[GroupState, SeqState]] = {}

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
            arrival_time: float, transfer: KVTransferParams | None = None) -> None:
        """`transfer` (P/D): a prefill instance's sequences that end at max_tokens keep what would still be held
        back (a partial character, a possible stop string's start) for the decode instance, which starts from that
        same state: the client's text is the prefill's then the decode's, exactly the colocated text."""
        seqs = []
        continues = transfer.output_token_ids if transfer is not None else None
        for i, sid in enumerate(sequence_ids(request_id, params.n)):
            st = SeqState(i, sid, IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens),
                          params, logprobs=[] if params.logprobs is not None else None,
                          cumulative_logprob=0.0 if params.logprobs is not None else None,
                          continued=transfer is not None and transfer.publish)
            if continues is not None:
                # tokens the prefill instance sampled and streamed: counted (usage, stops) but not streamed again
                st.token_ids = list(continues[i])
                st.sent_ids = len(st.token_ids)
                st.text = st.detok.add(st.token_ids)
                st.emitted = max(0, len(st.text) - st.holdback)
            seqs.append(st)
        plp = None
        if params.prompt_logprobs is not None:
            plp = [None] * len(prompt_ids)
        group = GroupState(request_id, prompt, prompt_ids, seqs, plp, RequestMetrics(arrival_time))
        self.groups[request_id] = group
        for st in seqs:
            self.seq_to_group[st.seq_id] = (group, st)

    def _to_position(self, tl: TokenLogprobs) -> PositionLogprobs:
        tok, lp, rank, top = tl
        piece = self.tokenizer.id_to_piece
        d = {tok: Logprob(lp, rank, piece(tok))}
        for i, (t, v) in enumerate(top):
            if t not in d:
                d[t] = Logprob(v, i + 1, piece(t))
        return d

    def process(self, updates: list[RequestUpdate], first_scheduled: dict[str, float] | None = None) \
            -> tuple[list[RequestOutput], list[str]]:
        """Returns the outputs of touched requests and the sequence ids a stop string ended (to free in the core)."""
        now = time.monotonic()
        touched: dict[str, GroupState] = {}
        stopped: list[str] = []
        for sid, at in (first_scheduled or {}).items():
            entry = self.seq_to_group.get(sid)
            if entry is not None and entry[0].metrics.first_scheduled_time is None:
                entry[0].metrics.first_scheduled_time = at
        for u in updates:
            entry = self.seq_to_group.get(u.request_id)
            if entry is None:
                continue
            group, seq = entry
            if seq.finish_reason is not None:
                continue
            touched[group.request_id] = group
            seq.num_evicted_tokens = u.num_evicted_tokens
            if seq.index == 0:  # usage reports the prompt once, as the first sequence saw it
                group.num_cached_tokens = max(group.num_cached_tokens, u.num_cached_tokens)
                group.num_blended_tokens = u.num_blended_tokens
                group.num_recomputed_tokens = u.num_recomputed_tokens
            if u.prompt_logprobs and group.prompt_logprobs is not None:
                first, entries = u.prompt_logprobs
                for j, tl in enumerate(entries):
                    group.prompt_logprobs[first + j] = self._to_position(tl)
            if u.new_token_ids:
                m = group.metrics
                if seq.index == 0:
                    if m.first_token_time is None:
                        m.first_token_time = now
                    elif m.last_token_time is not None:
                        m.token_gaps.append(now - m.last_token_time)
                    m.last_token_time = now
                new, final = u.new_token_ids, u.finish_reason is not None
                # several tokens at once (accepted speculative drafts) meet stop strings one token at a time, so a
                # stop ends the sequence at the token that completed it, exactly as without drafts
                pieces = [new[i:i + 1] for i in range(len(new))] if seq.params.stop and len(new) > 1 else [new]
                done = 0
                for piece in pieces:
                    seq.token_ids.extend(piece)
                    for tl in u.new_logprobs[done:done + len(piece)]:
                        if seq.logprobs is not None:
                            seq.logprobs.append(self._to_position(tl))
                            seq.cumulative_logprob += tl[1]
                    done += len(piece)
                    last = final and done == len(new)
                    if last and seq.continued and u.finish_reason == FinishReason.LENGTH:
                        last = False  # the decode instance continues: nothing is flushed
                    seq.text += seq.detok.add(piece, final=last)
                    if self._check_stop_strings(seq):
                        stopped.append(seq.seq_id)
                        break
            if u.finish_reason is not None and seq.finish_reason is None:
                seq.finish_reason = u.finish_reason.value
                seq.stop_reason = u.stop_reason
        outputs = [self._make_output(g) for g in touched.values()]
        for g in touched.values():
            if g.finished:
                g.metrics.finished_time = now
                self._forget(g)
        return outputs, stopped

    def _check_stop_strings(self, seq: SeqState) -> bool:
        stops = seq.params.stop
        if not stops:
            return False
        # only the tail can contain a new match: the new text plus what could have started before it
        window_start = max(0, seq.emitted - max(len(s) for s in stops))
        best = None
        for s in stops:
            i = seq.text.find(s, window_start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        seq.text = seq.text[: i + len(s)] if seq.params.include_stop_str_in_output else seq.text[:i]
        seq.finish_reason = "stop"
        seq.stop_reason = s
        return True

    def _make_output(self, group: GroupState) -> RequestOutput:
        outs = []
        for seq in group.seqs:
            done = seq.finish_reason is not None and not (seq.continued and seq.finish_reason == "length")
            limit = len(seq.text) if done else max(seq.emitted, len(seq.text) - seq.holdback)
            delta_text = seq.text[seq.emitted:limit]
            seq.emitted = limit
            delta_ids = seq.token_ids[seq.sent_ids:]
            seq.sent_ids = len(seq.token_ids)
            outs.append(CompletionOutput(
                index=seq.index, text=seq.text[:limit], token_ids=list(seq.token_ids),
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                delta_text=delta_text, delta_token_ids=delta_ids))
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, group.prompt_logprobs, outs,
                             group.finished, group.num_cached_tokens, group.metrics,
                             sum(s.num_evicted_tokens for s in group.seqs), group.num_blended_tokens,
                             group.num_recomputed_tokens)

    def abort(self, request_id: str) -> RequestOutput | None:
        group = self.groups.get(request_id)
        if group is None:
            return None
        for seq in group.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        out = self._make_output(group)
        self._forget(group)
        return out

    def _forget(self, group: GroupState) -> None:
        self.groups.pop(group.request_id, None)
        for seq in group.seqs:
            self.seq_to_group.pop(seq.seq_id, None)

