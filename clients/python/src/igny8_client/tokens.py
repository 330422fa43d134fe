"""Token providers."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


def token_from_file(path: str | os.PathLike[str]) -> Callable[[], str]:
    """A ``token_provider`` reading the JWT from ``path`` (surrounding
    whitespace stripped), re-read whenever the file changes, as a mounted
    Kubernetes secret does when it is rotated."""
    lock = threading.Lock()
    cached: dict[str, object] = {}

    def provide() -> str:
        stat = os.stat(path)
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with lock:
            if cached.get("stamp") != stamp:
                with open(path, encoding="utf-8") as f:
                    cached["token"] = f.read().strip()
                cached["stamp"] = stamp
            token = cached["token"]
        assert isinstance(token, str)
        return token

    return provide
