"""The sandbox that runs model-written code: each threat is tried for real and must be stopped or denied, score as
not passed, and leave this process and the host as they were. No model needed; each test takes a few seconds."""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from serving import sandbox
from serving.sandbox import Limits, Sandbox

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
QUICK = Limits(wall_s=3, cpu_s=3, memory_mb=256, max_procs=16, max_output_kb=16)

FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


@pytest.fixture(scope="module")
def box() -> Sandbox:
    return Sandbox(QUICK)


@pytest.fixture(scope="module")
def isolated() -> None:
    """Tests of what bwrap confines skip (and say why) where only rlimits are available."""
    if not sandbox.available().startswith("bwrap"):
        pytest.skip(f"no namespace isolation here: {sandbox.available()}")


@pytest.fixture
def scratch_dirs(monkeypatch) -> list[Path]:
    """Every scratch dir the sandbox makes during a test."""
    made: list[Path] = []
    real = tempfile.mkdtemp

    def recording(*args, **kwargs) -> str:
        path = real(*args, **kwargs)
        made.append(Path(path))
        return path

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", recording)
    return made


_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _others_before() -> None:
    """This process's descendants at a test's start are not sandboxes: in a whole-suite run they are the engines
    other modules' fixtures keep alive (and a zombie one may not have reaped yet)."""
    _BEFORE.clear()
    _BEFORE.update(p.pid for p in psutil.Process().children(recursive=True))


def sandbox_processes() -> list[psutil.Process]:
    """Sandboxes are this process's descendants the test started (bwrap, its pid-namespace init, the program and
    its forks)."""
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in _BEFORE]


def leftover_cgroups() -> list[Path]:
    parent = sandbox._isolation().cgroup_parent
    return list(parent.glob(f"moa-sandbox-{os.getpid()}-*")) if parent else []


async def test_a_passing_program(box):
    result = await box.run_python("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('fine')\n")
    assert result.ok and result.status == "passed", result
    assert result.exit_code == 0 and result.stdout == "fine\n"
    assert result.isolated == sandbox.available().startswith("bwrap")


async def test_a_failing_assert(box):
    result = await box.run_python("assert sorted([3, 1, 2]) == [3, 2, 1]\n")
    assert result.status == "failed" and not result.ok
    assert result.exit_code == 1 and "AssertionError" in result.stderr


async def test_only_the_stdlib(box):
    result = await box.run_python("import json, re, math, typing, collections\nimport yaml\n")
    assert result.status == "failed" and "No module named 'yaml'" in result.stderr


