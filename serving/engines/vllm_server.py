"""Start and stop a vLLM OpenAI server as a subprocess, with the engine arguments moa uses in-process.

Used by the HTTP fan-out baseline of `moa bench` and by the `openai` backend's tests:
both need a real vLLM server whose engine matches the in-process one argument for argument.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from moa.engine import EngineError
from serving.engines.vllm_args import server_command
from serving.engines.vllm_logging import engine_logging_env
from serving.models.checked_dtype import checked_spec
from serving.models.registry import Endpoint, ModelSpec
from serving.models.store import resolve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` for one model on a loopback port."""

    def __init__(self, spec: ModelSpec, log_path: Path, *, cpu_threads_bind: str | None = None,
                 port: int | None = None, startup_timeout_s: float = 600) -> None:
        self.spec = spec
        self.log_path = log_path
        self.port = port or free_port()
        self.cpu_threads_bind = cpu_threads_bind
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai_spec(self) -> ModelSpec:
        """A models.yaml entry for the `openai` backend pointing at this server."""
        return ModelSpec(name=self.spec.name, backend="openai",
                         endpoint=Endpoint(base_url=f"{self.base_url}/v1", model=self.spec.name))

    def command(self) -> list[str]:
        """The server's command line, in the dtype that passed the known-answer check on this CPU (as in-process)."""
        return server_command(checked_spec(self.spec), resolve(self.spec).path, port=self.port, python=sys.executable)

    def start(self) -> None:
        cmd = self.command()
        # Dev mode exposes POST /reset_prefix_cache, so benchmarks can start every run from a cold cache.
        env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_SERVER_DEV_MODE": "1", **engine_logging_env()}
        if self.cpu_threads_bind and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_threads_bind
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.wait_healthy()

    def wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise EngineError(f"model {self.spec.name!r}: the vLLM server exited with code "
                                  f"{self.proc.returncode}; its log: {self.log_path}\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise EngineError(f"model {self.spec.name!r}: the vLLM server was not healthy after "
                                  f"{self.startup_timeout_s:.0f} s; its log: {self.log_path}")
            time.sleep(1)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def reset_prefix_cache(self) -> None:
        httpx.post(f"{self.base_url}/reset_prefix_cache", timeout=30).raise_for_status()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
