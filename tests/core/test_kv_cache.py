"""BlockPool, chained block hashes and KVCacheManager (prefix caching), without a model.

The tests stand in for the scheduler and the model runner: they create
``Request`` objects, ask the manager for hits and slots, and mark tokens as
computed by advancing ``num_computed_tokens`` themselves.
"""

from __future__ import annotations

import copy

import pytest

from kvloom.kv_cache.block_hash import extend_block_hashes, hash_block, root_hash
from kvloom.kv_cache.block_pool import BlockPool
from kvloom.kv_cache.kv_cache_manager import KVCacheManager, PrefixHit
from kvloom.sampling_params import SamplingParams
from kvloom.request import Request

BLOCK_SIZE = 4
ENGINE_SALT = b"engine-salt-for-tests"


def make_request(request_id: str, prompt: list[int], cache_salt: str | None = None) -> Request:
    return Request(request_id, list(prompt), SamplingParams(max_tokens=16), frozenset({2}), 16,
                   cache_salt=cache_salt)


def tokens(num: int, start: int = 100) -> list[int]:
    return list(range(start, start + num))


def make_manager(num_blocks: int = 16, caching: bool = True,
                 engine_salt: bytes = ENGINE_SALT) -> KVCacheManager:
    return KVCacheManager(num_blocks, BLOCK_SIZE, caching, engine_salt=engine_salt)


def compute(manager: KVCacheManager, request: Request, num_new: int,
            hit: PrefixHit | None = None) -> list[int]:
    """Schedule ``num_new`` tokens of ``request`` and mark them computed, as one step does."""
    if hit is not None:
        request.num_computed_tokens = 0
    block_ids = manager.allocate_slots(request, num_new, hit)
    assert block_ids is not None
    if hit is not None:
        request.num_computed_tokens = hit.num_tokens
    request.num_computed_tokens += num_new
    return block_ids


def admit(manager: KVCacheManager, request: Request) -> list[int]:
    """Admit a waiting request the way the scheduler does: prefix hit, then the rest."""
    hit = manager.find_prefix_hit(request)
    return compute(manager, request, request.num_tokens - hit.num_tokens, hit)


def assert_pool_consistent(manager: KVCacheManager) -> None:
    """Ref counts equal the block tables' references; free queue holds exactly the unreferenced."""
    assert manager.consistency_problems() == []


def assert_all_free(manager: KVCacheManager) -> None:
    assert manager.num_free_blocks() == manager.num_blocks
    assert manager.usage() == 0.0
    assert all(block.ref_count == 0 for block in manager.pool.blocks)
    assert manager.request_to_blocks == {}
    assert_pool_consistent(manager)


def snapshot(manager: KVCacheManager):
    pool = manager.pool
    return (
        list(pool.free_queue),
        [(b.block_id, b.ref_count, b.block_hash) for b in pool.blocks],
        {h: b.block_id for h, b in pool.hash_to_block.items()},
        {rid: [b.block_id for b in blocks] for rid, blocks in manager.request_to_blocks.items()},
        dict(manager.request_to_num_cached_blocks),
        (manager.prefix_stats.num_queried_tokens, manager.prefix_stats.num_hit_tokens),
    )


# ---------------------------------------------------------------------- BlockPool
def test_pool_ref_counts_allocation_release_and_usage():
    pool = BlockPool(4, enable_caching=True)
    assert pool.num_free_blocks == 4 and pool.usage() == 0.0

    blocks = pool.allocate(3)
    assert [b.ref_count for b in blocks] == [1, 1, 1]
    assert len({b.block_id for b in blocks}) == 3
    assert pool.num_free_blocks == 1
    assert pool.usage() == pytest.approx(0.75)

    pool.touch(blocks[:1])  # a second request shares the first block
    assert blocks[0].ref_count == 2
    pool.release(blocks)
    assert [b.ref_count for b in blocks] == [1, 0, 0]
    assert pool.num_free_blocks == 3  # a block stays taken while anyone holds it
    assert pool.usage() == pytest.approx(0.25)
    pool.release(blocks[:1])
    assert pool.num_free_blocks == 4 and pool.usage() == 0.0


