"""Synthesis prompts: strategies (how references are treated), layouts (where they go), budgets.

Layout matters for both quality and speed. "before" puts instructions and
references in the system message ahead of the conversation (as the MoA paper
does); "after" appends them to the last user turn, so the prompt starts exactly
like the model's own proposal prompt and reuses its KV cache. "before" is the
default: it scored higher in `moa eval` (Self-MoA 18 vs 17 of 50 on the 0.5B,
46 vs 43 on the 1.5B; docs/BENCHMARKS.md), "after" is ~8% cheaper in tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from moa.engine import ChatMessage

Layout = Literal["before", "after"]
# The strategy names, once: steps, the HTTP schema and STRATEGIES below all use this.
StrategyName = Literal["moa", "consensus", "council", "best-of", "chain", "self-moa", "critique"]


@dataclass(frozen=True, slots=True)
class ReferenceBudget:
    """Token caps on the references shown to a model: each one, and all of them together."""

    per_reference: int | None = 768
    total: int | None = 2048

    def __post_init__(self) -> None:
        for name in ("per_reference", "total"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"budget.{name} must be >= 1 (or null for no cap), got {value}")


@dataclass(frozen=True, slots=True)
class Strategy:
    name: str
    instruction: str
    layout: Layout = "before"
    json_schema: dict | None = None
    only_last_reference: bool = False


COUNCIL_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "final_answer": {"type": "string"},
        "agreement": {"type": "array", "items": {"type": "string"}},
        "disagreement": {"type": "array", "items": {"type": "string"}},
        "follow_up_questions": {"type": "array", "items": {"type": "string"}},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["final_answer", "agreement", "disagreement", "follow_up_questions", "confidence"],
    "additionalProperties": False,
}

STRATEGIES: dict[str, Strategy] = {
    "moa": Strategy(
        "moa",
        "Other assistants answered the user's latest message; their answers are below as references. "
        "They may be wrong, incomplete or biased. Weigh them critically and write one answer of your own "
        "that is accurate, complete and clearly organised. Do not mention the references.",
    ),
    "consensus": Strategy(
        "consensus",
        "Several assistants answered the user's latest message; their answers are below. Find what most of "
        "them agree on and answer with that. Where they disagree, keep the claim backed by correct reasoning, "
        "not the most repeated one. Reply with the answer only.",
    ),
    "council": Strategy(
        "council",
        "You chair a council of assistants who answered the user's latest message; their answers are below. "
        "Reply with a JSON object: final_answer (the council's best answer, complete), agreement (points the "
        "answers share), disagreement (points where they differ), follow_up_questions (what to ask the user "
        "or check next), confidence (0 to 1).",
        json_schema=COUNCIL_SCHEMA,
    ),
    "best-of": Strategy(
        "best-of",
        "Several candidate answers to the user's latest message are below. Pick the single best one and reply "
        "with it, correcting only clear mistakes. Reply with the answer itself, not its number.",
    ),
    "chain": Strategy(
        "chain",
        "A draft answer to the user's latest message is below. Improve it: fix mistakes, fill gaps, cut what "
        "is irrelevant, keep what is right. Reply with the improved answer only.",
        only_last_reference=True,
    ),
    "self-moa": Strategy(
        "self-moa",
        "Below are several drafts you wrote independently for the user's latest message. Combine their best "
        "parts into one answer. Where the drafts disagree, work out which is right instead of averaging. "
        "Reply with the final answer only.",
    ),
    "critique": Strategy(
        "critique",
        "Candidate answers to the user's latest message are below. Critique each one in detail: what it gets "
        "right, its errors and omissions, and what a correct, complete answer needs. Do not write the final "
        "answer yourself.",
    ),
}

REFINE_INSTRUCTION = (
    "Below is an answer to the user's latest message. Check it carefully and reply with an improved version: "
    "correct errors and fill gaps, keeping what is right. Reply with the answer only."
)
RANK_INSTRUCTION = (
    "Below are numbered answers to the user's latest message. Rank them from best to worst for accuracy and "
    "helpfulness. Reply with the numbers only, best first, separated by commas (for example: 2, 1, 3)."
)
VOTE_INSTRUCTION = (
    "Below are numbered answers to the user's latest message. Which final answer do most of them agree on? "
    "Reply with the number of one answer that gives that majority answer, and nothing else."
)


if set(STRATEGIES) != set(get_args(StrategyName)):
    raise RuntimeError("moa/prompts.py: STRATEGIES and StrategyName name different strategies")


def strategy(name: StrategyName | str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None


def format_references(texts: Sequence[str], labels: Sequence[str] | None = None) -> str:
    """Numbered references; `labels` say where each came from when they come from several kinds of step (the
    answers, and a critique of them)."""
    if len(texts) == 1 and not labels:
        return f"### Reference\n{texts[0]}"
    tags = [f" ({label})" for label in labels] if labels else [""] * len(texts)
    return "\n\n".join(f"### Reference {i}{tag}\n{t}" for i, (t, tag) in enumerate(zip(texts, tags, strict=True), 1))


def build_messages(conversation: Sequence[ChatMessage], instruction: str, references: Sequence[str],
                   layout: Layout, labels: Sequence[str] | None = None) -> list[ChatMessage]:
    """Place the instruction and references before the conversation (system) or after it (last user turn)."""
    block = f"{instruction}\n\n{format_references(references, labels)}" if references else instruction
    messages = [dict(m) for m in conversation]
    if layout == "before":
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{block}"
            return messages  # type: ignore[return-value]
        return [{"role": "system", "content": block}, *messages]  # type: ignore[list-item]
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last]["content"] = f"{messages[last]['content']}\n\n{block}"
    return messages  # type: ignore[return-value]


def fit_references(texts: Sequence[str], budget: ReferenceBudget,
                   count_tokens: Callable[[str], int]) -> tuple[list[str], list[str]]:
    """Trim references to the per-reference cap, then proportionally to the total cap.

    Returns the trimmed texts and notes for the trace (which reference lost how many tokens).
    """
    counts = [count_tokens(t) for t in texts]
    allowed = list(counts)
    if budget.per_reference is not None:
        allowed = [min(c, budget.per_reference) for c in allowed]
    if budget.total is not None and sum(allowed) > budget.total:
        scale = budget.total / sum(allowed)
        allowed = [max(1, int(a * scale)) for a in allowed]
    out, notes = [], []
    for i, (text, have, keep) in enumerate(zip(texts, counts, allowed, strict=True), 1):
        if keep >= have:
            out.append(text)
            continue
        out.append(_truncate(text, keep, have, count_tokens))
        notes.append(f"reference {i} trimmed from {have} to {keep} tokens")
    return out, notes


def _truncate(text: str, keep: int, have: int, count_tokens: Callable[[str], int]) -> str:
    """Cut `text` to about `keep` tokens: a character cut from its own chars-per-token ratio, then checked."""
    cut = int(len(text) * keep / max(have, 1))
    while cut > 0 and count_tokens(text[:cut]) > keep:
        cut = int(cut * 0.9)
    return text[:cut].rstrip() + " …[truncated]"
