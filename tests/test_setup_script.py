"""scripts/setup.sh hands pip's package sources to uv (scripts/pip_sources.py): both installers must install
from the same places under the same caps, or a uv install could differ from a pip one on the same machine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _flags(tmp_path, config: str, **env: str) -> list[str]:
    path = tmp_path / "pip.conf"
    path.write_text(textwrap.dedent(config))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "pip_sources.py")], capture_output=True,
                            text=True, check=True, env={**clean, "PIP_CONFIG_FILE": str(path), **env})
    return result.stdout.splitlines()


def test_pips_own_sources_become_uv_flags_multi_line_values_and_the_environment_included(tmp_path):
    config = """
        [global]
        index-url = https://mirror.example/simple
        extra-index-url =
            file:///opt/pypi/simple
            file:///opt/pypi-more/simple
        find-links = /opt/old-wheels
        constraint = /etc/xdg/pip/constraints.txt
        trusted-host = mirror.example
        cert = /etc/ssl/certs/ca.crt
        timeout = 60
    """
    flags = _flags(tmp_path, config, PIP_FIND_LINKS="/opt/wheels")  # the environment wins, as in pip
    assert flags == ["--index-url https://mirror.example/simple", "--extra-index-url file:///opt/pypi/simple",
                     "--extra-index-url file:///opt/pypi-more/simple", "--find-links /opt/wheels",
                     "--constraint /etc/xdg/pip/constraints.txt", "--allow-insecure-host mirror.example",
                     "cert /etc/ssl/certs/ca.crt"]
    offline = _flags(tmp_path, "[global]\nno-index = true\nfind-links = /opt/wheels\n")
    assert offline[:2] == ["--no-index", "--find-links /opt/wheels"]  # never pypi.org where pip would not go


def test_setup_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")], check=True)