def test_pool_refuses_to_allocate_more_than_free():
    pool = BlockPool(2, enable_caching=False)
    pool.allocate(1)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1


def test_pool_needs_a_block():
    with pytest.raises(ValueError):
        BlockPool(0, enable_caching=True)


def test_block_released_more_often_than_taken_raises():
    pool = BlockPool(2, enable_caching=True)
    (block,) = pool.allocate(1)
    pool.release([block])
    with pytest.raises(RuntimeError, match="released more often than taken"):
        pool.release([block])
    assert block.ref_count == 0
    assert pool.num_free_blocks == 2


def test_free_cached_blocks_evicted_least_recently_freed_first():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.allocate(4)
    for block in blocks:
        pool.cache_block(block, bytes([block.block_id]) * 32)
    order = [blocks[2], blocks[0], blocks[3], blocks[1]]
    for block in order:
        pool.release([block])
    assert list(pool.free_queue) == [b.block_id for b in order]
    assert all(pool.lookup(bytes([i]) * 32) is not None for i in range(4))

    (first,) = pool.allocate(1)
    assert first is blocks[2]
    assert pool.lookup(bytes([2]) * 32) is None  # reusing a block evicts its cached contents
    assert first.block_hash is None
    assert pool.lookup(bytes([0]) * 32) is blocks[0]

    # A hit on a free cached block takes it out of the eviction order.
    pool.touch([blocks[0]])
    assert blocks[0].ref_count == 1
    assert pool.allocate(2) == [blocks[3], blocks[1]]
    assert pool.num_free_blocks == 0


def test_cache_block_first_writer_wins_and_disabled_pool_caches_nothing():
    pool = BlockPool(3, enable_caching=True)
    a, b, c = pool.allocate(3)
    pool.cache_block(a, b"h" * 32)
    pool.cache_block(b, b"h" * 32)
    assert pool.lookup(b"h" * 32) is a
    assert b.block_hash is None
    pool.uncache_block(b)  # a private block's uncaching must not drop the shared entry
    assert pool.lookup(b"h" * 32) is a
    pool.uncache_block(a)
    assert pool.lookup(b"h" * 32) is None and a.block_hash is None

    disabled = BlockPool(1, enable_caching=False)
    (block,) = disabled.allocate(1)
    disabled.cache_block(block, b"h" * 32)
    assert disabled.lookup(b"h" * 32) is None


def test_manager_releases_a_requests_blocks_tail_first():
    manager = make_manager(num_blocks=4)
    request = make_request("a", tokens(13))  # 3 full blocks + 1 token
    block_ids = admit(manager, request)
    assert len(block_ids) == 4
    manager.free(request)
    assert list(manager.pool.free_queue) == block_ids[::-1]

    # An unrelated request takes the tail first; the shared-looking prefix survives.
    other = make_request("b", tokens(5, start=500))
    other_blocks = admit(manager, other)
    assert other_blocks == [block_ids[3], block_ids[2]]
    again = make_request("c", tokens(9))
    hit = manager.find_prefix_hit(again)
    assert hit.block_ids == block_ids[:2]
    manager.free(other)
    assert_all_free(manager)


# ---------------------------------------------------------------------- hashes
def hashes_of(token_ids: list[int], cache_salt: str | None = None,
              engine_salt: bytes = ENGINE_SALT) -> list[bytes]:
    result: list[bytes] = []
    extend_block_hashes(result, token_ids, BLOCK_SIZE, root_hash(engine_salt, cache_salt))
    return result


def test_same_prefix_gives_same_hashes_and_only_full_blocks_are_hashed():
    first = hashes_of(tokens(8) + [1, 2, 3, 4, 5])
    second = hashes_of(tokens(8) + [9, 9, 9, 9])
    assert len(first) == 3 and len(second) == 3  # the trailing partial block has no hash
    assert first[:2] == second[:2]
    assert first[2] != second[2]
    assert len(set(first)) == 3


