"""Where vfiosim keeps what it builds or downloads once: ``$XDG_CACHE_HOME/vfiosim``."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache(*parts: str, override: str | None = None) -> Path:
    """``$XDG_CACHE_HOME/vfiosim/<parts>`` (``~/.cache`` when unset); the
    environment variable named by ``override``, when set, replaces the whole path."""
    if override:
        chosen = os.environ.get(override)
        if chosen:
            return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "vfiosim", *parts)
