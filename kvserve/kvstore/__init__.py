"""Tiered KV store below the engine's block pool: memory, disk and Redis tiers, CacheGen-style codecs, integrity."""

from kvserve.kvstore.config import CODECS, KVStoreConfig, TierSpec, parse_kv_store, parse_size
from kvserve.kvstore.store import FetchedKV, KVStore, model_fingerprint

__all__ = ["CODECS", "FetchedKV", "KVStore", "KVStoreConfig", "TierSpec", "model_fingerprint", "parse_kv_store",
           "parse_size"]
