"""The `check` step: run each response's code against checks the conversation itself carries.

Why: a code model's samples can be checked objectively and cheaply before anything is kept or
aggregated — the classic way samples beat greedy (AlphaCode's filtering, CodeT, MBR-exec). A
synthesis without checking rewrites working code (issue 24: adaptive-self-moa broke two HumanEval
problems greedy had right). Checks come only from the conversation, never from a benchmark's
hidden tests: the docstring examples in the last user message (`>>> f(x)` then the expected
output, parsed by the stdlib's doctest parser) and `assert` lines the user sent. Comparison is
doctest's own (whitespace-normalised output).

The code runs in the caller's sandbox (a `CodeRunner`: serving/sandbox.py), one process per
response, each check under its own alarm so one endless loop fails that check only. The harness
runs in the same interpreter as the model's code, so a response could fake its own report: the
score is a selection signal, not a security boundary (the sandbox is that).
"""

from __future__ import annotations

import ast
import asyncio
import doctest
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from moa.context import CheckOutcome, LayerFailed, Response, StepContext, handles
from moa.engine import ChatMessage
from moa.steps import Check
from moa.trace import CheckFinished

MARKER = "__MOA_CHECKS__"
LOAD_TIMEOUT_S = 5  # defining the response's code (imports, module-level statements)
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)  # an unclosed block runs to the end
_IMPORT = re.compile(r"^(?:import\s+\w|from\s+[\w.]+\s+import\s)")


@dataclass(frozen=True, slots=True)
class CodeCheck:
    kind: Literal["example", "equals", "assert"]
    source: str  # an example's statement, the call of an `equals` check, or an assert statement
    want: str = ""  # an example's expected output, or the expression an `equals` call must equal


def extract_code(text: str) -> str:
    """A response's code: its first ```python block, else its first fenced block of any kind (one cut off by
    max_tokens runs to the end), else the whole text. The HumanEval scorer reads answers the same way."""
    blocks = [(lang.lower(), body) for lang, body in _OPEN_FENCE.findall(text)]
    for lang, body in blocks:
        if lang in ("python", "py", "python3"):
            return body
    return blocks[0][1] if blocks else text


def checks_from(conversation: Sequence[ChatMessage]) -> list[CodeCheck]:
    """The checks the last user message carries: doctest examples; usage lines such as `f(3) == 5`,
    `f(3) ➞ 5` or `f(3) should return 5` for a function the user's code defines (literal arguments and a
    literal result only); and `assert` lines."""
    text = _last_user(conversation)
    examples = [_example(e) for e in _doctest_examples(text)]
    defined = set(re.findall(r"^\s*def\s+(\w+)\s*\(", text, re.MULTILINE))
    usage = [] if examples else [c for line in text.splitlines() if (c := _usage_line(line, defined))]
    # Only top-level assert lines that parse: an `assert` inside a function body or in prose is not a check.
    asserts = [CodeCheck("assert", line.strip()) for line in text.splitlines()
               if line.startswith("assert ") and _parses(line)]
    return examples + usage + asserts


def _example(example: doctest.Example) -> CodeCheck:
    """A doctest example; `>>> f(x) == y` with no output line (a common docstring shorthand) asserts it."""
    want = _want(example.want)
    try:
        node = ast.parse(example.source, mode="eval").body
    except SyntaxError:
        node = None
    if not want.strip() and isinstance(node, ast.Compare):
        return CodeCheck("assert", f"assert {example.source.strip()}")
    return CodeCheck("example", example.source, want)


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
        return True
    except (SyntaxError, ValueError):
        return False


def _doctest_examples(text: str) -> list[doctest.Example]:
    """doctest's own parser over the message with code fences blanked; a paragraph it refuses (inconsistent
    indentation) is skipped rather than losing every example."""
    text = "\n".join("" if line.strip().startswith("```") else line for line in text.splitlines())
    parser = doctest.DocTestParser()
    try:
        return parser.get_examples(text)
    except ValueError:
        examples = []
        for paragraph in re.split(r"\n\s*\n", text):
            try:
                examples += parser.get_examples(paragraph)
            except ValueError:
                continue
        return examples


