"""The kernel log (``dmesg``): printk with levels, kept in a bounded ring."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

KERN_ERR = 3
KERN_WARNING = 4
KERN_NOTICE = 5
KERN_INFO = 6
KERN_DEBUG = 7

_LEVEL_NAMES = {KERN_ERR: "err", KERN_WARNING: "warn", KERN_NOTICE: "notice", KERN_INFO: "info", KERN_DEBUG: "debug"}


@dataclass(frozen=True)
class LogRecord:
    seq: int
    level: int
    text: str

    @property
    def level_name(self) -> str:
        return _LEVEL_NAMES.get(self.level, str(self.level))


class KernelLog:
    """printk: records are numbered; debug records are kept out of dmesg()."""

    def __init__(self, capacity: int = 65536) -> None:
        self._records: deque[LogRecord] = deque(maxlen=capacity)
        self._seq = 0

    def printk(self, level: int, text: str) -> None:
        self._seq += 1
        self._records.append(LogRecord(self._seq, level, text))

    def err(self, text: str) -> None:
        self.printk(KERN_ERR, text)

    def warn(self, text: str) -> None:
        self.printk(KERN_WARNING, text)

    def info(self, text: str) -> None:
        self.printk(KERN_INFO, text)

    def debug(self, text: str) -> None:
        self.printk(KERN_DEBUG, text)

    def lines(self, include_debug: bool = False) -> list[str]:
        return [r.text for r in self._records if include_debug or r.level < KERN_DEBUG]

    def records(self) -> list[LogRecord]:
        return list(self._records)

    @property
    def seq(self) -> int:
        """The number of the latest record (0 before the first)."""
        return self._seq

    def since(self, seq: int) -> list[LogRecord]:
        """The records after number ``seq`` that the ring still holds, oldest first."""
        out = []
        for r in reversed(self._records):
            if r.seq <= seq:
                break
            out.append(r)
        out.reverse()
        return out

    def clear(self) -> None:
        self._records.clear()
