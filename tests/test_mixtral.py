"""Mixtral (a mixture of experts) through the real vLLM CPU engine, inside a pipeline.

A tiny random-weight Mixtral (2 layers, 4 experts, top-2 routing) with SmolLM2's tokenizer: its text
is noise, but loading, expert routing, n=k sampling and the pipeline around it are the real paths the
mission's Mixtral-8x7B takes on a GPU.
"""

from __future__ import annotations

import textwrap

import pytest

from moa.pipeline import Pipeline
from moa.runner import run
from moa.steps import Aggregate, Propose
from serving.engines.pool import EnginePool
from serving.models.registry import load_registry
from serving.models.store import resolve
from tests.conftest import FRANCE, SMALL

pytestmark = pytest.mark.vllm
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory, registry, local_model):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    smol = resolve(local_model(SMALL)).path
    directory = tmp_path_factory.mktemp("tiny-mixtral")
    config = MixtralConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(str(directory))
    for name in TOKENIZER_FILES:
        if (smol / name).exists():
            (directory / name).write_bytes((smol / name).read_bytes())
    path = tmp_path_factory.mktemp("config") / "models.yaml"
    path.write_text(textwrap.dedent(f"""
        default_model: tiny-mixtral
        models:
          tiny-mixtral:
            backend: vllm
            source: {{kind: hf-dir, path: {directory}}}
            engine: {{dtype: bfloat16, max_model_len: 2048, cpu_kv_cache_gib: 0.125}}
    """))
    return load_registry(path)


async def test_mixtral_proposes_n3_in_one_request_and_aggregates(tiny_mixtral):
    pipeline = Pipeline("mixtral-self-moa", (Propose(models=("tiny-mixtral",), samples=3, max_tokens=12),
                                             Aggregate(model="tiny-mixtral", max_tokens=12)))
    async with EnginePool(tiny_mixtral, ["tiny-mixtral"]) as pool:
        engine = pool["tiny-mixtral"]
        assert engine._llm.model_config.architectures == ["MixtralForCausalLM"]
        assert engine._llm.model_config.hf_config.num_local_experts == 4
        result = await run(pipeline, FRANCE, pool.engines, seed=7)
        assert engine.running_requests == 0
    calls = result.trace.calls
    assert [(c.step, c.n, c.status) for c in calls] == [("propose", 3, "ok"), ("aggregate", 1, "ok")]
    assert calls[0].completion_tokens > 0 and calls[1].prompt_tokens > calls[0].prompt_tokens
    assert result.usage.engine_calls == 2 and result.answer is not None
