"""`moa serve`: the OpenAI-compatible endpoint for local models and MoA pipelines."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from serving.cli.common import (
    CompileOption,
    ConfigOption,
    SpeculativeOption,
    check_adapters,
    ensure_local,
    err,
    quiet_engines,
    registry,
    served_targets,
    user_errors,
)


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port"),
    model: list[str] = typer.Option([], "--model", "-m", help="Serve this model (repeatable)."),
    pipeline: list[str] = typer.Option([], "--pipeline", "-p", help="Serve this pipeline (repeatable)."),
    swap: list[str] = typer.Option([], "--swap", help="Run pipelines with a model replaced: OLD=NEW (repeatable)."),
    api_key: list[str] = typer.Option([], "--api-key", help="Accepted Bearer key (repeatable); also $MOA_API_KEYS "
                                      "and server.api_keys in models.yaml."),
    max_concurrency: int | None = typer.Option(None, "--max-concurrency", min=1,
                                               help="Requests served at once [models.yaml server: 16]."),
    max_queue: int | None = typer.Option(None, "--max-queue", min=0,
                                         help="Requests waiting for a slot; beyond: 429 [server: 64]."),
    timeout: float | None = typer.Option(None, "--timeout",
                                         help="Per request, seconds; beyond: 504 and aborted [server: 600]."),
    cache_entries: int | None = typer.Option(None, "--cache-entries", min=0,
                                             help="Keep answers to deterministic requests (greedy or seeded) and "
                                                  "answer repeats without an engine call; 0: off [server: 0]."),
    cache_path: Path | None = typer.Option(None, "--cache-path", help="Also keep cached answers in this directory "
                                           "(created if missing; not a file): they survive restarts and servers "
                                           "on this machine share them [server: cache_path]."),
    votes: Path | None = typer.Option(None, "--votes", help="Append the playground's compare-view votes to this "
                                      "JSONL file [server: votes_path, else $MOA_HOME/playground-votes.jsonl]."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Run every vLLM engine in a Ray actor on "
                                           "this cluster: auto, or ray://HOST:10001 (also $MOA_RAY_ADDRESS)."),
    open_page: bool = typer.Option(False, "--open", help="Open the playground in a browser once the port is bound."),
    allow_no_key: bool = typer.Option(False, "--allow-no-key", help="Bind a non-loopback address without an API "
                                      "key (anyone who can reach the port can use the models)."),
    allow_code_execution: bool = typer.Option(False, "--allow-code-execution", help="Serve pipelines with a `check` "
                                              "step: they run model-written code and the request's own examples and "
                                              "asserts in bubblewrap's sandbox (never without it) [server: "
                                              "code_execution, off]; without it they answer 400."),
    compile: bool = CompileOption,
    speculative: str | None = SpeculativeOption,
    config: Path | None = ConfigOption,
) -> None:
    """Serve models and pipelines over an OpenAI-compatible API, and the playground page at /playground.

    With neither --model nor --pipeline: the default model, every pipeline, and every model they use.
    """
    import uvicorn

    from serving.api.app import ServerSettings, create_app
    from serving.models.store import moa_home
    from serving.placement import plan as planning

    reg = registry(config, compile=compile, speculative=speculative)
    if ray_address:
        os.environ["MOA_RAY_ADDRESS"] = ray_address  # the engine pool reads it
    with user_errors():
        # --model alone serves just those models; with neither option, every pipeline is served too.
        needed, pipelines = served_targets(reg, model, pipeline, swap)
        models = list(dict.fromkeys(model or [reg.default_model]))
        options = reg.server
        from_env = os.environ.get(options.api_keys_env, "") if options.api_keys_env else ""
        keys = [*api_key, *options.api_keys, *[k.strip() for k in from_env.split(",") if k.strip()]]
        if host not in ("127.0.0.1", "localhost", "::1") and not keys:
            if not allow_no_key:
                raise ValueError(f"refusing to bind {host} without an API key: anyone who can reach this machine "
                                 "could use its models. Pass --api-key KEY or set MOA_API_KEYS (or --allow-no-key).")
            err.print(f"[bold red]WARNING: binding {host} with no API key (--allow-no-key).[/bold red]")
        ensure_local(*(reg.get(name) for name in needed))
        check_adapters(reg, needed)
        # The placement, checked now: models that do not fit fail before any weights load.
        planning.plan_engines(reg, needed, ray=planning.ray_address(ray_address))
    entries = options.cache_entries if cache_entries is None else cache_entries
    if (cache_path or options.cache_path) and not entries:
        raise typer.BadParameter("a cache path needs a cache: set --cache-entries N (or server.cache_entries)")
    settings = ServerSettings(
        api_keys=keys,
        max_concurrency=max_concurrency or options.max_concurrency,
        max_queue=options.max_queue if max_queue is None else max_queue,
        request_timeout_s=timeout or options.timeout_s,
        keepalive_s=options.keepalive_s,
        cache_entries=entries,
        metrics_public=options.metrics_public,
        rate_limit_per_minute=options.rate_limit.requests_per_minute if options.rate_limit else None,
        rate_limit_burst=options.rate_limit.burst if options.rate_limit else 10,
        cache_path=cache_path or _beside(reg, options.cache_path),
        votes_path=votes or _beside(reg, options.votes_path) or moa_home() / "playground-votes.jsonl",
        code_execution=allow_code_execution or options.code_execution,
    )
    app = create_app(reg, models=models, pipelines=pipelines, settings=settings,
                     on_progress=lambda line: err.print(f"moa serve: {line}", highlight=False, soft_wrap=True))
    err.print(f"moa serve: http://{host}:{port}/v1 — models {', '.join(needed)}; pipelines "
              f"{', '.join(pipelines) or 'none'}. Engines start one by one in that order; each model answers as "
              "soon as its engine is up, each pipeline once all its models are (GET /ready?target=NAME), GET "
              f"/ready once all are. Playground: http://{host}:{port}/playground", highlight=False, soft_wrap=True)
    if open_page:  # a wildcard address is reached through loopback
        _open_when_bound("127.0.0.1" if host in ("0.0.0.0", "::") else host, port)
    # On a terminal, vLLM's start-up output (its warnings, weight-loading bars) goes to a log file unless
    # --verbose; our own lines and warnings, and uvicorn's (a port in use), stay on the terminal. Off a terminal
    # (a container's log, CI) everything stays on stderr, where the operator's log collector reads it.
    with quiet_engines(not os.environ.get("MOA_VERBOSE") and err.is_terminal, "serve") as log_path:
        if log_path:
            err.print(f"moa serve: engine output: {log_path}", highlight=False, soft_wrap=True)
        # On Ctrl-C uvicorn stops accepting, lets in-flight requests finish for up to 30 s, then cancels them
        # (which aborts their engine work); the lifespan then closes every engine.
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30,
                    log_config=_uvicorn_logging())


def _uvicorn_logging() -> dict:
    """uvicorn's own logging, written to the terminal's stderr even while fd 2 points at the engine log."""
    from uvicorn.config import LOGGING_CONFIG

    config = {**LOGGING_CONFIG, "handlers": {name: {**handler} for name, handler in LOGGING_CONFIG["handlers"].items()}}
    for handler in config["handlers"].values():
        if handler.get("stream") == "ext://sys.stderr":
            handler["stream"] = "ext://serving.cli.common.err.file"
    return config


def _beside(reg, path: Path | None) -> Path | None:
    """A models.yaml path, relative to the file that names it."""
    return reg.path.parent / path if path is not None and reg.path else path


def _open_when_bound(host: str, port: int) -> None:
    """Open the playground in the user's browser once the server accepts connections (engines may still be
    starting: the page says so and waits for /ready)."""
    import socket
    import threading
    import time
    import webbrowser

    url = f"http://{host}:{port}/playground"

    def wait_then_open() -> None:
        for _ in range(600):
            try:
                with socket.create_connection((host, port), 1):
                    break
            except OSError:
                time.sleep(0.5)
        if not webbrowser.open(url):
            err.print(f"no browser to open here: visit {url}", highlight=False)

    threading.Thread(target=wait_then_open, daemon=True, name="open-playground").start()