def _want(want: str) -> str:
    """An example's expected output, cut at the docstring's closing quotes or a code fence (doctest reads up to
    a blank line, and docstrings often close right after the output, with the function body below)."""
    lines = []
    for line in want.splitlines():
        if line.strip().startswith(('"""', "'''", "```")):
            break
        lines.append(line)
    return "\n".join(lines) + "\n" if lines else ""


_USAGE = re.compile(r"^[\s*\-'\"]*(?P<call>[A-Za-z_]\w*\(.*\))\s*(?:==>|==|=>|➞|->|=|#?\s*should return|#?\s*returns)"
                    r"\s*(?P<want>.+?)\s*\.?\s*$")
_WORDS = {"true": "True", "false": "False", "none": "None", "null": "None"}


def _usage_line(line: str, defined: set[str]) -> CodeCheck | None:
    """`name(literal args) <arrow> literal` for a function the user defines, as an assert; else None."""
    match = _USAGE.match(line)
    if match is None:
        return None
    call, want = match["call"], _WORDS.get(match["want"].lower(), match["want"])
    try:
        node = ast.parse(call, mode="eval").body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in defined):
            return None
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            ast.literal_eval(arg)
        ast.literal_eval(want)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None
    return CodeCheck("equals", call, want)


def user_code(conversation: Sequence[ChatMessage]) -> str:
    """The user's own code, which a response's code runs after (as it would in the user's file): its fenced
    blocks where they parse as Python (imports, helper functions, the stub itself), else their import lines."""
    text = _last_user(conversation)
    bodies = [body for _, body in _FENCE.findall(text)]
    if not bodies and _parses(text):
        bodies = [text]
    return "\n".join(body if _parses(body) else "\n".join(line for line in body.splitlines() if _IMPORT.match(line))
                     for body in bodies)


def response_code(response: str, context: str) -> str:
    """A response's code; where it only continued the user's function (defines none of the user's functions),
    the user's code with the continuation appended — the way the HumanEval scorer reads such answers."""
    code = extract_code(response)
    wanted = set(re.findall(r"^def\s+(\w+)\s*\(", context, re.MULTILINE))
    if wanted and not wanted & set(re.findall(r"^\s*(?:async\s+)?def\s+(\w+)\s*\(", code, re.MULTILINE)):
        return context.rstrip("\n") + "\n" + code
    return code


def _last_user(conversation: Sequence[ChatMessage]) -> str:
    return next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")


def harness(code: str, checks: Sequence[CodeCheck], context: str = "", per_check_s: float = 2.0) -> str:
    """The program the sandbox runs: the user's code, then the response's (separate compile units, so either may
    start with a `from __future__` import), each check under an alarm, one JSON report."""
    payload = json.dumps([{"kind": c.kind, "source": c.source, "want": c.want} for c in checks])
    return f'''import ast, contextlib, doctest, io, json, signal, sys
def _alarm(signum, frame):
    raise TimeoutError("check timed out")
signal.signal(signal.SIGALRM, _alarm)
_checks = json.loads({payload!r})
_ns = {{"__name__": "__main__"}}
_err = None
try:
    signal.setitimer(signal.ITIMER_REAL, {LOAD_TIMEOUT_S})
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            exec(compile({context!r}, "<question>", "exec"), _ns)
        except Exception:
            pass  # the user's own code may not run alone; the response's is what is checked
        exec(compile({code!r}, "<response>", "exec"), _ns)
except BaseException as e:
    _err = type(e).__name__ + ": " + str(e)
finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
_checker, _out = doctest.OutputChecker(), []
for _c in _checks:
    if _err is not None:
        _out.append([False, _err[:200]])
        continue
    _buf = io.StringIO()
    try:
        signal.setitimer(signal.ITIMER_REAL, {per_check_s})
        with contextlib.redirect_stdout(_buf):
            if _c["kind"] == "equals":  # the value itself is the output: responses agree or differ on it
                _value = eval(compile(_c["source"], "<check>", "eval"), _ns)
            else:
                exec(compile(_c["source"], "<check>", "single" if _c["kind"] == "example" else "exec"), _ns)
        signal.setitimer(signal.ITIMER_REAL, 0)
        if _c["kind"] == "equals":
            _got, _ok = repr(_value), _value == eval(_c["want"], {{}})
        else:
            _got = _buf.getvalue()
            _ok = _c["kind"] == "assert" or _checker.check_output(_c["want"], _got, doctest.NORMALIZE_WHITESPACE)
            if not _ok and _c["kind"] == "example":  # the same value written another way ('21' for "21")
                try:
                    _ok = ast.literal_eval(_got.strip()) == ast.literal_eval(_c["want"].strip())
                except Exception:
                    pass
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _got, _ok = type(e).__name__ + ": " + str(e), False
    _out.append([bool(_ok), _got[:200]])
sys.__stdout__.write("\\n{MARKER}" + json.dumps(_out) + "\\n")
sys.__stdout__.flush()
'''