def test_incremental_hashing_matches_hashing_at_once():
    token_ids = tokens(18)
    root = root_hash(ENGINE_SALT, None)
    incremental: list[bytes] = []
    for end in range(1, len(token_ids) + 1):
        extend_block_hashes(incremental, token_ids[:end], BLOCK_SIZE, root)
    assert incremental == hashes_of(token_ids)
    assert incremental[0] == hash_block(root, token_ids[:4])
    assert incremental[1] == hash_block(incremental[0], token_ids[4:8])


def test_cache_salt_and_engine_salt_separate_hashes():
    token_ids = tokens(8)
    plain = hashes_of(token_ids)
    salted_a = hashes_of(token_ids, cache_salt="a")
    salted_b = hashes_of(token_ids, cache_salt="b")
    other_engine = hashes_of(token_ids, engine_salt=b"another engine")
    assert hashes_of(token_ids, cache_salt="a") == salted_a
    for variant in (salted_a, salted_b, other_engine):
        assert all(x != y for x, y in zip(plain, variant))
    assert all(x != y for x, y in zip(salted_a, salted_b))
    assert hashes_of(token_ids, cache_salt="") != plain  # an empty salt is still a salt


def test_change_in_early_block_changes_every_later_hash():
    base = tokens(16)
    changed = list(base)
    changed[1] += 1000
    assert all(x != y for x, y in zip(hashes_of(base), hashes_of(changed)))
    changed_late = list(base)
    changed_late[9] += 1000
    late = hashes_of(changed_late)
    assert late[:2] == hashes_of(base)[:2]
    assert all(x != y for x, y in zip(late[2:], hashes_of(base)[2:]))


def test_manager_does_not_share_blocks_across_salts():
    manager = make_manager()
    first = make_request("a", tokens(9), cache_salt="alice")
    admit(manager, first)
    assert manager.find_prefix_hit(make_request("b", tokens(9), cache_salt="bob")).num_tokens == 0
    assert manager.find_prefix_hit(make_request("c", tokens(9))).num_tokens == 0
    assert manager.find_prefix_hit(make_request("d", tokens(9), cache_salt="alice")).num_tokens == 8
    manager.free(first)
    assert_all_free(manager)

    # Two engines hash the same request differently.
    other_engine = make_manager(engine_salt=b"another engine")
    same = make_request("e", tokens(9), cache_salt="alice")
    other_engine.find_prefix_hit(same)
    assert len(same.block_hashes) == 2
    assert all(x != y for x, y in zip(same.block_hashes, first.block_hashes))


# ---------------------------------------------------------------------- prefix hits
def test_prefix_hit_is_longest_cached_prefix_and_leaves_a_token_to_compute():
    manager = make_manager()
    owner = make_request("owner", tokens(12))  # exactly 3 full blocks
    owner_blocks = admit(manager, owner)
    assert len(owner_blocks) == 3

    diverging = make_request("b", tokens(8) + [7, 7, 7, 7, 7])
    hit = manager.find_prefix_hit(diverging)
    assert hit.num_tokens == 8 and hit.block_ids == owner_blocks[:2]

    # The whole prompt is cached, yet the last token must still run for its logits.
    same = make_request("c", tokens(12))
    hit = manager.find_prefix_hit(same)
    assert hit.num_tokens == 8 and len(hit.block_ids) == 2

    longer = make_request("d", tokens(13))
    hit = manager.find_prefix_hit(longer)
    assert hit.num_tokens == 12 and hit.block_ids == owner_blocks

    tiny = make_request("e", tokens(4))
    assert manager.find_prefix_hit(tiny).num_tokens == 0

    assert manager.find_prefix_hit(make_request("f", [999] + tokens(11))).num_tokens == 0
    manager.free(owner)
    assert_all_free(manager)


