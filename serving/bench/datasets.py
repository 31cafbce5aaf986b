"""Prompt sets (`moa bench`) and task sets (`moa eval`) from JSONL, with errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from moa.engine import ChatMessage

DATA = Path(__file__).parent / "data"
DEFAULT_PROMPTS = DATA / "prompts.jsonl"
DEFAULT_TASKS = DATA / "tasks.jsonl"

Scorer = Literal["exact", "numeric", "choice", "regex"]


class DatasetError(ValueError):
    """A prompt or task file the benchmark cannot use; the message names the file and line."""


class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    system: str | None = None

    def conversation(self) -> list[ChatMessage]:
        if self.messages:
            return [{"role": m["role"], "content": m["content"]} for m in self.messages]  # type: ignore[misc]
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": self.prompt or ""}]  # type: ignore[list-item]

    @model_validator(mode="after")
    def _one_input(self) -> _Line:
        if bool(self.prompt) == bool(self.messages):
            raise ValueError("give either `prompt` (a string) or `messages` (a conversation), not both or neither")
        if self.messages and self.messages[-1].get("role") != "user":
            raise ValueError("`messages` must end with a user message")
        return self


class Task(_Line):
    id: str
    # Reference answer (text, number, choice letter or regex). A task without a scorer is an open
    # prompt: it is judged only in pairwise mode.
    answer: str | None = None
    scorer: Scorer | None = None
    category: str = "general"
    choices: list[str] | None = None  # multiple choice: the options, lettered A, B, C... in the prompt
    tolerance: float = 1e-6  # numeric: absolute tolerance

    @property
    def scored(self) -> bool:
        """False for an open prompt (judged pairwise only); what every eval suite's items say."""
        return self.scorer is not None

    @model_validator(mode="after")
    def _choice_letter(self) -> Task:
        if self.scorer is not None and not self.answer:
            raise ValueError(f"scorer {self.scorer} needs an `answer`")
        if self.scorer == "choice":
            letters = "ABCDEFGHIJ"[:len(self.choices or [])] or "ABCDEFGHIJ"
            if self.answer.strip().upper() not in letters:
                raise ValueError(f"scorer choice: answer must be one of the letters {', '.join(letters)}")
        if self.scorer == "numeric":
            try:
                float(self.answer.replace(",", ""))
            except ValueError:
                raise ValueError(f"scorer numeric: answer {self.answer!r} is not a number") from None
        return self


def _read(path: Path, model: type[_Line]) -> list:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            items.append(model.model_validate(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in exc.errors())
            raise DatasetError(f"{path}:{number}: {problems}") from None
    if not items:
        raise DatasetError(f"{path}: no prompts in the file")
    return items


def _first_line(path: Path) -> str:
    if not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8").splitlines()
    return next((line for line in lines if line.strip() and not line.lstrip().startswith("#")), "")


def load_prompts(path: Path | None = None) -> list[list[ChatMessage]]:
    """One conversation per line: {"prompt": "..."} or {"messages": [...]} (a task file works too)."""
    path = path or DEFAULT_PROMPTS
    model = Task if '"id"' in _first_line(path) else _Line
    return [item.conversation() for item in _read(path, model)]


def load_tasks(path: Path | None = None) -> list[Task]:
    """Tasks with an `id`; a plain prompt file works too (open prompts, numbered), for pairwise judging."""
    path = path or DEFAULT_TASKS
    first = _first_line(path)
    if first and '"id"' not in first:
        return [Task(id=f"prompt-{i:02d}", messages=conv) for i, conv in enumerate(load_prompts(path), 1)]
    tasks = _read(path, Task)
    seen: set[str] = set()
    for task in tasks:
        if task.id in seen:
            raise DatasetError(f"{path}: task id {task.id!r} appears twice")
        seen.add(task.id)
    return tasks