def parse_report(stdout: str, total: int) -> CheckOutcome:
    """The harness's last report line; a program that died before it passes nothing."""
    lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
    try:
        report = json.loads(lines[-1][len(MARKER):]) if lines else None
    except ValueError:
        report = None
    try:
        if isinstance(report, list) and len(report) == total:
            return CheckOutcome(sum(bool(ok) for ok, _ in report), total, tuple(str(got) for _, got in report))
    except (TypeError, ValueError):  # a malformed report line (the response printed its own)
        pass
    return CheckOutcome(0, total)  # no outputs: it agrees with nobody


async def check_response(runner, response: Response, checks: Sequence[CodeCheck], context: str,
                         per_check_s: float) -> CheckOutcome:
    code = response_code(response.text, context)
    result = await runner.run_python(harness(code, checks, context, per_check_s))
    return parse_report(getattr(result, "stdout", ""), len(checks))


def ordered(responses: Sequence[Response]) -> list[Response]:
    """Most checks passed first; ties: the response whose outputs most others share (MBR-exec's agreement),
    then the original order (so a greedy answer proposed first wins a tie)."""
    signatures = Counter(r.checks.outputs for r in responses if r.checks is not None and r.checks.outputs)

    def key(item: tuple[int, Response]) -> tuple[int, int, int]:
        i, r = item
        agree = signatures[r.checks.outputs] if r.checks is not None and r.checks.outputs else 0
        return (-(r.checks.passed if r.checks else 0), -agree, i)

    return [r for _, r in sorted(enumerate(responses), key=key)]


def reference_text(response: Response) -> str:
    """A reference as a synthesis sees it: with its check result in front, where a check ran."""
    c = response.checks
    if c is None or c.total == 0:
        return response.text
    return f"[Checked against the examples in the question: passes {c.passed} of {c.total}.]\n{response.text}"


@handles(Check)
async def check(ctx: StepContext, step: Check, current: list[Response]) -> list[Response]:
    if ctx.code_runner is None:
        raise LayerFailed("a check step runs model-written code, and code execution is off here "
                          "(moa serve --allow-code-execution, or server.code_execution: true in models.yaml)", [])
    checks = checks_from(ctx.conversation)
    if not checks:
        ctx.note("no checks in the conversation (no >>> examples, no assert lines): responses kept as they are")
        return current
    context = user_code(ctx.conversation)
    todo = [r for r in current if r.checks is None or r.checks.total != len(checks)]  # earlier checks stand
    outcomes = await asyncio.gather(*(check_response(ctx.code_runner, r, checks, context, step.check_timeout_s)
                                      for r in todo))
    for response, outcome in zip(todo, outcomes, strict=True):
        response.checks = outcome
        call, index = response.origin or (-1, -1)
        ctx.calls.emit(CheckFinished(step.kind, ctx.layer, call, index, response.model, outcome.passed, outcome.total))
    out = ordered(current) if step.order else list(current)
    ctx.note(f"checks: {len(checks)} from the conversation; passed per response "
             f"{[f'{r.checks.passed}/{r.checks.total}' for r in current]}"
             + (f"; ran {len(todo)} program(s)" if len(todo) != len(current) else ""))
    return out