@pytest.mark.parametrize("target", ["loopback", "outside"])
async def test_no_network(box, isolated, target):
    connections = []
    server = await asyncio.start_server(lambda r, w: connections.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    address = ("127.0.0.1", port) if target == "loopback" else ("1.1.1.1", 53)
    try:
        result = await box.run_python(f"import socket\nsocket.create_connection({address!r}, timeout=2)\n")
    finally:
        server.close()
    assert result.status == "failed", result
    assert ("ConnectionRefusedError" in result.stderr) if target == "loopback" else ("unreachable" in result.stderr)
    assert connections == []


async def test_sees_only_its_own_world(box, isolated):
    result = await box.run_python(
        "import os, socket\n"
        "print(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
        "print(socket.if_nameindex(), socket.gethostname(), os.getuid())\n"
        f"print([p for p in ('/etc/passwd', '/home', {str(REPO)!r}) if os.path.exists(p)])\n"
        f"print(sorted(os.listdir({str(Path.home())!r})) if os.path.exists({str(Path.home())!r}) else [])\n")
    assert result.ok, result
    procs, net, visible, home = result.stdout.splitlines()
    assert procs == "['1', '2']"  # bwrap's init and the program
    assert net == "[(1, 'lo')] sandbox 65534"
    assert visible == "[]"
    # Only the way to the interpreter's prefix (pyenv's lives under /root) is in the home directory.
    assert all(Path.home() / name in Path(sys.base_prefix).parents for name in ast.literal_eval(home)), home


@pytest.mark.parametrize("where", ["repo", "home", "usr", "root", "dev"])
async def test_cannot_write_outside_scratch(box, isolated, where):
    name = f".sandbox-escape-{uuid.uuid4().hex}"
    target = {"repo": REPO, "home": Path.home(), "usr": Path("/usr"), "root": Path("/"), "dev": Path("/dev")}[where]
    result = await box.run_python(f"open({str(target / name)!r}, 'w').write('escaped')\n")
    assert result.status == "failed", result
    assert "Read-only file system" in result.stderr or "No such file or directory" in result.stderr
    assert not (target / name).exists()


async def test_tmp_is_private(box, isolated, scratch_dirs):
    name = f"sandbox-tmp-{uuid.uuid4().hex}"
    result = await box.run_python(f"open('/tmp/{name}', 'w').write('x')\nopen('here', 'w').write('x')\nprint('ok')\n")
    assert result.ok, result
    assert not (Path("/tmp") / name).exists()
    assert scratch_dirs and not scratch_dirs[0].exists()  # the one writable host path is gone afterwards


async def test_the_scratch_dir_is_removed(box, scratch_dirs):
    for source in ("open('out.txt', 'w').write('x' * 1000)\n", "raise SystemExit(3)\n", "while True: pass\n"):
        await box.run_python(source, limits=Limits(wall_s=1))
    assert len(scratch_dirs) == 3 and not any(d.exists() for d in scratch_dirs)


async def test_concurrent_runs_do_not_see_each_other(box, isolated):
    program = ("import os, time\nopen('{me}', 'w').write('x')\nopen('/tmp/{me}', 'w').write('x')\ntime.sleep(0.5)\n"
               "assert set(os.listdir('.')) == {{'main.py', '{me}'}}, os.listdir('.')\n"
               "assert os.listdir('/tmp') == ['{me}'], os.listdir('/tmp')\n")
    first, second = await asyncio.gather(box.run_python(program.format(me="first")),
                                         box.run_python(program.format(me="second")))
    assert first.ok, first
    assert second.ok, second


async def test_fork_bomb(box, isolated):
    """Held at max_procs by the pids cgroup (root ignores RLIMIT_NPROC) until the wall clock stops it."""
    during: list[tuple[int, int]] = []

    async def watch() -> None:
        await asyncio.sleep(1.5)
        spawned = await asyncio.create_subprocess_exec("true")
        during.append((await spawned.wait(), len(sandbox_processes())))

    limits = Limits(wall_s=3, max_procs=16)
    started = time.monotonic()
    result, _ = await asyncio.gather(box.run_python(FORK_BOMB, limits=limits), watch())
    assert result.status == "timeout", result
    assert time.monotonic() - started < limits.wall_s + 3
    [(code, count)] = during
    assert code == 0  # the host spawned a process mid-bomb
    if sandbox._isolation().cgroup_parent is not None:
        assert count <= limits.max_procs + 2 + 1  # + bwrap and its init, + `true` if not yet reaped
    assert subprocess.run(["true"]).returncode == 0
    assert sandbox_processes() == []
    assert leftover_cgroups() == []


async def test_ten_gigabytes(box):
    result = await box.run_python("block = bytearray(10 * 1024**3)\nprint(len(block))\n")
    assert result.status == "failed" and "MemoryError" in result.stderr, result
    assert psutil.Process().memory_info().rss < 2 * 1024**3


async def test_endless_loop(box):
    started = time.monotonic()
    result = await box.run_python("while True:\n    pass\n", limits=Limits(wall_s=1.5, cpu_s=10))
    assert result.status == "timeout" and result.exit_code is None, result
    assert "wall-clock limit" in result.stderr
    assert time.monotonic() - started < 1.5 + 3
    assert sandbox_processes() == [] and leftover_cgroups() == []


async def test_cpu_limit(box):
    """Stopped by RLIMIT_CPU (status killed), long before the wall clock (status timeout) would."""
    result = await box.run_python("while True:\n    pass\n", limits=Limits(wall_s=20, cpu_s=1))
    assert result.status == "killed" and result.exit_code in (-9, -24), result  # SIGKILL or SIGXCPU


async def test_endless_output(box):
    result = await box.run_python("while True:\n    print('x' * 100)\n")
    assert result.status == "killed", result
    assert len(result.stdout) <= QUICK.max_output_kb * 1024 and "more than 16 KiB" in result.stderr
    assert sandbox_processes() == []


async def test_rlimits_only_fallback(box, monkeypatch, caplog):
    """Where bwrap cannot start: said loudly once, and programs still run with limits, reported as not isolated."""
    with caplog.at_level(logging.WARNING, logger="serving.sandbox"):
        plain = sandbox.choose([("/nonexistent/bwrap", "test")])
    assert plain.bwrap is None and plain.label.startswith("rlimits only: /nonexistent/bwrap")
    assert any("rlimits ONLY" in r.message and "/nonexistent/bwrap" in r.message for r in caplog.records)
    monkeypatch.setattr(sandbox, "_chosen", plain)
    passed = await box.run_python("print(2 + 2)\n")
    assert passed.ok and passed.stdout == "4\n" and not passed.isolated
    looped = await box.run_python("while True:\n    pass\n", limits=Limits(wall_s=1))
    assert looped.status == "timeout" and not looped.isolated
    big = await box.run_python("bytearray(10 * 1024**3)\n")
    assert big.status == "failed" and "MemoryError" in big.stderr
    assert sandbox_processes() == []
    # The check steps' sandbox runs request-influenced code: it never falls back to rlimits alone.
    refused = await sandbox.check_sandbox().run_python("print(2 + 2)\n")
    assert refused.status == "error" and "requires bwrap" in refused.stderr and not refused.stdout
