"""A pipeline: a named sequence of steps, and the variants a request or a benchmark derives from it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from moa.prompts import Layout
from moa.steps import LLMStep, Step, Synthesis, writes_answer


@dataclass(frozen=True, slots=True)
class Pipeline:
    name: str
    steps: tuple[Step, ...]
    description: str = ""

    def __post_init__(self) -> None:
        # Steps name their `inputs` by number or by kind; the pipeline holds numbers, each of an earlier step.
        steps = tuple(replace(step, inputs=tuple(self._step_number(at, ref) for ref in step.inputs))
                      if step.inputs else step for at, step in enumerate(self.steps, 1))
        object.__setattr__(self, "steps", steps)

    def _step_number(self, at: int, ref: int | str) -> int:
        earlier = self.steps[:at - 1]
        listing = ", ".join(f"{i} {s.kind}" for i, s in enumerate(earlier, 1)) or "none"
        where = f"pipeline {self.name!r}, step {at} ({self.steps[at - 1].kind})"
        if isinstance(ref, int):
            if not 1 <= ref < at:
                raise ValueError(f"{where}: inputs names step {ref}, but a step reads only earlier steps "
                                 f"(earlier: {listing})")
            return ref
        numbers = [i for i, s in enumerate(earlier, 1) if s.kind == ref]
        if not numbers:
            raise ValueError(f"{where}: inputs names {ref!r}, but no earlier step is one (earlier: {listing})")
        return numbers[-1]

    def models(self) -> tuple[str, ...]:
        """Every model the pipeline calls, in first-use order (the order engines start in)."""
        seen: dict[str, None] = {}
        for step in self.steps:
            if isinstance(step, LLMStep):
                seen.update(dict.fromkeys(step.models_used()))
        return tuple(seen)

    def runs_code(self) -> bool:
        """Whether a step runs model-written code (`check`): a server serves it only with code execution on."""
        return any(step.kind == "check" for step in self.steps)

    def with_models(self, mapping: Mapping[str, str]) -> Pipeline:
        """The same pipeline with models substituted (per-request overrides, tests on small models)."""
        return replace(self, steps=tuple(s.with_models(mapping) if isinstance(s, LLMStep) else s
                                         for s in self.steps))

    def with_layout(self, layout: Layout) -> Pipeline:
        """Every synthesis step with its references placed `layout` (`moa eval` compares the two)."""
        return replace(self, name=f"{self.name}@{layout}", steps=tuple(
            replace(s, layout=layout) if isinstance(s, Synthesis) else s for s in self.steps
        ))

    def with_max_tokens(self, cap: int) -> Pipeline:
        """Cap every LLM step's max_tokens (quick runs, tests)."""
        return replace(self, steps=tuple(
            replace(s, max_tokens=min(s.max_tokens, cap)) if isinstance(s, LLMStep) else s for s in self.steps
        ))

    def with_answer_sampling(self, **sampling: object) -> Pipeline:
        """The step that writes the answer (the last) with a request's temperature / top_p / stop.

        Raises ValueError when the last step picks or reshapes answers instead of writing one, or refuses
        the values (e.g. temperature 0 for a step that samples one model several times).
        """
        if not sampling:
            return self
        last = self.steps[-1]
        if not writes_answer(last):
            raise ValueError(f"{', '.join(sampling)} cannot apply to pipeline {self.name!r}: its answer is "
                             f"picked by its last step ({last.kind}), not written by it")
        return replace(self, steps=(*self.steps[:-1], replace(last, **sampling)))


def engines_needed(models: list[str], pipelines: Mapping[str, Pipeline]) -> list[str]:
    """Every model that gets an engine when serving `models` and `pipelines`, in start order: the named models
    first, then each pipeline's. A model a pipeline needs is served as a base model too."""
    return list(dict.fromkeys([*models, *(m for p in pipelines.values() for m in p.models())]))
