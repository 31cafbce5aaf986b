"""Deliver a job: as one JSON body or as server-sent events, under a slot, a timeout and the client's presence.

Both forms hold a concurrency slot for as long as they run (`ServerState.slot`),
end at the request timeout (504), and stop when the client goes away: cancelling
the job cancels its engine calls, which abort inside the engines, so no work leaks.
Failures become statuses through the one table in serving/api/errors.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from serving.api.cache_policy import cache_key, offer, replayed, traced
from serving.api.errors import APIError, as_api_error, body, error_response
from serving.api.jobs import Job
from serving.api.state import ServerState
from serving.api.votes import StreamSeen, remember

log = logging.getLogger(__name__)


async def respond(state: ServerState, job: Job, request: Request, *, stream: bool):
    key = None if stream or not _may_cache(state, job, request) else cache_key(state, job)
    if key is not None:
        cached = state.cache.get(key)
        state.metrics.cache.labels("hit" if cached else "miss").inc()
        if cached is not None:  # a repeat of a deterministic request: no slot, no engine call
            state.metrics.requests.labels(job.model, "200").inc()
            reply = replayed(cached, job)
            remember(state, job, reply)  # a vote may name it, as any completion this server sent
            return JSONResponse(reply)
    state.check_capacity()  # a full queue is a 429 before any response starts
    if stream:  # the slot is taken inside the stream, so a response that never starts holds none
        events = _kept_alive(_events(state, job), state.settings.keepalive_s)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    async with state.slot():
        return await _complete(state, job, request, key)


def _may_cache(state: ServerState, job: Job, request: Request) -> bool:
    return state.cache is not None and job.use_cache and "no-cache" not in request.headers.get("cache-control", "")


async def _complete(state: ServerState, job: Job, request: Request, cache_as: str | None) -> JSONResponse:
    started, status = time.perf_counter(), "200"
    # A run whose answer may be stored reports its trace, which the cache checks before it stores the answer.
    task = asyncio.create_task((job if cache_as is None else traced(job)).complete())
    gone = asyncio.create_task(_disconnected(request))  # a request whose client left is cancelled
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=state.settings.request_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            reason = "client_gone" if gone in done else "timeout"
            state.metrics.aborted.labels(job.model, reason).inc()
            if reason == "client_gone":
                status = "499"
                return error_response(400, "client disconnected")
            raise APIError(504, f"no answer within {state.settings.request_timeout_s} s; the request was aborted")
        if (failure := task.exception()) is not None:
            raise _logged(failure)
        state.metrics.latency.labels(job.model).observe(time.perf_counter() - started)
        result = task.result() if cache_as is None else offer(state.cache, cache_as, job, task.result())
        remember(state, job, result, time.perf_counter() - started)
        return JSONResponse(result)
    except APIError as exc:
        status = str(exc.status)
        raise
    finally:
        gone.cancel()
        state.metrics.requests.labels(job.model, status).inc()


async def _disconnected(request: Request) -> None:
    """Return when the ASGI server reports the client gone (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(payload: dict | str) -> bytes:
    """One server-sent event; every chunk, error and the closing [DONE] goes through here."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _events(state: ServerState, job: Job) -> AsyncIterator[bytes]:
    """The job's chunks as SSE; a failure becomes an error event, and the stream always ends with [DONE]."""
    started, first_token, status = time.perf_counter(), None, "200"
    async with state.slot():
        seen = StreamSeen(state, job)
        try:
            async with asyncio.timeout(state.settings.request_timeout_s):
                async for chunk in job.chunks():
                    if first_token is None and _has_content(chunk):
                        first_token = time.perf_counter() - started
                    seen.add(chunk)
                    yield sse(chunk)
                seen.done()  # finished whole: a vote may name it (before [DONE], so before the client can)
        except TimeoutError:
            status = "504"
            state.metrics.aborted.labels(job.model, "timeout").inc()
            yield sse(body(504, f"no answer within {state.settings.request_timeout_s} s; the request was aborted"))
        except (asyncio.CancelledError, GeneratorExit):
            status = "499"  # the client went away: leaving this generator cancelled the engine requests
            state.metrics.aborted.labels(job.model, "client_gone").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is answered, with the status the table gives
            error = _logged(exc)
            status = str(error.status)
            yield sse(body(error.status, error.message, error.param, error.code))
        finally:
            state.metrics.requests.labels(job.model, status).inc()
            state.metrics.latency.labels(job.model).observe(time.perf_counter() - started)
            if first_token is not None:
                state.metrics.ttft.labels(job.model).observe(first_token)
        yield sse("[DONE]")


KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients (openai's, EventSource) skip it


async def _kept_alive(events: AsyncIterator[bytes], every_s: float) -> AsyncIterator[bytes]:
    """`events`, with a comment line whenever nothing was sent for `every_s` seconds.

    A streamed request sends no byte while it waits for a slot or while proposers run before the
    aggregator's first token, which on a slow machine lasts minutes: clients' read timeouts and proxies'
    idle timeouts (nginx's is 60 s) would cut it. The events run in one task of their own, so the
    request timeout inside them (`asyncio.timeout`, bound to a task) stays valid; leaving this
    generator (client gone) cancels that task, which aborts the engine requests as before.
    """
    # Unbounded (a stream is at most max_tokens chunks), so the producer never waits on a slow reader: its
    # only waits are inside `events`, where the request timeout and a cancellation must land.
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def produce() -> None:
        try:
            async with aclosing(events) as running:
                async for event in running:
                    queue.put_nowait(event)
        finally:
            queue.put_nowait(None)  # the end, however it came

    producer = asyncio.create_task(produce())
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=every_s)
            except TimeoutError:
                yield KEEPALIVE
                continue
            if event is None:
                break
            yield event
        await producer  # `events` answers every failure itself; anything else surfaces here
    finally:
        if not producer.done():
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)


def _has_content(chunk: dict) -> bool:
    return any(c.get("text") or (c.get("delta") or {}).get("content") for c in chunk.get("choices", ()))


def _logged(exc: BaseException) -> APIError:
    error = as_api_error(exc)
    if error.status >= 500 and error.code == "internal_error":
        log.error("request failed", exc_info=exc)
    return error
