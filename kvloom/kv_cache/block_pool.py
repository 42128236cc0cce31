"""The pool of physical KV blocks: reference counts, the prefix cache and LRU eviction."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class KVBlock:
    """One physical block of the KV cache."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


class BlockPool:
    """Owns every block.

    A block is *free* when no request references it. Free blocks that still
    hold a cached prefix stay findable by hash until they are reused; the free
    queue is kept in eviction order (least recently freed first), so the
    coldest cached block is the one overwritten.
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict(
            (block.block_id, block) for block in self.blocks)
        self.hash_to_block: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        """Fraction of blocks referenced by requests."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self.hash_to_block.get(block_hash)

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Take ``num_blocks`` free blocks, evicting their cached contents."""
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"asked for {num_blocks} blocks with {self.num_free_blocks} free")
        taken = []
        for _ in range(num_blocks):
            _, block = self.free_queue.popitem(last=False)
            self._forget_hash(block)
            block.ref_count = 1
            taken.append(block)
        return taken

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on cached blocks found by a prefix hit."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def release(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each block, in the order given.

        Callers pass a request's blocks last-first, so a sequence's tail is
        evicted before the prefix other requests are likelier to share.
        """
        for block in blocks:
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block.block_id} released more often than taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        """Make a full block findable by its hash (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.hash_to_block:
            return  # an identical block is already cached; this one stays private
        block.block_hash = block_hash
        self.hash_to_block[block_hash] = block

    def uncache_block(self, block: KVBlock) -> None:
        """Forget a block's hash (its contents were never computed)."""
        self._forget_hash(block)

    def _forget_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.hash_to_block.get(block.block_hash) is block:
                del self.hash_to_block[block.block_hash]
            block.block_hash = None
