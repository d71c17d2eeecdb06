"""KV block accounting: a pool of fixed-size blocks, ref-counted, with full-block prefix caching.

    BlockPool     blocks 0..N-1; a free queue in LRU order; hash -> block for cached full blocks
    BlockManager  what the scheduler asks: prefix hits for a request, room for its next tokens, release

A block holds ``block_size`` consecutive tokens of one sequence. A full block whose KV has been
computed is registered under ``hash(parent_hash, its tokens)``, so any later sequence with the same
prefix can share it (ref count > 1) instead of recomputing it. Freed blocks keep their KV and hash
and join the end of the free queue; allocation takes from the front, evicting (un-hashing) the least
recently freed. A sequence frees its blocks tail first, so its prefix is the last to be evicted.
Only the pool's numbers live here: the tensors are in ``kv_cache.PagedKVCache``.
"""

from __future__ import annotations

from collections import OrderedDict

from .request import Request


class KVBlock:
    __slots__ = ("block_hash", "block_id", "ref_cnt")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Blocks with ref_cnt 0, least recently freed first. Cached ones stay until evicted.
        self.free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, KVBlock] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[KVBlock]:
        """``n`` blocks off the front of the free queue (caller checked ``num_free``)."""
        out = []
        for _ in range(n):
            _, block = self.free.popitem(last=False)
            if block.block_hash is not None:  # evict: its KV is about to be overwritten
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on prefix-cache hits (pulling free ones out of the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: list[KVBlock]) -> None:
        """Drop one reference each, in the given order (callers pass tail first)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free[block.block_id] = block

    def reset_cache(self) -> int:
        """Forget every cached prefix (blocks keep their owners and contents); returns how many."""
        for block in self.cached.values():
            block.block_hash = None
        n = len(self.cached)
        self.cached.clear()
        return n

    def lookup(self, block_hash: int) -> KVBlock | None:
        return self.cached.get(block_hash)

    def register(self, block: KVBlock, block_hash: int) -> None:
        """Make a computed full block findable. A second copy of an already cached prefix (two
        sequences computed it in the same step) stays private and is simply freed later."""
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block


class BlockManager:
    """The scheduler's view of KV memory, in blocks.

    ``reserve_blocks`` is a watermark kept free when admitting new requests (not when growing running
    ones), so admissions do not immediately force the preemption of running decodes.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 reserve_blocks: int | None = None):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.reserve_blocks = max(1, num_blocks // 100) if reserve_blocks is None else reserve_blocks
        self.prefix_hit_tokens = 0
        self.prefix_queried_tokens = 0

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def get_computed_blocks(self, request: Request) -> list[KVBlock]:
        """The longest run of cached full blocks that prefixes ``request.token_ids``.

        At least one token is always left to compute: its logits give the next token. Requests that
        still need prompt logprobs get no hits (every prompt position must run through the model).
        """
        if not self.enable_prefix_caching or request.needs_prompt_logprobs:
            return []
        bs = self.block_size
        hits: list[KVBlock] = []
        for i in range((request.num_tokens - 1) // bs):
            block = self.pool.lookup(request.block_hash(i, bs))
            if block is None:
                break
            hits.append(block)
        return hits

    def blocks_needed(self, request: Request, num_new_tokens: int, num_hit_blocks: int = 0) -> int:
        bs = self.block_size
        total = request.num_computed_tokens + num_hit_blocks * bs + num_new_tokens
        return max(0, -(-total // bs) - len(request.blocks) - num_hit_blocks)

    def allocate_slots(self, request: Request, num_new_tokens: int, hits: list[KVBlock] | None = None,
                       admit: bool = False) -> bool:
        """Give ``request`` room for ``num_new_tokens`` more tokens (after ``hits``, for a request being
        admitted). All or nothing: returns False, changing nothing, when the pool is short."""
        hits = hits or []
        need = self.blocks_needed(request, num_new_tokens, len(hits))
        # Hits sitting in the free queue stop being free once taken.
        available = self.pool.num_free - sum(1 for b in hits if b.ref_cnt == 0)
        if admit:
            available -= self.reserve_blocks
        if need > available:
            return False
        if hits:
            self.pool.touch(hits)
            request.blocks.extend(hits)
            request.block_ids.extend(b.block_id for b in hits)
            request.num_cached_blocks = len(request.blocks)
        if need:
            new = self.pool.allocate(need)
            request.blocks.extend(new)
            request.block_ids.extend(b.block_id for b in new)
        return True

    def count_admission(self, request: Request, num_hit_tokens: int) -> None:
        self.prefix_queried_tokens += request.num_tokens
        self.prefix_hit_tokens += num_hit_tokens

    def cache_computed_blocks(self, request: Request) -> None:
        """After a step: register the request's newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = request.num_computed_tokens // bs
        for i in range(request.num_cached_blocks, num_full):
            self.pool.register(request.blocks[i], request.block_hash(i, bs))
        request.num_cached_blocks = max(request.num_cached_blocks, num_full)

    def reset_prefix_cache(self, running: list[Request]) -> int:
        """Drop all cached prefixes, e.g. after the model's weights changed (their KV is stale).
        Running requests keep their blocks but stop sharing them with newcomers."""
        for req in running:
            req.num_cached_blocks = len(req.blocks)  # never re-register blocks computed before the reset
        return self.pool.reset_cache()

    def free(self, request: Request) -> None:
        """Release all of ``request``'s blocks (tail first, so its prefix is evicted last)."""
        self.pool.release(reversed(request.blocks))
        request.blocks = []
        request.block_ids = []
        request.num_cached_blocks = 0
