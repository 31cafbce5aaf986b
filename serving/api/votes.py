"""Votes from the playground's compare view, on completions this server produced, appended to a JSONL file.

A vote names two completions by their response `id`; the server fills in what it recorded when it
produced them (target, conversation, answer), so a client cannot put words in a model's mouth or
vote on a target that never answered. Each line is one human verdict on two answers to the same
conversation; `moa eval --votes` reads the file back and reports it next to a judge model's verdicts.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cachetools import TTLCache
from pydantic import BaseModel, ConfigDict, Field

from serving.api.errors import APIError
from serving.api.schemas import Message

if TYPE_CHECKING:
    from serving.api.jobs import Job
    from serving.api.state import ServerState

Verdict = Literal["a", "b", "tie", "both_bad"]
KEPT_S = 3600  # how long a completion may still be voted on
KEPT_CHARS = 32 << 20  # what the kept completions may hold in all (answers and conversations, in characters)


class VotedAnswer(BaseModel):
    """One side of a recorded vote, as the votes file holds it (filled in by the server)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    target: str = Field(min_length=1)  # the model or pipeline that answered
    answer: str
    completion_tokens: int | None = Field(default=None, ge=0)
    seconds: float | None = Field(default=None, ge=0)  # the server's time producing it
    completion: str | None = None  # the response id it came from (absent in files from before ids)
    choice: int = Field(default=0, ge=0)


class VoteRecord(BaseModel):
    """A line of the votes file: which of two answers to one conversation a person preferred."""

    model_config = ConfigDict(extra="forbid", strict=True)

    messages: list[Message] = Field(min_length=1)
    a: VotedAnswer
    b: VotedAnswer
    verdict: Verdict


