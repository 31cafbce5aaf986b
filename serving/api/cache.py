"""The response cache's store: answers to deterministic requests, so a repeat costs no engine call.

What may be stored, and under which key, is serving/api/cache_policy.py's to decide.

In memory: cachetools' LRUCache, N entries. With a path, also a diskcache directory (SQLite
underneath, safe across processes), so answers survive a restart and are shared by servers on
one machine; least recently used out first, bounded in bytes (diskcache bounds by size, not by
count): N x 64 KiB. Streamed requests and `Cache-Control: no-cache` (or `moa.cache: false`) bypass it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import diskcache
from cachetools import LRUCache

log = logging.getLogger(__name__)
DISK_BYTES_PER_ENTRY = 64 * 1024  # the disk bound per --cache-entries; an answer is a few KiB, a trace more
DISK_TIMEOUT_S = 1.0
DISK_ERRORS = (diskcache.Timeout, sqlite3.Error, OSError)


class ResponseCache:
    """cachetools' LRUCache in memory, in front of an optional diskcache store; this class only joins the two
    (a disk hit is kept in memory); serving/api/cache_policy.py's `offer` decides what may be stored."""

    def __init__(self, max_entries: int, path: Path | None = None) -> None:
        self.max_entries = max_entries
        self._entries: LRUCache[str, dict] = LRUCache(max_entries)
        self._disk = _open_disk(path, max_entries) if path is not None else None

    def get(self, key: str) -> dict | None:
        body = self._entries.get(key)
        if self._disk is not None:
            try:  # read on a memory hit too: that marks it used in the disk's LRU order
                stored = self._disk.get(key)
            except DISK_ERRORS as exc:  # a locked or failing disk is a miss, never a failed request
                log.warning("response cache %s: read failed (%s); answering without it", self._disk.directory, exc)
                stored = None
            if body is None and stored is not None:
                body = self._entries[key] = json.loads(stored)
        return body

    def put(self, key: str, body: dict) -> None:
        self._entries[key] = body
        if self._disk is not None:
            try:  # JSON text, not diskcache's default pickle: a shared directory's contents are never unpickled
                self._disk.set(key, json.dumps(body))
            except DISK_ERRORS as exc:  # the answer was made: it is still given, only not kept on disk
                log.warning("response cache %s: write failed (%s); the answer is kept in memory only",
                            self._disk.directory, exc)

    def __len__(self) -> int:
        return len(self._entries)


def _open_disk(path: Path, max_entries: int) -> diskcache.Cache:
    if path.exists() and not path.is_dir():
        raise ValueError(f"response cache {path}: this is a file, and --cache-path (server.cache_path) names a "
                         "directory now; an older moa-stack's SQLite answers are not carried over (they were "
                         "stored unchecked): delete the file or pass another path")
    try:
        # cull_limit: at most 2 least recently used out per insert over the bound (diskcache's default, 10,
        # empties a small store at once); 2, not 1, so the store shrinks back after a large answer.
        # timeout: how long SQLite waits on another server's lock (each read is a write: LRU order) before
        # the lookup counts as a miss; it blocks the event loop meanwhile, so short.
        return diskcache.Cache(str(path), size_limit=max_entries * DISK_BYTES_PER_ENTRY,
                               eviction_policy="least-recently-used", cull_limit=2, timeout=DISK_TIMEOUT_S)
    except (OSError, sqlite3.Error) as exc:
        raise ValueError(f"response cache {path}: cannot open it as a cache directory ({exc}); "
                         "pass another --cache-path or delete it") from None

