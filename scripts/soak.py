#!/usr/bin/env python
"""Soak test: N streaming clients for D seconds against moa-stack, mixing base models and pipelines,
10% leaving mid-stream and 5% sending junk (serving/bench/soak.py says what must hold).

    .venv/bin/python scripts/soak.py --clients 64 --duration 300 -o soak.json            # in-process server
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8000 --target moa-lite ...   # a running one

In-process, it serves the embedded 0.5B and 135M models and moa-lite / self-moa with the 1.5B swapped for
the 0.5B (the two cores of a CI machine), and measures the server's RSS. Exit 1 if anything did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SMALL, QWEN = "smollm2-135m", "qwen2.5-coder-0.5b"
SWAP = {"qwen2.5-coder-1.5b": QWEN}


async def in_process(args) -> dict:
    import psutil
    import uvicorn

    from serving.api.app import ServerSettings, create_app
    from serving.bench.soak import soak
    from serving.engines.vllm_server import free_port
    from serving.models.registry import load_registry

    registry = load_registry()
    pipelines = {n: registry.pipeline(n).with_models(SWAP) for n in ("moa-lite", "self-moa")}
    app = create_app(registry, models=[SMALL, QWEN], pipelines=pipelines, settings=ServerSettings())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        while not server.started:  # the socket is bound once uvicorn has started
            await asyncio.sleep(0.1)
        async with httpx.AsyncClient(base_url=url) as http:
            while (await http.get("/ready")).status_code != 200:  # the engines start one by one
                await asyncio.sleep(1)
        process = psutil.Process(os.getpid())
        report = await soak(url, [SMALL, QWEN, *pipelines], clients=args.clients, duration_s=args.duration,
                            max_tokens=args.max_tokens, rss=lambda: process.memory_info().rss)
        return report.to_dict()
    finally:
        server.should_exit = True
        await task


async def remote(args) -> dict:
    from serving.bench.soak import soak

    report = await soak(args.url, args.target, clients=args.clients, duration_s=args.duration,
                        max_tokens=args.max_tokens, api_key=args.api_key)
    return report.to_dict()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--url", help="soak this running server instead of one in this process")
    parser.add_argument("--target", action="append", default=[], help="with --url: a model or pipeline (repeat)")
    parser.add_argument("--api-key")
    parser.add_argument("--max-rss-growth-mib", type=float, default=512.0)
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    if args.url and not args.target:
        parser.error("--url needs at least one --target")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = asyncio.run(remote(args) if args.url else in_process(args))
    if result["rss_start_mib"] is not None:
        growth = result["rss_end_mib"] - result["rss_start_mib"]
        if growth > args.max_rss_growth_mib:
            result["problems"].append(f"server RSS grew {growth:.0f} MiB (bound {args.max_rss_growth_mib:.0f})")
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
