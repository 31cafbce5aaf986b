"""Answers to deterministic requests, kept so a repeat costs no engine call.

Only a request whose answer is fixed by its inputs is cached: a base model at
temperature 0 or with a seed; a pipeline with a seed, or whose every LLM step is
greedy. The key covers the normalised conversation, the target (a pipeline after
the request's overrides), every sampling parameter, and the identity of each model
involved: its models.yaml entry (source, checksum, engine arguments) and the dtype
its engine settled on, so new weights or a float32 fallback never reuse old answers;
for a `route` step, the router file's checksum; the request's spending limit.

In memory, least recently used first out; with a path, also in a SQLite file (the
same bound, least recently used first out), so answers survive a restart and are
shared by servers on one machine. Streamed requests and `Cache-Control: no-cache`
(or `moa.cache: false`) bypass it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

from moa.steps import LLMStep
from serving.api.jobs import ChatJob, Job, PipelineJob
from serving.api.state import ServerState


class ResponseCache:
    def __init__(self, max_entries: int, path: Path | None = None) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, dict] = OrderedDict()
        self._disk = _DiskStore(path, max_entries) if path is not None else None

    def get(self, key: str) -> dict | None:
        body = self._entries.get(key)
        if body is None and self._disk is not None and (body := self._disk.get(key)) is not None:
            self._remember(key, body)
        elif body is not None:
            self._entries.move_to_end(key)
            if self._disk is not None:
                self._disk.touch(key)
        return body

    def put(self, key: str, body: dict) -> None:
        self._remember(key, body)
        if self._disk is not None:
            self._disk.put(key, body)

    def _remember(self, key: str, body: dict) -> None:
        self._entries[key] = body
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class _DiskStore:
    """Bodies in one SQLite table, keyed like the memory cache; the least recently used are dropped."""

    def __init__(self, path: Path, max_entries: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, body TEXT NOT NULL, "
                             "used REAL NOT NULL)")
        except sqlite3.Error as exc:
            raise ValueError(f"response cache {path}: cannot open it as SQLite ({exc}); "
                             "pass another --cache-path or delete the file") from None

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM answers WHERE key = ?", (key,)).fetchone()
            if row is not None:
                self._db.execute("UPDATE answers SET used = ? WHERE key = ?", (time.time(), key))
        return None if row is None else json.loads(row[0])

    def touch(self, key: str) -> None:
        with self._lock:
            self._db.execute("UPDATE answers SET used = ? WHERE key = ?", (time.time(), key))

    def put(self, key: str, body: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", (key, json.dumps(body), time.time()))
            self._db.execute("DELETE FROM answers WHERE key NOT IN (SELECT key FROM answers ORDER BY used DESC "
                             "LIMIT ?)", (self.max_entries,))


def cache_key(state: ServerState, job: Job) -> str | None:
    """The key of a deterministic job; None when its answer may differ between two identical requests."""
    if isinstance(job, PipelineJob):
        greedy = all(s.temperature == 0 for s in job.pipeline.steps if isinstance(s, LLMStep))
        if job.seed is None and not greedy:
            return None
        routers = sorted({r for s in job.pipeline.steps if (r := getattr(s, "router", None))})
        target = {"pipeline": job.model, "steps": [repr(s) for s in job.pipeline.steps], "seed": job.seed,
                  "trace": job.options.trace, "events": job.options.events,
                  "ceiling": [job.options.max_total_tokens, job.options.max_cost_usd],
                  "routers": {r: hashlib.sha256(state.registry.router_path(r).read_bytes()).hexdigest()
                              for r in routers}}
        models = job.pipeline.models()
        conversation = job.messages
    else:
        if job.params.temperature != 0 and job.params.seed is None:
            return None
        target = {"model": job.model, "endpoint": type(job).__name__, "params": repr(job.params),
                  "json_schema": job.params.json_schema}
        models = (job.model,)
        conversation = job.prompt
    identity = {name: [state.registry.get(name).model_dump(mode="json"),
                       getattr(state.checks.get(name), "dtype", None)] for name in models}
    text = json.dumps([conversation, target, identity], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def replayed(body: dict, job: Job) -> dict:
    """A cached body as a new response: this request's id and time, and `moa.cached: true`."""
    body = copy.deepcopy(body)
    envelope = job.envelope(False) if isinstance(job, ChatJob) else None
    body["id"] = envelope.id if envelope else f"chatcmpl-{job.id}"
    body["created"] = int(time.time())
    body["moa"] = {**(body.get("moa") or {}), "cached": True}
    return body