def test_prefix_hit_stops_at_the_first_missing_block():
    manager = make_manager()
    owner = make_request("owner", tokens(13))
    owner_blocks = admit(manager, owner)
    manager.pool.uncache_block(manager.request_to_blocks["owner"][1])
    # Blocks 0 and 2 are still cached, but a hit must be a contiguous prefix.
    hit = manager.find_prefix_hit(make_request("b", tokens(13)))
    assert hit.block_ids == owner_blocks[:1] and hit.num_tokens == 4
    manager.free(owner)
    assert_all_free(manager)


def test_prefix_hit_survives_free_until_evicted():
    manager = make_manager(num_blocks=3)
    owner = make_request("owner", tokens(9))
    admit(manager, owner)
    manager.free(owner)
    assert manager.find_prefix_hit(make_request("b", tokens(9))).num_tokens == 8

    evictor = make_request("evict", tokens(12, start=500))
    admit(manager, evictor)  # needs all three blocks, so every cached one is overwritten
    assert manager.find_prefix_hit(make_request("c", tokens(9))).num_tokens == 0
    manager.free(evictor)
    assert_all_free(manager)


def test_prefix_hit_shares_blocks_and_counts_stats():
    manager = make_manager()
    owner = make_request("owner", tokens(10))
    owner_blocks = admit(manager, owner)
    assert (manager.prefix_stats.num_queried_tokens, manager.prefix_stats.num_hit_tokens) == (10, 0)

    reader = make_request("reader", tokens(8) + [5, 6, 7])
    hit = manager.find_prefix_hit(reader)
    free_before = manager.num_free_blocks()
    reader_blocks = compute(manager, reader, reader.num_tokens - hit.num_tokens, hit)
    assert reader_blocks[:2] == owner_blocks[:2]
    assert reader_blocks[2] not in owner_blocks
    assert manager.num_free_blocks() == free_before - 1
    assert [b.ref_count for b in manager.pool.blocks if b.block_id in owner_blocks[:2]] == [2, 2]
    assert reader.num_computed_tokens == 11
    stats = manager.prefix_stats
    assert (stats.num_queried_tokens, stats.num_hit_tokens) == (21, 8)
    assert stats.hit_rate == pytest.approx(8 / 21)
    assert_pool_consistent(manager)

    # A running request's own growth is not a prefix query.
    reader.append_output_token(7)
    compute(manager, reader, 1)
    assert (stats.num_queried_tokens, stats.num_hit_tokens) == (21, 8)

    manager.free(owner)
    assert [b.ref_count for b in manager.pool.blocks if b.block_id in owner_blocks[:2]] == [1, 1]
    manager.free(reader)
    assert_all_free(manager)


def test_no_hits_when_prefix_caching_is_off():
    manager = make_manager(caching=False)
    owner = make_request("owner", tokens(9))
    admit(manager, owner)
    assert manager.find_prefix_hit(make_request("b", tokens(9))).num_tokens == 0
    assert manager.pool.hash_to_block == {}
    manager.free(owner)
    assert_all_free(manager)


# ---------------------------------------------------------------------- allocate_slots
def test_allocate_slots_grows_block_table_one_block_at_a_time():
    manager = make_manager(num_blocks=8)
    request = make_request("a", tokens(7))
    table = admit(manager, request)
    assert len(table) == 2
    request.append_output_token(7)
    assert compute(manager, request, 1) == table  # position 7 still fits block 1
    request.append_output_token(7)
    grown = compute(manager, request, 1)
    assert grown[:2] == table and len(grown) == 3
    assert manager.usage() == pytest.approx(3 / 8)
    manager.free(request)
    assert_all_free(manager)


def test_allocate_slots_returns_none_without_side_effects_when_short():
    manager = make_manager(num_blocks=4)
    holder = make_request("holder", tokens(9, start=500))
    admit(manager, holder)  # 3 of 4 blocks
    before = snapshot(manager)
    big = make_request("big", tokens(8))
    hit = manager.find_prefix_hit(big)
    assert manager.allocate_slots(big, 8, hit) is None
    assert snapshot(manager) == before

    small = make_request("small", tokens(3, start=900))
    admit(manager, small)  # the last block
    for _ in range(3):  # positions 9..11 still fit the holder's third block
        holder.append_output_token(7)
        compute(manager, holder, 1)
    holder.append_output_token(7)
    # A running request that cannot grow keeps its table as it was.
    before = snapshot(manager)
    assert manager.allocate_slots(holder, 1) is None
    assert snapshot(manager) == before
    manager.free(small)
    assert len(compute(manager, holder, 1)) == 4
    manager.free(holder)
    assert_all_free(manager)


