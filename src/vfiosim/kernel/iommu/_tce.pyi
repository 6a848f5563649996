"""TceStorage's one-entry operations (_tce.c)."""

import numpy as np

CHUNK_SHIFT: int
POOL_MAX: int
POOL: list[np.ndarray]

class SparseU64:
    size: int
    generation: int
    _chunks: dict[int, np.ndarray]
    _used: dict[int, int]
    def __init__(self, size: int) -> None: ...
    def get(self, index: int) -> int: ...
    def xchg_one(self, index: int, new: int) -> int: ...
    def clear_one(self, index: int) -> int: ...
