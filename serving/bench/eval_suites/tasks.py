"""The `tasks` suite: a JSONL task file (the built-in 50 by default), graded by serving/bench/scoring.py."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from serving.bench.datasets import DEFAULT_TASKS, DatasetError, Task, load_tasks
from serving.bench.eval_suites import Published
from serving.bench.scoring import score


class TaskSuite:
    name = "tasks"
    metric: Literal["accuracy", "pass@k"] = "accuracy"
    max_tokens = 256  # short answers: a final number, word or letter

    def __init__(self, path: Path | None = None) -> None:
        self.path = path

    def describe(self) -> str:
        return str(self.path or DEFAULT_TASKS.name)

    def load(self) -> list[Task]:
        try:
            return load_tasks(self.path)
        except DatasetError as exc:
            raise ValueError(str(exc)) from None

    async def score(self, item: Task, response: str) -> bool:
        return item.scored and score(item, response)  # regexes and string checks: no need to leave the loop

    def published(self, model: str) -> Published | None:
        return None

    def prepare(self) -> dict[str, str]:
        return {}
