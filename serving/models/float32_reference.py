"""The float32 reference an engine's answers are checked against (serving/models/known_answer.py).

Made once per set of weights (at `moa models pull`, or by `moa models check` when missing):
transformers in float32, greedy, on a few fixed prompts, keeping each generated token and how
decisively float32 preferred it (the gap between its top two log-probabilities).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serving.models.store import LocalModel, moa_home, models_dir

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
