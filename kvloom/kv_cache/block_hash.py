"""Chained SHA-256 hashes of full KV blocks, for prefix caching.

A block's hash covers its parent's hash, its token ids and the request's salt
(through the chain's root), so equal hashes mean equal prefixes and requests
with different ``cache_salt`` never share blocks.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Sequence


def root_hash(engine_salt: bytes, cache_salt: str | None) -> bytes:
    """The parent hash of a request's first block."""
    digest = hashlib.sha256(b"kvloom-prefix-root")
    digest.update(engine_salt)
    if cache_salt is not None:
        digest.update(b"\x00salt\x00" + cache_salt.encode())
    return digest.digest()


def hash_block(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


def extend_block_hashes(block_hashes: list[bytes], token_ids: Sequence[int], block_size: int,
                        root: bytes) -> None:
    """Append hashes for every block of ``token_ids`` that became full."""
    num_full_blocks = len(token_ids) // block_size
    parent = block_hashes[-1] if block_hashes else root
    for index in range(len(block_hashes), num_full_blocks):
        start = index * block_size
        parent = hash_block(parent, token_ids[start:start + block_size])
        block_hashes.append(parent)
