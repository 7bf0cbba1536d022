"""Paged KV cache of one replica: fixed-size blocks, per-request tables, shared prefixes.

A request holds ``ceil(tokens / block_size)`` blocks for the tokens whose K and V are in the
cache (vLLM's PagedAttention). Requests of one shared-prefix group reuse the prefix's full
blocks once one of them has computed it: those blocks belong to the group (reference
counted); a group nobody uses stays cached until its blocks are needed (least recently used
goes first).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class _Prefix:
    blocks: int
    users: int = 0
    ready: bool = False


class BlockManager:
    def __init__(self, total_blocks: int, block_size: int, requests: int):
        if total_blocks < 1:
            raise ValueError("a replica needs at least one KV block")
        self.total = int(total_blocks)
        self.block_size = int(block_size)
        self.free = self.total
        self.held = np.zeros(requests, dtype=np.int64)  # request -> its own blocks here
        self.prefixes: OrderedDict[int, _Prefix] = OrderedDict()  # group -> shared blocks (LRU order)

    @property
    def used(self) -> int:
        return self.total - self.free

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def needed(self, tokens: np.ndarray, shared: np.ndarray | int = 0) -> np.ndarray:
        """Own blocks for ``tokens`` cached tokens, ``shared`` of them in a group's prefix
        (elementwise over arrays)."""
        return -(-np.maximum(tokens - shared, 0) // self.block_size)

    def growth(self, held: np.ndarray | int, tokens: np.ndarray, shared: np.ndarray | int = 0) -> np.ndarray:
        """Blocks beyond ``held`` that ``tokens`` cached tokens need (elementwise)."""
        return np.maximum(self.needed(tokens, shared) - held, 0)

    def _reclaim(self, needed: int) -> bool:
        """Evict unused cached prefixes (oldest first) until ``needed`` blocks are free."""
        if self.free >= needed:
            return True
        for group in list(self.prefixes):
            entry = self.prefixes[group]
            if entry.users == 0:
                del self.prefixes[group]
                self.free += entry.blocks
                if self.free >= needed:
                    return True
        return self.free >= needed

    def can_reserve(self, blocks: int) -> bool:
        """Whether ``blocks`` more can be taken (evicting unused cached prefixes if need be)."""
        return blocks <= 0 or self._reclaim(blocks)

    def can_grow(self, request: int, tokens: int, shared: int = 0, reserve: int = 0) -> bool:
        """Whether ``request`` can hold ``tokens`` cached tokens (``shared`` of them in a group's
        prefix blocks) leaving ``reserve`` blocks free."""
        extra = self.blocks_for(max(0, tokens - shared)) - int(self.held[request])
        return extra <= 0 or self._reclaim(extra + reserve)

    def grow(self, request: int, tokens: int, shared: int = 0) -> None:
        extra = self.blocks_for(max(0, tokens - shared)) - int(self.held[request])
        if extra > 0:
            if not self._reclaim(extra):
                raise RuntimeError("KV blocks exhausted (callers check can_grow first)")
            self.free -= extra
            self.held[request] += extra

    def grow_all(self, requests: np.ndarray, tokens: np.ndarray, shared: np.ndarray) -> bool:
        """Grow every request at once if the blocks suffice (the common decode step); False,
        changing nothing, if they do not."""
        extra = self.growth(self.held[requests], tokens, shared)
        total = int(extra.sum())
        if total and not self._reclaim(total):
            return False
        self.free -= total
        self.held[requests] += extra
        return True

    def fit_all(self, requests: np.ndarray, tokens: np.ndarray, shared: np.ndarray) -> None:
        """Give back blocks held beyond what ``tokens`` cached tokens need (a run cut short)."""
        surplus = np.maximum(self.held[requests] - self.needed(tokens, shared), 0)
        self.held[requests] -= surplus
        self.free += int(surplus.sum())

    def fit(self, request: int, tokens: int, shared: int = 0) -> None:
        """``fit_all`` for one request."""
        surplus = int(self.held[request]) - self.blocks_for(max(0, tokens - shared))
        if surplus > 0:
            self.held[request] -= surplus
            self.free += surplus

    def release(self, request: int) -> int:
        blocks = int(self.held[request])
        self.held[request] = 0
        self.free += blocks
        return blocks

    # --- shared prefixes -----------------------------------------------------------------

    def prefix_hit(self, group: int) -> bool:
        entry = self.prefixes.get(group)
        return entry is not None and entry.ready

    def use_prefix(self, group: int, prefix_tokens: int) -> int:
        """Join ``group``'s prefix: returns the tokens the cache already holds for the request
        (0 while the prefix is being computed for the first time; blocks reserved then)."""
        entry = self.prefixes.get(group)
        full = prefix_tokens // self.block_size
        if entry is None:
            if full == 0 or not self._reclaim(full):
                return 0
            self.free -= full
            entry = _Prefix(full)
            self.prefixes[group] = entry
        self.prefixes.move_to_end(group)
        entry.users += 1
        return entry.blocks * self.block_size if entry.ready else 0

    def prefix_computed(self, group: int) -> None:
        entry = self.prefixes.get(group)
        if entry is not None:
            entry.ready = True

    def leave_prefix(self, group: int) -> None:
        entry = self.prefixes.get(group)
        if entry is not None:
            entry.users = max(0, entry.users - 1)

    def shared_tokens(self, group: int) -> int:
        entry = self.prefixes.get(group)
        return entry.blocks * self.block_size if entry is not None else 0
