"""Arithmetic progressions of 64-bit values, kept symbolic.

Mapping N consecutive pages produces N host physical addresses that differ
by the page size.  Materialising them as an array costs a pass over fresh
memory (page faults included) before the TCE table is even touched;
a :class:`Progression` lets the table write them straight into its own
storage, and becomes an array (``np.asarray``) only where one is needed.
"""

from __future__ import annotations

from typing import Union

import numpy as np

_RAMP_LEN = 1 << 14
_ramps: dict[int, np.ndarray] = {}


def _ramp(step: int) -> np.ndarray:
    """0, step, 2*step, ... (_RAMP_LEN values), cached per step."""
    r = _ramps.get(step)
    if r is None:
        r = np.arange(_RAMP_LEN, dtype=np.uint64) * np.uint64(step)
        if len(_ramps) < 16:
            _ramps[step] = r
    return r


class Progression:
    """``first, first + step, ...`` (``size`` values, modulo 2**64)."""

    __slots__ = ("first", "step", "size")

    def __init__(self, first: int, step: int, size: int) -> None:
        self.first = first & ((1 << 64) - 1)
        self.step = step
        self.size = max(0, size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> "Progression":
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a Progression supports contiguous slices only")
        start, stop, _ = key.indices(self.size)
        return Progression(self.first + start * self.step, self.step, stop - start)

    def __or__(self, bits: int) -> "Progression":
        """OR low bits into every value (valid while they stay below ``step``'s
        lowest set bit and ``first`` has them clear, as permission bits do)."""
        bits = int(bits)
        if bits & self.first or (self.step and bits >= self.step & -self.step):
            raise ValueError("bits overlap the progression's varying bits")
        return Progression(self.first | bits, self.step, self.size)

    def any(self) -> bool:
        return self.any_in(0, self.size)

    def any_in(self, start: int, n: int) -> bool:
        """Whether values[start:start+n] has a non-zero value."""
        if n <= 0:
            return False
        return (n > 1 and self.step & ((1 << 64) - 1) != 0) or \
            (self.first + start * self.step) & ((1 << 64) - 1) != 0

    def count_nonzero_in(self, start: int, n: int) -> int:
        """How many of values[start:start+n] are non-zero (a progression of
        distinct values has at most one zero)."""
        if n <= 0:
            return 0
        mask = (1 << 64) - 1
        step = self.step & mask
        first = (self.first + start * self.step) & mask
        if step == 0:
            return n if first else 0
        if n * step <= mask + 1:
            # Distinct values: value k is zero for k = -first / step, if that is whole and in range.
            k, r = divmod((mask + 1 - first) & mask, step)
            return n - 1 if r == 0 and k < n else n
        return int(np.count_nonzero(np.asarray(Progression(first, step, n))))

    def write_to(self, dest: np.ndarray, start: int = 0) -> None:
        """dest[:] = values[start:start+len(dest)], without a temporary array."""
        ramp = _ramp(self.step)
        n = dest.size
        if n <= _RAMP_LEN:
            first = (self.first + start * self.step) & ((1 << 64) - 1)
            np.add(ramp[:n], np.uint64(first), out=dest)
            return
        for pos in range(0, n, _RAMP_LEN):
            seg = dest[pos:pos + _RAMP_LEN]
            first = (self.first + (start + pos) * self.step) & ((1 << 64) - 1)
            np.add(ramp[:seg.size], np.uint64(first), out=seg)

    def __array__(self, dtype: "np.typing.DTypeLike | None" = None, copy: bool | None = None) -> np.ndarray:
        out = np.empty(self.size, dtype=np.uint64)
        if self.size:
            self.write_to(out)
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"Progression({self.first:#x}, step={self.step:#x}, size={self.size})"


def as_progression(values: np.ndarray, step: int) -> Progression | None:
    """``values`` as a Progression with ``step``, or None if they are not one."""
    n = int(values.size)
    if n == 0 or step <= 0:
        return None
    first = int(values[0])
    if (int(values[-1]) - first) & ((1 << 64) - 1) != ((n - 1) * step) & ((1 << 64) - 1):
        return None
    if n <= _RAMP_LEN:
        ok = bool(((values - np.uint64(first)) == _ramp(step)[:n]).all())
    else:
        ok = bool(np.array_equal(values, np.asarray(Progression(first, step, n))))
    return Progression(first, step, n) if ok else None


# What a table write accepts: explicit values, or a progression of them.
U64Values = Union[np.ndarray, Progression]
