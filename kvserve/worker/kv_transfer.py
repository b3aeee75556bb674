"""Worker-side KV operations (architecture rule 4): the scheduler lists them in SchedulerOutput.kv_ops, in order,
and the runner applies them here before the forward pass. The scheduler never touches tensors; this never decides."""

from __future__ import annotations

from kvserve.core.outputs import KVLoad, KVSave
from kvserve.worker.kv_cache import KVCache


class KVTransfer:
    """Moves KV between the pool and the tiered KV store (kvserve.kvstore.KVStore)."""

    def __init__(self, kv_cache: KVCache, store):
        self.kv_cache = kv_cache
        self.store = store

    def apply(self, ops: list[KVLoad | KVSave]) -> None:
        """In list order: a save reads blocks that a later load in the same list may overwrite."""
        for op in ops:
            if isinstance(op, KVSave):
                # copied out now, before this step's forward pass can write into the freed blocks
                self.store.save([(h, self.kv_cache.read_blocks(ids)) for h, ids in op.chunks])
            else:
                bs = self.kv_cache.block_size
                for dst, kv in op.fetched.pieces(op.src_offset, op.num_tokens):  # block-aligned: chunks are
                    self.kv_cache.write_blocks(op.block_ids[dst // bs:(dst + kv.shape[2]) // bs], kv)


class NullKVTransfer:
    """No KV store: the scheduler emits no operations; anything else is a bug worth a loud error."""

    def apply(self, ops: list[KVLoad | KVSave]) -> None:
        if ops:
            raise RuntimeError(f"KV operations {[type(op).__name__ for op in ops]} without a KV store")