class VotedCompletion(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(min_length=1, max_length=200)  # a chat completion's `id`, as its response or chunks carry it
    index: int = Field(default=0, ge=0)  # the choice, for a response with n > 1


class Vote(BaseModel):
    """POST /v1/playground/votes: a verdict on two completions this server produced, named by id."""

    model_config = ConfigDict(extra="forbid", strict=True)

    a: VotedCompletion
    b: VotedCompletion
    verdict: Verdict


@dataclass
class Produced:
    """A chat completion as the server sent it: what a vote on it records."""

    target: str
    messages: list[dict]
    answers: dict[int, str]  # choice index -> text
    completion_tokens: int | None = None  # known for a single choice only (usage counts all choices)
    seconds: float | None = None

    def size(self) -> int:
        return 256 + sum(map(len, self.answers.values())) + sum(len(m["content"]) for m in self.messages)


class Completions:
    """The chat completions this server produced lately, by response id, until a vote uses them.

    cachetools' TTLCache, sized in characters: entries leave after `KEPT_S` or, oldest first, when
    the whole passes `KEPT_CHARS`, so no traffic makes it grow without bound.
    """

    def __init__(self, max_chars: int = KEPT_CHARS, ttl_s: float = KEPT_S,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self._kept: TTLCache[str, Produced] = TTLCache(maxsize=max_chars, ttl=ttl_s, timer=timer,
                                                       getsizeof=Produced.size)
        self.ttl_s = ttl_s

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, id_: str) -> bool:
        return id_ in self._kept

    def keep(self, id_: str, produced: Produced) -> None:
        try:
            self._kept[id_] = produced
        except ValueError:  # one completion larger than the whole store: not kept, so not votable
            pass

    def take(self, a: VotedCompletion, b: VotedCompletion) -> tuple[Produced, Produced]:
        """Both sides' records, removed (a completion is voted on once), or the 400 that says what is wrong."""
        if (a.id, a.index) == (b.id, b.index):
            raise APIError(400, "a and b name the same completion: a vote compares two different ones",
                           param="b", code="same_completion")
        sides = []
        for name, side in (("a", a), ("b", b)):
            produced = self._kept.get(side.id)
            if produced is None:
                raise APIError(400, f"{side.id!r} is not a chat completion this server produced in the last "
                                    f"{self.ttl_s / 60:g} minutes, or it was voted on already: a vote names the "
                                    "`id` of two chat completions from this server", param=name,
                               code="unknown_completion")
            if side.index not in produced.answers:
                raise APIError(400, f"completion {side.id!r} has no choice {side.index}", param=name,
                               code="unknown_completion")
            sides.append(produced)
        if sides[0].messages != sides[1].messages:
            raise APIError(400, "a and b answer different conversations: a vote compares two answers to the "
                                "same prompt", param="b", code="different_prompts")
        for side in (a, b):
            self._kept.pop(side.id, None)
        return sides[0], sides[1]

    def put_back(self, a: VotedCompletion, b: VotedCompletion, sides: tuple[Produced, Produced]) -> None:
        for side, produced in zip((a, b), sides, strict=True):
            self.keep(side.id, produced)


def _conversation(job: Job) -> list[dict] | None:
    """The messages a chat job answered; None for a raw-prompt completion (not votable)."""
    messages = getattr(job, "messages", None)
    if messages is None:
        messages = job.prompt if isinstance(getattr(job, "prompt", None), list) else None
    return messages


def remember(state: ServerState, job: Job, body: dict, seconds: float | None = None) -> None:
    """Keep a finished, non-streamed chat completion, when this server records votes."""
    if state.completions is None or (messages := _conversation(job)) is None:
        return
    choices = body.get("choices") or []
    answers = {c["index"]: (c.get("message") or {}).get("content") or "" for c in choices}
    tokens = (body.get("usage") or {}).get("completion_tokens") if len(answers) == 1 else None
    state.completions.keep(body["id"], Produced(job.model, messages, answers, tokens, seconds))


@dataclass
class StreamSeen:
    """A streamed chat completion, chunk by chunk, kept once the stream has finished (`done`)."""

    state: ServerState
    job: Job
    started: float = field(default_factory=time.perf_counter)
    id: str | None = None
    parts: dict[int, list[str]] = field(default_factory=dict)  # per choice index, the text as it streamed
    completion_tokens: int | None = None

    def add(self, chunk: dict) -> None:
        if self.state.completions is None:  # votes off: nothing to keep
            return
        self.id = chunk.get("id", self.id)
        if (chunk.get("moa") or {}).get("event") == "answer_restarted":  # the text before it is void
            self.parts.clear()
        for choice in chunk.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") or ""
            self.parts.setdefault(choice["index"], []).append(text)  # joined once, in done(): no quadratic copy
        if chunk.get("usage"):
            self.completion_tokens = chunk["usage"].get("completion_tokens")

    def done(self) -> None:
        if self.state.completions is None or self.id is None or (messages := _conversation(self.job)) is None:
            return
        answers = {index: "".join(parts) for index, parts in self.parts.items()}
        tokens = self.completion_tokens if len(answers) == 1 else None
        self.state.completions.keep(self.id, Produced(self.job.model, messages, answers, tokens,
                                                      time.perf_counter() - self.started))


class VoteLog:
    """Appends votes as JSON lines; one writer at a time, so concurrent votes never interleave."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    async def append(self, vote: Vote, a: Produced, b: Produced) -> dict:
        sides = {name: VotedAnswer(target=p.target, answer=p.answers[v.index], completion_tokens=p.completion_tokens,
                                   seconds=p.seconds, completion=v.id, choice=v.index)
                 for name, p, v in (("a", a, vote.a), ("b", b, vote.b))}
        record = {"id": uuid.uuid4().hex, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "messages": a.messages,
                  "a": sides["a"].model_dump(), "b": sides["b"].model_dump(), "verdict": vote.verdict,
                  "winner": {"a": a.target, "b": b.target}.get(vote.verdict)}
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
            VoteRecord.model_validate({k: record[k] for k in ("messages", "a", "b", "verdict")})
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a playground vote ({exc})") from None
        votes.append(record)
    return votes
