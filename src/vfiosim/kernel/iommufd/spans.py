"""Interval spans over inclusive ``[start, last]`` ranges, as
``interval_tree_for_each_span()`` (lib/interval_tree.c) walks them: the
union of the nodes, touching or overlapping ones merged into one used span,
and the holes between them, clipped to ``[first, last]``."""

from __future__ import annotations

from typing import Iterable


def merge(nodes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The used spans of ``nodes``: sorted, disjoint, not touching."""
    out: list[tuple[int, int]] = []
    for start, last in sorted(nodes):
        if out and start <= out[-1][1] + 1:
            if last > out[-1][1]:
                out[-1] = (out[-1][0], last)
        else:
            out.append((start, last))
    return out


def used(spans: list[tuple[int, int]], first: int, last: int) -> list[tuple[int, int]]:
    """The merged ``spans`` clipped to ``[first, last]``."""
    return [(max(s, first), min(e, last)) for s, e in spans if e >= first and s <= last]


def holes(spans: list[tuple[int, int]], first: int, last: int) -> list[tuple[int, int]]:
    """The parts of ``[first, last]`` that no merged span covers."""
    out = []
    cur = first
    for s, e in spans:
        if e < cur:
            continue
        if s > last:
            break
        if s > cur:
            out.append((cur, s - 1))
        cur = e + 1
        if cur > last:
            return out
    if cur <= last:
        out.append((cur, last))
    return out


def overlaps(nodes: Iterable[tuple[int, int]], first: int, last: int) -> bool:
    """interval_tree_iter_first() != NULL"""
    return any(s <= last and e >= first for s, e in nodes)
