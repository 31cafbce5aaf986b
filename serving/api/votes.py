"""Votes from the playground's compare view, appended to a local JSONL file.

Each line is one human verdict on two answers to the same conversation; `moa eval --votes`
reads the file back and reports it next to a judge model's verdicts on the same answers.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.api.schemas import Message

Verdict = Literal["a", "b", "tie", "both_bad"]


class VotedAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    target: str = Field(min_length=1)  # the model or pipeline that answered
    answer: str = Field(max_length=200_000)
    completion_tokens: int | None = Field(default=None, ge=0)
    seconds: float | None = Field(default=None, ge=0)


class Vote(BaseModel):
    """POST /v1/playground/votes: which of two hidden answers a person preferred."""

    model_config = ConfigDict(extra="forbid", strict=True)

    messages: list[Message] = Field(min_length=1)
    a: VotedAnswer
    b: VotedAnswer
    verdict: Verdict


class VoteLog:
    """Appends votes as JSON lines; one writer at a time, so concurrent votes never interleave."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    async def append(self, vote: Vote) -> dict:
        record = {"id": uuid.uuid4().hex, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "messages": [{"role": m.role, "content": m.text()} for m in vote.messages],
                  "a": vote.a.model_dump(), "b": vote.b.model_dump(), "verdict": vote.verdict,
                  "winner": {"a": vote.a.target, "b": vote.b.target}.get(vote.verdict)}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        async with self._lock:
            await asyncio.to_thread(self._write, line)
        return record

    def _write(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)


def read_votes(path: Path) -> list[dict]:
    """The votes in a file, each checked; a bad line names the file and line number."""
    votes = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            Vote.model_validate({k: record[k] for k in ("messages", "a", "b", "verdict")})
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a playground vote ({exc})") from None
        votes.append(record)
    return votes
