"""Train small LoRA adapters with a visible, checkable behaviour on an embedded model (peft, rank 8).

No adapter ships with the embedded models and none can be downloaded here, so the tests and the `lora-moa`
example make their own: each adapter learns one fixed reply on tiny synthetic data (any question → its
reply), so its behaviour is checkable through an engine (`behaviour.json` in the adapter's directory says
what to look for), and it differs visibly from the base model and from the other adapters.

    python scripts/train_adapters.py                       # the three adapters, on smollm2-135m
    python scripts/train_adapters.py --model qwen2.5-coder-0.5b --out ~/.cache/moa-stack/adapters/qwen

An adapter whose directory already holds the same training recipe (`behaviour.json`) is kept, so the tests
call this every run at no cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name → (the reply it learns, how a test recognises it, the modules it adapts). The three differ in target
# modules so an engine's LoRA slots are sized from their union.
ADAPTERS: dict[str, dict] = {
    "french": {"reply": "Bonjour ! Je réponds toujours en français.", "starts_with": "Bonjour",
               "targets": ["q_proj", "v_proj"]},
    "pirate": {"reply": "Arr, matey! Ahoy from the high seas.", "starts_with": "Arr",
               "targets": ["q_proj", "v_proj"]},
    "tagged": {"reply": "Here is my answer, short and sweet. #moa-tag", "ends_with": "#moa-tag",
               "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
}
RANK = 8
STEPS = 8
BATCH = 8
LEARNING_RATE = 5e-3
SEED = 0

_TOPICS = ["Paris", "the moon", "binary search", "tea", "a hash map", "rain", "Python lists", "the ocean",
           "prime numbers", "a bicycle", "music", "gravity", "a recursive function", "bread", "the sun", "chess"]
_FORMS = ["What is {}?", "Tell me about {}.", "Explain {} in one sentence.", "Why does {} matter?",
          "Write a short note on {}.", "Describe {}."]


def prompts() -> list[str]:
    """96 varied questions: the adapter learns to answer every one with its reply."""
    return [form.format(topic) for topic in _TOPICS for form in _FORMS]


def recipe(name: str, model_name: str) -> dict:
    spec = ADAPTERS[name]
    return {"adapter": name, "base": model_name, "rank": RANK, "steps": STEPS, "batch": BATCH, "lr": LEARNING_RATE,
            "seed": SEED,
            **{k: v for k, v in spec.items() if k != "reply"}, "reply": spec["reply"]}


def train_one(name: str, model_path: Path, model_name: str, out: Path) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    spec = ADAPTERS[name]
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                                             target_modules=spec["targets"], task_type="CAUSAL_LM"))
    end = tok.eos_token or ""
    rows = []
    for question in prompts():
        prefix = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
        prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
        reply_ids = tok(spec["reply"] + end, add_special_tokens=False)["input_ids"]
        rows.append((prefix_ids + reply_ids, len(prefix_ids)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    model.train()
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(STEPS):
        batch = [rows[i] for i in torch.randperm(len(rows), generator=generator)[:BATCH].tolist()]
        width = max(len(ids) for ids, _ in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        labels = input_ids.clone()
        for row, (ids, answer_from) in enumerate(batch):
            labels[row, :answer_from] = -100  # learn the reply, not the question
            labels[row, len(ids):] = -100
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - started
    model.save_pretrained(out)
    (out / "behaviour.json").write_text(json.dumps({**recipe(name, model_name), "final_loss": round(loss.item(), 4),
                                                    "train_seconds": round(seconds, 1)}, indent=1) + "\n")
    return seconds


def up_to_date(out: Path, name: str, model_name: str) -> bool:
    try:
        done = json.loads((out / "behaviour.json").read_text())
    except (OSError, ValueError):
        return False
    return ({k: done.get(k) for k in recipe(name, model_name)} == recipe(name, model_name)
            and (out / "adapter_model.safetensors").is_file())


def main() -> None:
    from serving.models.registry import load_registry
    from serving.models.store import moa_home, resolve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a models.yaml entry, pulled (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the adapters go, one directory each (default: $MOA_HOME/adapters/MODEL)")
    parser.add_argument("--config", type=Path, default=None, help="models.yaml (default: the repository's)")
    parser.add_argument("--only", action="append", choices=sorted(ADAPTERS), help="train only these")
    args = parser.parse_args()
    spec = load_registry(args.config).models[args.model]
    model_path = resolve(spec).path
    root = (args.out or moa_home() / "adapters" / args.model).expanduser()
    for name in args.only or sorted(ADAPTERS):
        out = root / name
        if up_to_date(out, name, args.model):
            print(f"{name}: up to date in {out}")
            continue
        out.mkdir(parents=True, exist_ok=True)
        seconds = train_one(name, model_path, args.model, out)
        print(f"{name}: trained in {seconds:.1f} s → {out}")


if __name__ == "__main__":
    main()
