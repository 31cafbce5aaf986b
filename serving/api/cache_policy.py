"""Which answers the response cache keeps (deterministic requests only), under which key, and their replay.

A request's answer is stored only when it is fixed by its inputs, decided twice. Before the run
(`may_be_fixed`), from the request: a base model at temperature 0 or with a seed; a pipeline with a
seed, or whose every sampling step is greedy or seeded (a propose step's `temperature_offsets`
included) and whose shuffle / dropout / sample steps are seeded; anything else gets no key at all.
After the run (`unfixed`), from its trace: every engine call was greedy or seeded and ended `ok`
(none failed, timed out, was aborted — by a quorum or otherwise — or skipped by the spending limit,
all of which depend on timing), no quorum cut samples inside a call, and no step drew unseeded
randomness. A run that fails that check is answered as usual but never stored. A pipeline with a
`check` step is never stored: a check's verdict depends on its time limit under load.

The key covers the normalised conversation, the target (a pipeline after the request's overrides),
every sampling parameter, and the identity of each model involved: its models.yaml entry (source,
checksum, engine arguments) and the dtype its engine settled on, so new weights or a float32
fallback never reuse old answers; for a `route` step, the router file's checksum; the request's
spending limit.

The answers themselves are kept by serving/api/cache.py (`ResponseCache`); this module decides what goes in.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import replace

from moa.pipeline import Pipeline
from moa.steps import Cascade, LLMStep, Propose, Step
from moa.transform_steps import Transform
from serving.api.cache import ResponseCache
from serving.api.jobs import ChatJob, Job, PipelineJob
from serving.api.state import ServerState

log = logging.getLogger(__name__)


def may_be_fixed(pipeline: Pipeline, seed: int | None) -> bool:
    """Whether a run of `pipeline` can repeat its answer at all, judged from its steps before it runs.

    A request seed seeds every call and transform. Without one, a step must be seeded itself, or greedy in
    every call it makes; a cascade's first call is always greedy (its samples, if it draws any, show in the
    trace, which `unfixed` reads after the run).
    """
    if pipeline.runs_code():
        return False  # a check's verdict depends on its time limit under the machine's load, which no trace shows
    if seed is not None:
        return True
    for step in pipeline.steps:
        if getattr(step, "seed", None) is not None or isinstance(step, Cascade):
            continue
        if isinstance(step, Transform) and hasattr(step, "seed"):
            return False  # shuffle / dropout / sample from fresh entropy
        if isinstance(step, LLMStep) and any(t > 0 for t in _temperatures(step)):
            return False
    return True


def _temperatures(step: Step) -> set[float]:
    """The temperatures a step's calls are sent with."""
    if isinstance(step, Propose):
        return {step.sample_temperature(i) for i in range(step.total)}
    return {step.temperature}


def unfixed(trace: dict) -> str | None:
    """Why a finished run's answer may differ next time (None: its trace proves it repeatable)."""
    for i, call in enumerate(trace["calls"]):
        where = f"call {i} ({call['step']}, {call['model']})"
        if call["status"] != "ok":
            return f"{where} ended {call['status']}"
        if call.get("aborted_samples"):
            return f"{where}: a quorum cut {call['aborted_samples']} sample(s)"
        if call.get("temperature") != 0 and call.get("seed") is None:
            return f"{where} sampled at temperature {call.get('temperature')} without a seed"
    for step in trace["steps"]:
        if step.get("unseeded"):
            return f"step {step['step']} (layer {step['layer']}) drew unseeded randomness"
    return None


def traced(job: Job) -> Job:
    """The job to run when its answer may be stored: a pipeline that reports its trace, for `storable`.

    A job hands back only its response body, so the trace (which the request may not have asked for)
    is how the run's calls reach the check; `storable` takes it out again.
    """
    if isinstance(job, PipelineJob) and not job.options.trace:
        return replace(job, options=job.options.model_copy(update={"trace": True}))
    return job


def storable(job: Job, body: dict) -> tuple[dict, str | None]:
    """The body as the request asked for it, and why it must not be stored (None: store it).

    A base model's 200 is its one engine call, finished; a pipeline's is judged by its trace.
    """
    if not isinstance(job, PipelineJob):
        return body, None
    moa = body["moa"]
    trace = moa["trace"] if job.options.trace else moa.pop("trace")
    return body, unfixed(trace)


def offer(cache: ResponseCache, key: str, job: Job, body: dict) -> dict:
    """Store a finished job's body if its run proves it fixed; returns the body to answer with."""
    body, why = storable(job, body)
    if why is None:
        cache.put(key, body)
    else:
        log.debug("answer not cached: %s", why)
    return body


def cache_key(state: ServerState, job: Job) -> str | None:
    """The key of a job whose answer may be fixed; None when it surely is not (the run's trace decides the rest)."""
    if isinstance(job, PipelineJob):
        if not may_be_fixed(job.pipeline, job.seed):
            return None
        routers = sorted({r for s in job.pipeline.steps if (r := getattr(s, "router", None))})
        target = {"pipeline": job.model, "steps": [repr(s) for s in job.pipeline.steps], "seed": job.seed,
                  "trace": job.options.trace, "events": job.options.events,
                  "ceiling": [job.options.max_total_tokens, job.options.max_cost_usd],
                  "routers": {r: hashlib.sha256(state.registry.router_path(r).read_bytes()).hexdigest()
                              for r in routers}}
        conversation = job.messages
    else:
        if job.params.temperature != 0 and job.params.seed is None:
            return None
        target = {"model": job.model, "endpoint": type(job).__name__, "params": repr(job.params),
                  "json_schema": job.params.json_schema}
        conversation = job.prompt
    identity = {name: [state.registry.get(name).model_dump(mode="json"),
                       getattr(state.checks.get(state.registry.get(name).name), "dtype", None),
                       _adapter_stamp(state.registry, name)] for name in job.models()}
    text = json.dumps([conversation, target, identity], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _adapter_stamp(registry, name: str) -> list | None:
    """An adapter's weights file (size, mtime): retraining it in place must not replay its old answers."""
    if (adapter := registry.adapter_of(name)) is None:
        return None
    from serving.models.adapters import WEIGHTS, AdapterError, adapter_dir

    try:
        stat = (adapter_dir(*adapter, registry.get(name).adapters[adapter[1]]) / WEIGHTS).stat()
    except (OSError, AdapterError):
        return None
    return [stat.st_size, stat.st_mtime_ns]


def replayed(body: dict, job: Job) -> dict:
    """A cached body as a new response: this request's id and time, and `moa.cached: true`."""
    body = copy.deepcopy(body)
    envelope = job.envelope(False) if isinstance(job, ChatJob) else None
    body["id"] = envelope.id if envelope else f"chatcmpl-{job.id}"
    body["created"] = int(time.time())
    body["moa"] = {**(body.get("moa") or {}), "cached": True}
    return body