def test_allocate_slots_counts_free_hit_blocks_against_the_free_pool():
    manager = make_manager(num_blocks=4)
    owner = make_request("owner", tokens(9))
    admit(manager, owner)
    manager.free(owner)  # two cached, free blocks
    holder = make_request("holder", tokens(3, start=500))
    admit(manager, holder)  # takes the uncached block; 3 free, 2 of them cached
    assert manager.num_free_blocks() == 3

    reader = make_request("reader", tokens(8) + tokens(5, start=700))  # 13 tokens: 4 blocks
    hit = manager.find_prefix_hit(reader)
    assert hit.num_tokens == 8 and all(manager.pool.blocks[i].ref_count == 0 for i in hit.block_ids)
    # Two new blocks would fit the three free ones, but the hit's two free blocks
    # are themselves taken from the free pool: 4 > 3.
    before = snapshot(manager)
    assert manager.allocate_slots(reader, 5, hit) is None
    assert snapshot(manager) == before
    assert manager.find_prefix_hit(reader).num_tokens == 8  # the cache survived the attempt

    manager.free(holder)
    assert compute(manager, reader, 5, manager.find_prefix_hit(reader))
    assert manager.num_free_blocks() == 0
    manager.free(reader)
    assert_all_free(manager)


def test_blocks_cached_but_never_computed_are_uncached_on_free():
    manager = make_manager()
    victim = make_request("victim", tokens(13))
    hit = manager.find_prefix_hit(victim)
    assert manager.allocate_slots(victim, 13, hit) is not None
    # Scheduled: the full blocks are findable at once (siblings in the same step share them) ...
    assert manager.find_prefix_hit(make_request("peek", tokens(13))).num_tokens == 12
    manager.free(victim)  # ... but preempted before the step ran: nothing was written.
    assert manager.find_prefix_hit(make_request("later", tokens(13))).num_tokens == 0
    assert manager.pool.hash_to_block == {}
    assert_all_free(manager)


def test_partly_computed_request_keeps_only_computed_blocks_cached():
    manager = make_manager()
    victim = make_request("victim", tokens(17))
    compute(manager, victim, 6, manager.find_prefix_hit(victim))  # chunk 1: block 0 computed
    assert victim.num_computed_tokens == 6
    assert manager.allocate_slots(victim, 10) is not None  # chunk 2 scheduled: blocks 1..3 cached
    assert manager.find_prefix_hit(make_request("peek", tokens(17))).num_tokens == 16
    manager.free(victim)  # preempted before chunk 2 ran
    hit = manager.find_prefix_hit(make_request("later", tokens(17)))
    assert hit.num_tokens == 4
    assert_all_free(manager)


def test_free_returns_every_block_after_mixed_sharing():
    manager = make_manager(num_blocks=16)
    requests = [make_request(f"r{i}", tokens(8) + tokens(3 + i, start=300 + 50 * i))
                for i in range(4)]
    for request in requests:
        admit(manager, request)
        assert_pool_consistent(manager)
    for _ in range(5):
        for request in requests:
            request.append_output_token(7)
            compute(manager, request, 1)
    assert_pool_consistent(manager)
    for request in requests[::-1]:
        manager.free(request)
        assert_pool_consistent(manager)
    manager.free(requests[0])  # freeing twice is harmless: the table is gone
    assert_all_free(manager)


def test_freeing_a_shared_block_too_often_raises():
    manager = make_manager()
    request = make_request("a", tokens(9))
    admit(manager, request)
    blocks = copy.copy(manager.request_to_blocks["a"])
    manager.free(request)
    with pytest.raises(RuntimeError, match="released more often than taken"):
        manager.pool.release(blocks[:1])
