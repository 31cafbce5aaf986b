"""scripts/setup.sh hands pip's package sources to uv (scripts/pip_sources.py): both installers must install
from the same places under the same caps, or a uv install could differ from a pip one on the same machine."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _sources():
    spec = importlib.util.spec_from_file_location("pip_sources", ROOT / "scripts" / "pip_sources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sources


def test_pip_settings_become_uv_flags_with_pips_own_precedence():
    listing = "\n".join([
        "global.cert='/etc/ssl/certs/ca.crt'",
        "global.constraint='/etc/xdg/pip/constraints.txt'",
        "global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'",
        "global.find-links='/opt/old-wheels'",
        "global.timeout='60'",  # not a source: ignored
        "install.index-url='https://mirror.example/simple'",
        ":env:.find-links='/opt/wheels'",  # an environment variable wins over the files, as in pip
        "site.find-links='/ignored'",  # a section pip does not apply to `install`
    ])
    assert sorted(_sources()(listing)) == sorted([
        ("cert", "/etc/ssl/certs/ca.crt"),
        ("--constraint", "/etc/xdg/pip/constraints.txt"),
        ("--extra-index-url", "file:///opt/pypi/simple"),
        ("--extra-index-url", "file:///opt/pypi-more/simple"),
        ("--find-links", "/opt/wheels"),
        ("--index-url", "https://mirror.example/simple"),
    ])
    assert _sources()("") == []


def test_setup_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")], check=True)
