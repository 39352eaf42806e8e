"""Where the library keeps files of its own between runs."""
from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/leastcontrol/<parts>``, or ``~/.cache/leastcontrol/<parts>`` (may not exist yet)."""
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base.joinpath("leastcontrol", *parts)
