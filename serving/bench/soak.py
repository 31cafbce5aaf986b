"""Soak a running server: many streaming clients for a while, some leaving mid-stream, some sending junk.

What must hold (`SoakReport.problems` lists what did not): every request is answered — 200,
a 4xx, or 429 with Retry-After — never a 5xx or a dropped connection; every 200 stream ends
with [DONE]; junk always gets a 4xx; afterwards the engines report 0 running requests; the
server's memory grows by less than a bound. Loopback only: it is a load generator.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

BAD_BODIES: tuple[object, ...] = (
    {"messages": [{"role": "user", "content": "hi"}]},  # no model
    {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "{target}", "messages": []},
    {"model": "{target}", "messages": [{"role": "robot", "content": "hi"}]},
    {"model": "{target}", "messages": [{"role": "user", "content": "hi"}], "temperature": 7},
    {"model": "{target}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
    {"model": "{target}", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
    "this is not json",
)
QUESTIONS = ("Name a colour.", "What is 7 times 8?", "Say hello in French.", "Name a planet.",
             "What is the capital of Italy?", "Give one word that rhymes with cat.")


@dataclass
class SoakReport:
    clients: int
    duration_s: float
    outcomes: Counter = field(default_factory=Counter)  # what each request ended as
    problems: list[str] = field(default_factory=list)
    rss_start_mib: float | None = None
    rss_end_mib: float | None = None
    running_after: dict[str, int] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    def to_dict(self) -> dict:
        return {"clients": self.clients, "duration_s": self.duration_s, "requests": self.requests,
                "outcomes": dict(self.outcomes), "problems": self.problems[:50], "rss_start_mib": self.rss_start_mib,
                "rss_end_mib": self.rss_end_mib, "running_after": self.running_after}


async def _stream(http: httpx.AsyncClient, body: dict, leave_early: bool) -> str:
    """One streaming request; what it ended as ('done', 'left', '429', '4xx'), or a problem (raises)."""
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code == 429:
            if "retry-after" not in response.headers:
                raise AssertionError("429 without Retry-After")
            return "429"
        if 400 <= response.status_code < 500:
            return "4xx"
        if response.status_code != 200:
            raise AssertionError(f"status {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return "done"
            chunk = json.loads(data)
            if "error" in chunk:
                raise AssertionError(f"error event: {chunk['error'].get('message', '')[:200]}")
            if leave_early and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                return "left"  # closing the response here disconnects mid-stream
        raise AssertionError("a 200 stream ended without [DONE]")


async def _junk(http: httpx.AsyncClient, target: str, rng: random.Random) -> str:
    body = rng.choice(BAD_BODIES)
    if isinstance(body, str):
        response = await http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        response = await http.post("/v1/chat/completions",
                                   json=json.loads(json.dumps(body).replace("{target}", target)))
    if not 400 <= response.status_code < 500:
        raise AssertionError(f"junk {body!r} answered {response.status_code}")
    if response.status_code == 429 and "retry-after" not in response.headers:
        raise AssertionError("429 without Retry-After")
    return "junk-4xx"


async def soak(url: str, targets: Sequence[str], *, clients: int = 64, duration_s: float = 300.0,
               max_tokens: int = 24, leave_rate: float = 0.10, junk_rate: float = 0.05, seed: int = 0,
               api_key: str | None = None, rss=None) -> SoakReport:
    """Run the soak against `url`; `rss`: a callable giving the server's resident memory in bytes, if known."""
    report = SoakReport(clients, duration_s)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report.rss_start_mib = rss() / 2**20 if rss else None
    deadline = time.monotonic() + duration_s

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(120.0)) as http:
            while time.monotonic() < deadline:
                target, roll = rng.choice(targets), rng.random()
                try:
                    if roll < junk_rate:
                        outcome = await _junk(http, target, rng)
                    else:
                        body = {"model": target, "stream": True, "max_tokens": max_tokens,
                                "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]}
                        outcome = await _stream(http, body, leave_early=roll < junk_rate + leave_rate)
                except Exception as exc:  # a problem: recorded with the target, the soak goes on
                    outcome = "problem"
                    report.problems.append(f"{target}: {type(exc).__name__}: {exc}")
                report.outcomes[outcome] += 1
                if outcome == "429":
                    await asyncio.sleep(0.2)

    await asyncio.gather(*(client(i) for i in range(clients)))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
        for _ in range(100):  # the engines finish or abort what the last clients left behind
            engines = (await http.get("/health")).json()["engines"]
            report.running_after = {name: max(e["running"], e.get("unfinished_in_engine", 0))
                                    for name, e in engines.items()}
            if not any(report.running_after.values()):
                break
            await asyncio.sleep(0.1)
    if any(report.running_after.values()):
        report.problems.append(f"engines still running requests after the soak: {report.running_after}")
    report.rss_end_mib = rss() / 2**20 if rss else None
    return report
