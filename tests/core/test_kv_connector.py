"""The scheduler's side of the tiered KV store, with an in-memory connector whose "KV" is (token, position) pairs:
requests wait in a fetch state without blocking others, loads land in the right blocks, saves copy the right blocks,
aborts while fetching leak nothing."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvserve.core.request import RequestStatus

from tests.core.fake_runner import FakeRunner
from tests.core.test_scheduler import BS, make_sched, req, run

CHUNK = 4 * BS


@dataclass
class Fetched:
    start: int
    end: int
    kv: list[tuple[int, int]]


class DictConnector:
    """A store keyed by chunk hash; fetches complete only when the test says so."""

    chunk_size = CHUNK

    def __init__(self):
        self.chunks: dict[bytes, list[tuple[int, int]]] = {}
        self.jobs: dict[str, tuple[list[tuple[bytes, int]], int]] = {}
        self.options: dict[str, tuple[float, bool]] = {}  # request id -> (wait_s, force) of its fetch
        self.ready: dict[str, Fetched | None] = {}
        self.cancelled: list[str] = []

    def start_fetch(self, request_id, chunks, start_token, wait_s=0.0, force=False):
        self.jobs[request_id] = (chunks, start_token)
        self.options[request_id] = (wait_s, force)

    def complete(self, request_id):
        chunks, start = self.jobs.pop(request_id)
        kv = []
        for h, n in chunks:
            if h not in self.chunks:
                break
            assert len(self.chunks[h]) == n
            kv.extend(self.chunks[h])
        self.ready[request_id] = Fetched(start, start + len(kv), kv) if kv else None

    def poll_finished(self):
        done, self.ready = self.ready, {}
        return done

    def cancel(self, request_id):
        self.cancelled.append(request_id)
        self.jobs.pop(request_id, None)

    def is_known(self, chunk_hash):
        return chunk_hash in self.chunks


def sched_with(conn, **kw):
    s = make_sched(**kw)
    s.connector = conn
    return s


def run_saving(sched, runner, conn):
    """Run to the end, answering every fetch at once and storing what requests leave behind."""
    def hook(i, so):
        for rid in list(conn.jobs):
            conn.complete(rid)
    return run(sched, runner, on_step=hook)


def test_saves_copy_every_full_chunk_from_the_right_blocks():
    conn = DictConnector()
    sched, runner = sched_with(conn), FakeRunner(BS, store=conn)
    r = req("a", 200, max_tokens=3)
    sched.add_request(r)
    saved_at: dict[int, int] = {}  # chunks stored -> output tokens the request had by then

    def hook(i, so):
        saved_at.setdefault(len(conn.chunks), r.num_output_tokens)
        for rid in list(conn.jobs):
            conn.complete(rid)

    run(sched, runner, on_step=hook)
    # the prompt's chunks are stored as soon as it is computed (by the next step's KV operations, before its forward
    # pass), not when the request ends
    assert saved_at[3] == 2
    # 200 prompt + 2 computed outputs = 202 tokens computed: 3 full chunks of 64
    assert len(conn.chunks) == 3
    for k in range(3):
        h = r.block_hashes[(k + 1) * CHUNK // BS - 1]
        assert conn.chunks[h] == [(r.token_ids[p], p) for p in range(k * CHUNK, (k + 1) * CHUNK)]


def test_fetching_request_waits_without_blocking_others_then_loads_into_its_blocks():
    conn = DictConnector()
    first, runner = sched_with(conn), FakeRunner(BS, store=conn)
    first.add_request(req("warm", 300, max_tokens=4, seed_tokens=7))
    expected = run_saving(first, runner, conn)["warm"]

    sched, runner = sched_with(conn), FakeRunner(BS, store=conn)  # a fresh pool: only the store knows the prefix
    long = req("long", 300, max_tokens=4, seed_tokens=7)
    short = req("short", 20, max_tokens=30)
    sched.add_request(long)
    sched.add_request(short)
    outs: dict[str, list[int]] = {}
    for _ in range(5):
        so = sched.schedule()
        assert long.status == RequestStatus.FETCHING and "long" in conn.jobs
        assert [s.request_id for s in so.scheduled] == ["short"]
        for u in sched.update(so, runner.execute(so)):
            outs.setdefault(u.request_id, []).extend(u.new_token_ids)
        sched.check_invariants()
    conn.complete("long")
    so = sched.schedule()
    (load,) = so.kv_ops
    blocks = sched.kv.get_block_ids("long")
    # 300 tokens: chunks [0, 64) .. [192, 256) come from the store; the last 44 tokens are computed
    assert (load.src_offset, load.num_tokens, load.block_ids) == (0, 256, blocks[:16])
    (sr,) = [s for s in so.scheduled if s.request_id == "long"]
    assert (sr.start, sr.num_new_tokens) == (256, 44)
    assert long.num_cached_tokens == 256 and long.num_loaded_tokens == 256
    for u in sched.update(so, runner.execute(so)):
        outs.setdefault(u.request_id, []).extend(u.new_token_ids)
    rest = run(sched, runner)
    for k, v in rest.items():
        outs.setdefault(k, []).extend(v)
    assert outs["long"] == expected  # the fake runner read the loaded (token, position) pairs back
    assert sched.num_computed_prompt_tokens == 44 + 20
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


def test_pool_prefix_then_store_chunks_and_the_last_token_is_never_loaded():
    conn = DictConnector()
    first, runner = sched_with(conn), FakeRunner(BS, store=conn)
    first.add_request(req("warm", 256, max_tokens=2, seed_tokens=9))
    run_saving(first, runner, conn)

    sched, runner = sched_with(conn), FakeRunner(BS, store=conn)
    sched.add_request(req("head", 80, max_tokens=1, seed_tokens=9))  # puts 5 blocks (80 tokens) in the pool
    sched.connector = None
    run(sched, runner)
    sched.connector = conn
    r = req("full", 256, max_tokens=2, seed_tokens=9)  # same 256 tokens: every chunk is stored
    sched.add_request(r)
    so = sched.schedule()
    assert r.status == RequestStatus.FETCHING and conn.jobs["full"][1] == 64  # the chunk the pool ends in
    conn.complete("full")
    so = sched.schedule()
    (load,) = so.kv_ops
    # the pool gives 80 tokens; the store's chunks start at 64, so its copy starts 16 tokens in and ends at 240:
    # the last block holds the final token and is computed
    assert (load.src_offset, load.num_tokens) == (16, 240 - 80)
    assert load.block_ids == sched.kv.get_block_ids("full")[5:15]
    assert so.scheduled[0].start == 240 and so.scheduled[0].num_new_tokens == 16
    sched.update(so, runner.execute(so))
    run(sched, runner)
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


def test_abort_while_fetching_cancels_and_leaks_nothing():
    conn = DictConnector()
    sched = sched_with(conn)
    sched.add_request(req("x", 200, max_tokens=4))
    so = sched.schedule()
    assert so.is_empty and "x" in sched.fetching
    sched.finish_request("x", RequestStatus.FINISHED_ABORTED)
    assert conn.cancelled == ["x"] and not sched.fetching and not sched.has_unfinished_requests()
    sched.check_invariants()
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


def test_a_miss_in_the_store_admits_the_request_normally():
    conn = DictConnector()
    sched, runner = sched_with(conn), FakeRunner(BS, store=conn)
    sched.add_request(req("m", 150, max_tokens=3))
    out = run_saving(sched, runner, conn)
    assert len(out["m"]) == 3 and sched.num_loaded_tokens == 0 and sched.num_computed_prompt_tokens == 150


def test_pd_prefill_publishes_the_prompt_down_to_the_block_and_decode_loads_it_all():
    """P/D (docs/scaleout.md): the prefill side stores the full chunks and, as an entry of its own, the prompt's full
    blocks after them; the decode side (the prompt plus the prefill's first token) asks for exactly those entries,
    waiting for them and loading whatever the cost model says, and computes only the partial block and the token."""
    conn = DictConnector()
    pre, runner = sched_with(conn), FakeRunner(BS, store=conn)
    p = req("p", 150, max_tokens=1, seed_tokens=5)  # 2 full chunks of 64, then 22 tokens: one more full block
    p.publish_kv = True
    pre.add_request(p)
    first = run_saving(pre, runner, conn)["p"]
    chunk_keys = [p.block_hashes[3], p.block_hashes[7]]
    tail_key = p.block_hashes[8]
    assert set(conn.chunks) == {*chunk_keys, tail_key}
    assert conn.chunks[tail_key] == [(p.token_ids[i], i) for i in range(128, 144)]

    dec, runner = sched_with(conn), FakeRunner(BS, store=conn)
    dec.config = dataclasses.replace(dec.config, kv_transfer_timeout_s=2.5)
    d = req("d", 150, max_tokens=4, seed_tokens=5)
    d.append_output_token(first[0])
    d.kv_transfer_tokens = 144
    dec.add_request(d)
    so = dec.schedule()
    assert so.is_empty and d.status == RequestStatus.FETCHING
    assert conn.jobs["d"] == ([(chunk_keys[0], 64), (chunk_keys[1], 64), (tail_key, 16)], 0)
    assert conn.options["d"] == (2.5, True)
    conn.complete("d")
    so = dec.schedule()
    (load,) = so.kv_ops
    assert (load.src_offset, load.num_tokens) == (0, 144)
    (sr,) = so.scheduled
    assert (sr.start, sr.num_new_tokens) == (144, 7)  # 6 prompt tokens of the partial block + the first output
    dec.update(so, runner.execute(so))
    run(dec, runner)
    assert dec.num_computed_prompt_tokens == 6 and dec.num_loaded_tokens == 144
    assert dec.kv.pool.num_free_blocks == dec.kv.pool.num_blocks
