"""Who may call, how much they may send, and how often: API keys, the body limit, per-key rate limits.

The body limit is an ASGI middleware that counts the bytes as they arrive, so a chunked
upload (no Content-Length) is cut at the limit like a declared one; keys are compared in
constant time; each key (each client address when no keys are set) has its own rate limit.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Awaitable, Callable, Sequence

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

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


def rate_key(key: str | None, keys: Sequence[str], client: str | None) -> str:
    """Whom a request counts against: its API key when keys are set (the guard has accepted it by then),
    else the client's address. Without keys the Authorization header is ignored: any string a client
    sends would otherwise be a fresh allowance, and one more entry in the table."""
    if keys and accepted(key, keys):
        return f"key:{key}"
    return f"addr:{client or 'unknown'}"


class RateLimiter:
    """`burst` requests at once and `per_minute` a minute after that, per key (`rate_key`).

    The `limits` library's sliding-window counter, `burst` requests per window of
    ceil(60 * burst / per_minute) seconds: a burst of `burst`, then the long-run rate `per_minute`.
    Its in-memory storage drops a key's counters two windows after its last request, so the table
    holds only the clients active lately. (Not its moving window: that storage keeps an empty entry
    for every key it ever saw.)
    """

    def __init__(self, per_minute: float, burst: int) -> None:
        self.per_minute, self.burst = per_minute, burst
        self.window_s = max(1, math.ceil(60 * burst / per_minute))
        self.item = RateLimitItemPerSecond(burst, self.window_s)
        self.storage = MemoryStorage()
        self.strategy = SlidingWindowCounterRateLimiter(self.storage)

    def take(self, key: str) -> float | None:
        """None if the request may go; else the seconds until the key's count next falls (Retry-After)."""
        if self.strategy.hit(self.item, key):
            return None
        return max(0.0, self.strategy.get_window_stats(self.item, key).reset_time - time.time())

    def __len__(self) -> int:
        """The counters held now (a key has at most two: its current and previous window)."""
        return len(self.storage.storage)

    def refusal(self, wait_s: float):
        seconds = max(1, math.ceil(wait_s))
        return error_response(429, f"rate limit: {self.per_minute:g} requests a minute (bursts of {self.burst}) "
                                   f"per API key (per client address without keys); retry in {seconds} s",
                              code="rate_limit_exceeded", headers={"Retry-After": str(seconds)})
