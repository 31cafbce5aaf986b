"""Answers to deterministic requests, kept so a repeat costs no engine call.

Only a request whose answer is fixed by its inputs is cached: a base model at
temperature 0 or with a seed; a pipeline with a seed, or whose every LLM step is
greedy. The key covers the normalised conversation, the target (a pipeline after
the request's overrides), every sampling parameter, and the identity of each model
involved: its models.yaml entry (source, checksum, engine arguments) and the dtype
its engine settled on, so new weights or a float32 fallback never reuse old answers.

In memory, least recently used first out; streamed requests and `Cache-Control:
no-cache` (or `moa.cache: false`) bypass it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections import OrderedDict

from moa.steps import LLMStep
from serving.api.jobs import ChatJob, Job, PipelineJob
from serving.api.state import ServerState


class ResponseCache:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, dict] = OrderedDict()

    def get(self, key: str) -> dict | None:
        body = self._entries.get(key)
        if body is not None:
            self._entries.move_to_end(key)
        return body

    def put(self, key: str, body: dict) -> None:
        self._entries[key] = body
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def cache_key(state: ServerState, job: Job) -> str | None:
    """The key of a deterministic job; None when its answer may differ between two identical requests."""
    if isinstance(job, PipelineJob):
        greedy = all(s.temperature == 0 for s in job.pipeline.steps if isinstance(s, LLMStep))
        if job.seed is None and not greedy:
            return None
        target = {"pipeline": job.model, "steps": [repr(s) for s in job.pipeline.steps], "seed": job.seed,
                  "trace": job.options.trace, "events": job.options.events}
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

