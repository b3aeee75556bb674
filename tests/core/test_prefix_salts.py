"""The salts remembered to explain "different_salt" prefix-cache misses stay bounded whatever clients send."""

from kvserve.core.block_pool import BlockPool
from kvserve.core.kv_cache_manager import SALTS_PER_FIRST_BLOCK, KVCacheManager
from kvserve.core.request import Request
from kvserve.sampling import SamplingParams

BS = 4


def cache_prompt(kv: KVCacheManager, rid: str, tokens: list[int], salt: str | None) -> None:
    req = Request(rid, tokens, SamplingParams(temperature=0, max_tokens=1), BS, (0,), cache_salt=salt)
    kv.allocate_slots(req, len(tokens))
    kv.cache_blocks(req, len(tokens))
    kv.free(req)


def miss_cause(kv: KVCacheManager, tokens: list[int], salt: str | None) -> str | None:
    req = Request("probe", tokens, SamplingParams(temperature=0, max_tokens=1), BS, (0,), cache_salt=salt)
    return kv.match_prefix(req).miss_cause


def test_one_prompt_under_many_salts_keeps_a_few_and_still_names_the_cause():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(9))
    for i in range(1000):  # a client sending a fresh cache_salt with every request
        cache_prompt(kv, f"r{i}", prompt, f"salt-{i}")
    (salts,) = kv._first_block_salts.values()
    assert len(salts) == SALTS_PER_FIRST_BLOCK
    assert miss_cause(kv, prompt, "salt-new") == "different_salt"
    assert miss_cause(kv, prompt, None) == "different_salt"
    assert miss_cause(kv, list(range(100, 109)), "salt-0") == "no_match"


def test_a_single_salt_is_not_a_different_one():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(9))
    for i in range(3):
        cache_prompt(kv, f"r{i}", prompt, "alice")
    kv.pool.reset_prefix_cache()  # the blocks are gone; only the salt memory is left
    assert miss_cause(kv, prompt, "alice") == "no_match" and miss_cause(kv, prompt, "bob") == "different_salt"


def test_many_first_blocks_are_capped_oldest_first(monkeypatch):
    monkeypatch.setattr(BlockPool, "EVICTED_MEMORY", 16)
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    for i in range(100):
        cache_prompt(kv, f"r{i}", [i] * 9, "alice")
    assert len(kv._first_block_salts) == 16
    assert miss_cause(kv, [99] * 9, "bob") == "different_salt" and miss_cause(kv, [0] * 9, "bob") == "no_match"
