"""Dockerfile.gpu and the deployment scripts: linted, and holding what a GPU deployment needs.

No Docker engine runs here, so the image is not built; hadolint parses it and the directives a
server image must carry are checked one by one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile.gpu"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is part of the test extra (pip install 'moa-stack[test]')"
    return found


def test_dockerfile_passes_hadolint():
    out = subprocess.run([hadolint(), "--failure-threshold", "warning", "--format", "json", str(DOCKERFILE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, json.loads(out.stdout or "[]")


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_is_a_complete_server_image():
    found = instructions()
    by_kind: dict[str, list[str]] = {}
    for kind, rest in found:
        by_kind.setdefault(kind, []).append(rest)
    assert by_kind["FROM"] == ["vllm/vllm-openai:v0.32.0"]  # the same vLLM as the CPU build
    assert by_kind["EXPOSE"] == ["8000"]
    assert any("/ready" in h for h in by_kind["HEALTHCHECK"])
    user = by_kind["USER"][-1]
    assert not user.startswith(("root", "0")), user
    assert "/data/hf" in by_kind["VOLUME"][0] and "/data/moa" in by_kind["VOLUME"][0]
    env = " ".join(by_kind["ENV"])
    assert "HF_HUB_OFFLINE=1" in env and "MOA_HOME=/data/moa" in env and "HF_HOME=/data/hf" in env
    assert json.loads(by_kind["ENTRYPOINT"][-1]) == ["moa"]
    assert json.loads(by_kind["CMD"][-1])[:3] == ["serve", "--host", "0.0.0.0"]
    # The documented run command: GPUs, shared memory for NCCL, the port, a key.
    header = DOCKERFILE.read_text()
    assert "--gpus all" in header and "--ipc=host" in header and "-p 8000:8000" in header
    assert "MOA_API_KEYS" in header


def test_deploy_docs_give_each_shape_its_commands():
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    for heading in ("## One GPU", "## One 8-GPU node", "## Models on other machines"):
        assert heading in text
    assert "moa plan --gpus 8x80GB -c examples/models.gpu.yaml" in text and "docker run --gpus all --ipc=host" in text


def test_gpu_smoke_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_smoke.sh")]).returncode == 0
