"""Presets in models.yaml: all parse, bad ones fail naming pipeline, step and field."""

from __future__ import annotations

import pytest

from moa.presets import PresetError, parse_pipeline, parse_pipelines
from moa.steps import Aggregate, AggregateSeq, Propose, Synthesize
from moa.transform_steps import Dropout, Shuffle
from serving.models.registry import RegistryError, load_registry

REQUIRED = {"together-moa", "moa-lite", "self-moa", "self-moa-seq", "robust-moa", "pyramid", "council",
            "consensus", "best-of", "chain", "moa"}


def test_shipped_presets_parse_and_use_embedded_models(registry):
    assert REQUIRED <= set(registry.pipeline_names)
    for name in registry.pipeline_names:
        pipeline = registry.pipeline(name)
        # Adapter targets (BASE:ADAPTER) count as their base's.
        assert {registry.get(m).name for m in pipeline.models()} <= {
            n for n, s in registry.models.items() if "embedded" in s.tags}, name


def test_preset_shapes(registry):
    together = registry.pipeline("together-moa").steps
    assert [type(s) for s in together] == [Propose, Synthesize, Synthesize, Aggregate]
    assert [type(s) for s in registry.pipeline("moa-lite").steps] == [Propose, Aggregate]
    self_moa = registry.pipeline("self-moa").steps[0]
    assert self_moa.models == ("qwen2.5-coder-1.5b",) and self_moa.samples == 6
    assert isinstance(registry.pipeline("self-moa-seq").steps[1], AggregateSeq)
    assert {Shuffle, Dropout} <= {type(s) for s in registry.pipeline("robust-moa").steps}
    widths = [len(s.models) * getattr(s, "samples", 1) for s in registry.pipeline("pyramid").steps[:2]]
    assert widths[0] > widths[1] > 1
    assert registry.pipeline("council").steps[-1].strategy == "council"


@pytest.mark.parametrize(("steps", "message"), [
    ([{"propose": {"models": ["a"], "temprature": 1}}], r"step 1 \(propose\): unknown field\(s\) \['temprature'\]"),
    ([{"propose": {"models": ["a"]}}, {"blend": {}}], "step 2: unknown step kind 'blend'"),
    ([{"propose": {"models": ["zzz"]}}], r"step 1: unknown model\(s\) \['zzz'\]"),
    ([{"aggregate": {"model": "a"}}], "the first step must be one of `propose`"),
    ([{"propose": {"models": ["a"], "quorum": 5}}], "quorum 5 must be between 1 and the 1 samples"),
    ([{"propose": {"models": ["a"], "samples": 3, "temperature": 0}}], "needs temperature > 0"),
    ([{"propose": {"models": ["a"]}}, {"aggregate": {"model": "a", "strategy": "magic"}}], "step 2 .*strategy"),
    ([{"propose": {"models": []}}], "at least one model"),
    ([{"propose": {"models": ["a"], "max_tokens": 0}}], r"step 1 \(propose\): max_tokens must be >= 1"),
    ([{"propose": {"models": ["a"]}}, {"aggregate": {"model": "a", "temperature": 3}}], "temperature must be between"),
    ([{"propose": {"models": ["a"]}}, {"filter": {"pattern": "("}}], "not a valid regular expression"),
])
def test_bad_presets_name_pipeline_step_and_field(steps, message):
    with pytest.raises(PresetError, match=message):
        parse_pipeline("p", {"steps": steps}, {"a"})


def test_pipeline_and_model_names_must_differ():
    with pytest.raises(PresetError, match="also model names"):
        parse_pipelines({"a": {"steps": [{"propose": {"models": ["a"]}}]}}, {"a"})


def test_registry_error_names_the_file(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("default_model: m\nmodels:\n  m: {source: {kind: hf-dir, path: /x}}\n"
                    "pipelines:\n  p: {steps: [{propose: {models: [m], samples: x}}]}\n")
    with pytest.raises(RegistryError, match=f"{path}: pipeline 'p', step 1 \\(propose\\): field samples"):
        load_registry(path)


def test_with_models_and_max_tokens(registry):
    small = registry.pipeline("moa-lite").with_models({"qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b"}).with_max_tokens(16)
    assert "qwen2.5-coder-1.5b" not in small.models()
    assert all(s.max_tokens <= 16 for s in small.steps)
