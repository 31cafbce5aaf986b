"""Who may call, how much they may send, and how often: API keys, the body limit, per-key rate limits.

The body limit is an ASGI middleware that counts the bytes as they arrive, so a chunked
upload (no Content-Length) is cut at the limit like a declared one; keys are compared in
constant time; each key (each client address when no keys are set) has a token bucket.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from serving.api.errors import error_response

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


def key_of(authorization: str) -> str | None:
    return authorization[7:] if authorization.startswith("Bearer ") else None


def accepted(key: str | None, keys: Sequence[str]) -> bool:
    """Whether `key` is one of `keys`, in time that does not depend on how much of a key matched."""
    if key is None:
        return False
    given = key.encode()
    return any([hmac.compare_digest(given, k.encode()) for k in keys])  # every key compared: no early exit


class BodyLimit:
    """413 once a request body passes `max_bytes`, counted while reading (Content-Length or chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int, prefix: str = "/v1/") -> None:
        self.app, self.max_bytes, self.prefix = app, max_bytes, prefix

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, int(declared))
        chunks, size = [], 0
        while True:  # read the whole body first (bounded): the app then sees it replayed
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, size, reading=True)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: the client's disconnect, as the app expects

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable, size: int, reading: bool = False) -> None:
        what = f"more than {self.max_bytes} bytes arrived" if reading else f"{size} bytes declared"
        response = error_response(413, f"request body too large: {what}; the limit is {self.max_bytes} bytes",
                                  code="request_too_large")
        await response(scope, receive, send)


@dataclass
class RateLimiter:
    """A token bucket per key: `burst` requests at once, refilled at `per_minute` a minute."""

    per_minute: float
    burst: int
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # key -> (tokens, updated)

    def take(self, key: str, now: float | None = None) -> float | None:
        """None if the request may go; else the seconds until one token is back (Retry-After)."""
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        tokens, updated = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - updated) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return None
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / rate

    def refusal(self, wait_s: float):
        seconds = max(1, math.ceil(wait_s))
        return error_response(429, f"rate limit: {self.per_minute:g} requests a minute (bursts of {self.burst}) "
                                   f"per API key; retry in {seconds} s", code="rate_limit_exceeded",
                              headers={"Retry-After": str(seconds)})
