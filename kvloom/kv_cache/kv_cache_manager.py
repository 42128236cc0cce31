"""Per-request block tables on top of the block pool, with prefix caching.

The scheduler only asks questions (is there a prefix hit? can these tokens get
slots?) and receives opaque answers: a PrefixHit it can read a token count from
and hand back, and block ids for the runner. The pool and its blocks never leave
this package, so the pool can change (e.g. per-layer-group pools) without the
scheduler noticing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvloom.kv_cache.block_hash import extend_block_hashes, root_hash
from kvloom.kv_cache.block_pool import BlockPool, KVBlock
from kvloom.request import Request


class PrefixHit:
    """Cached blocks that cover a waiting request's leading tokens.

    Opaque outside kv_cache/: callers read ``num_tokens`` (and ``block_ids``, for
    logs and tests) and pass the hit back to ``allocate_slots``.
    """

    __slots__ = ("_blocks", "num_tokens")

    def __init__(self, blocks: list[KVBlock] | None = None, block_size: int = 0) -> None:
        self._blocks = blocks or []
        self.num_tokens = len(self._blocks) * block_size

    @property
    def block_ids(self) -> list[int]:
        return [block.block_id for block in self._blocks]


@dataclass(slots=True)
class PrefixCacheStats:
    """Token counts since the engine started."""

    num_queried_tokens: int = 0
    num_hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0


class KVCacheManager:
    """Allocates KV slots for requests and shares cached prefixes between them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 engine_salt: bytes | None = None) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        # Salting per engine keeps hashes from one engine meaningless to another.
        self.engine_salt = engine_salt if engine_salt is not None else os.urandom(16)
        self.request_to_blocks: dict[str, list[KVBlock]] = {}
        # The same tables as ids, kept in step with request_to_blocks; handed out
        # as-is each step, so callers must treat them as read-only.
        self.request_to_block_ids: dict[str, list[int]] = {}
        self.request_to_num_cached_blocks: dict[str, int] = {}
        self.prefix_stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def usage(self) -> float:
        return self.pool.usage()

    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def find_prefix_hit(self, request: Request) -> PrefixHit:
        """The longest cached prefix of a request that has computed nothing yet.

        At least the last token is left to compute: its logits are needed.
        """
        if not self.enable_prefix_caching:
            return PrefixHit()
        self._update_block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        blocks = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            blocks.append(block)
        return PrefixHit(blocks, self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       prefix_hit: PrefixHit | None = None,
                       num_lookahead_tokens: int = 0) -> list[int] | None:
        """Reserve slots for ``num_new_tokens`` more tokens of ``request``, plus
        ``num_lookahead_tokens`` slots after them (a model-based drafter writes
        its own KV there).

        Returns the request's whole block table, or None (changing nothing)
        when there are not enough free blocks.
        """
        block_ids = self.request_to_block_ids.get(request.request_id)
        if prefix_hit is None and block_ids is not None:
            # The common decode step: the new tokens fit in the request's blocks.
            num_total_tokens = request.num_computed_tokens + num_new_tokens
            if num_total_tokens + num_lookahead_tokens <= len(block_ids) * self.block_size:
                if (self.enable_prefix_caching and num_total_tokens // self.block_size
                        > self.request_to_num_cached_blocks.get(request.request_id, 0)):
                    self._cache_full_blocks(request, self.request_to_blocks[request.request_id],
                                            num_total_tokens)
                return block_ids
        blocks = self.request_to_blocks.get(request.request_id, [])
        hit = prefix_hit or PrefixHit()
        hit_blocks = hit._blocks  # this module's own type: its blocks are ours to read
        num_total_tokens = request.num_computed_tokens + hit.num_tokens + num_new_tokens
        num_slots = num_total_tokens + num_lookahead_tokens
        num_blocks_needed = -(-num_slots // self.block_size) - len(blocks) - len(hit_blocks)
        num_hit_blocks_now_free = sum(1 for block in hit_blocks if block.ref_count == 0)
        if max(num_blocks_needed, 0) + num_hit_blocks_now_free > self.pool.num_free_blocks:
            return None

        self.request_to_blocks[request.request_id] = blocks
        self.pool.touch(hit_blocks)
        blocks.extend(hit_blocks)
        if num_blocks_needed > 0:
            blocks.extend(self.pool.allocate(num_blocks_needed))
        if prefix_hit is not None:
            self.prefix_stats.num_queried_tokens += request.num_tokens
            self.prefix_stats.num_hit_tokens += hit.num_tokens
        self._cache_full_blocks(request, blocks, num_total_tokens)
        block_ids = [block.block_id for block in blocks]
        self.request_to_block_ids[request.request_id] = block_ids
        return block_ids

    def free(self, request: Request) -> None:
        """Return a finished, aborted or preempted request's blocks to the pool."""
        blocks = self.request_to_blocks.pop(request.request_id, [])
        self.request_to_block_ids.pop(request.request_id, None)
        self.request_to_num_cached_blocks.pop(request.request_id, None)
        # Blocks cached when scheduled but never computed (the request was
        # preempted in the same step) must not be found by later requests.
        first_uncomputed = request.num_computed_tokens // self.block_size
        for block in blocks[first_uncomputed:]:
            if block.ref_count == 1:
                self.pool.uncache_block(block)
        self.pool.release(blocks[::-1])

    def num_cached_blocks(self) -> int:
        """Blocks a later request could find by prefix hash."""
        return len(self.pool.hash_to_block)

    def consistency_problems(self) -> list[str]:
        """What is wrong with the books, if anything (empty when consistent): each
        block's reference count equals the block tables holding it, exactly the
        unreferenced blocks are free, and each cached hash names its block."""
        references = {block.block_id: 0 for block in self.pool.blocks}
        for blocks in self.request_to_blocks.values():
            for block in blocks:
                references[block.block_id] += 1
        problems = [f"block {block.block_id} has ref_count {block.ref_count} but "
                    f"{references[block.block_id]} block tables hold it"
                    for block in self.pool.blocks if block.ref_count != references[block.block_id]]
        unreferenced = {block_id for block_id, count in references.items() if count == 0}
        if set(self.pool.free_queue) != unreferenced:
            problems.append(f"free blocks {sorted(self.pool.free_queue)} are not the "
                            f"unreferenced blocks {sorted(unreferenced)}")
        problems += [f"hash {block_hash.hex()[:12]} names block {block.block_id}, whose hash "
                     "differs" for block_hash, block in self.pool.hash_to_block.items()
                     if block.block_hash != block_hash]
        for request_id, blocks in self.request_to_blocks.items():
            if self.request_to_block_ids.get(request_id) != [b.block_id for b in blocks]:
                problems.append(f"request {request_id}'s block ids differ from its blocks")
        return problems

    def reset(self) -> None:
        """Every block free and no prefix cached, whatever requests held (after a failed
        step, whose blocks may hold KV that was never written)."""
        self.pool = BlockPool(self.pool.num_blocks, self.enable_prefix_caching)
        self.request_to_blocks.clear()
        self.request_to_block_ids.clear()
        self.request_to_num_cached_blocks.clear()

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock],
                           num_total_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        self._update_block_hashes(request)
        num_full = min(len(request.block_hashes), num_total_tokens // self.block_size)
        start = self.request_to_num_cached_blocks.get(request.request_id, 0)
        for index in range(start, num_full):
            self.pool.cache_block(blocks[index], request.block_hashes[index])
        self.request_to_num_cached_blocks[request.request_id] = max(start, num_full)

    def _update_block_hashes(self, request: Request) -> None:
        if request.num_tokens // self.block_size > len(request.block_hashes):
            extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size,
                                root_hash(self.engine_salt, request.cache_salt))
