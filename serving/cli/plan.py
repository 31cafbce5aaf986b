"""`moa plan`: where each engine would run, decided before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from serving.cli.common import ConfigOption, out, registry, served_targets, show, user_errors


def plan(
    model: list[str] = typer.Option([], "--model", "-m", help="Plan this model (repeatable)."),
    pipeline: list[str] = typer.Option([], "--pipeline", "-p", help="Plan the models of this pipeline (repeatable)."),
    swap: list[str] = typer.Option([], "--swap", help="Pipelines with a model replaced: OLD=NEW (repeatable)."),
    gpus: str | None = typer.Option(None, "--gpus", help="Plan for this inventory instead of this machine's GPUs, "
                                    "e.g. 8x80GB or 2x24GB,1x48GB."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Show which nodes of this Ray cluster each "
                                           "Ray-placed engine can land on (every vLLM engine, as with serve)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    config: Path | None = ConfigOption,
) -> None:
    """Show where each local vLLM engine goes: GPU devices and memory fraction, or CPU cores.

    Selects models as `moa serve` does (with neither --model nor --pipeline: the default model and
    every pipeline's models) and uses the same planner, so a plan that fails here fails there,
    before any weights load. Exit 1 when the models do not fit, naming the model and the shortfall.
    """
    from serving.placement import plan as planning
    from serving.placement.devices import GB, parse_gpus
    from serving.placement.plan import plan_engines

    reg = registry(config)
    with user_errors():
        names, _ = served_targets(reg, model, pipeline, swap)
        address = planning.ray_address(ray_address)
        result = plan_engines(reg, names, gpus=parse_gpus(gpus) if gpus else None, ray=address)
        placed = sorted(n for n in reg.engine_names(names) if planning.in_ray(reg.get(n), address))
        nodes = _ray_nodes(reg, placed, address) if placed and address else {}
    if as_json:
        print(json.dumps({"gpu": result.gpu.to_dict() if result.gpu else None, "cores": result.cores,
                          "ray": nodes}, indent=2))
        return
    if nodes:
        table = Table(title=f"Ray: nodes of {address} that can hold each engine's actor", title_justify="left")
        table.add_column("model", no_wrap=True)
        for column in ("asks for", "candidate nodes"):
            table.add_column(column)
        for name, entry in nodes.items():
            table.add_row(name, ", ".join(f"{k} {v:g}" for k, v in entry["demand"].items()),
                          "\n".join(entry["nodes"]) or "[bold red]none: it would wait forever[/bold red]")
        show(table)
    if result.gpu is None:
        table = Table(title="CPU plan: each vLLM engine's cores, by model size", title_justify="left")
        table.add_column("model", no_wrap=True)
        table.add_column("cores (VLLM_CPU_OMP_THREADS_BIND)")
        for name, cores in result.cores.items():
            table.add_row(name, cores)
        if result.cores:
            show(table)
        else:
            out.print("no local vLLM engines to place (or VLLM_CPU_OMP_THREADS_BIND is set)")
        return
    gpu = result.gpu
    totals = {g.id: g.total_bytes for g in gpu.gpus}
    table = Table(title=f"GPU plan: {len(gpu.gpus)} GPU(s), engines may use {gpu.budget:.0%} of each; memory in GB "
                        "per GPU", title_justify="left")
    table.add_column("model", no_wrap=True)  # names stay whole; in a narrow terminal the numbers' headers wrap
    table.add_column("GPUs", overflow="fold")
    for column in ("TP×PP", "weights", "KV cache", "needs", "fraction", "gets", "spare"):
        table.add_column(column, justify="right")
    for name, p in gpu.placements.items():
        gets = min(p.gpu_memory_utilization * totals[d] for d in p.devices)
        table.add_row(name, ",".join(p.devices), f"{p.tensor_parallel_size}×{p.pipeline_parallel_size}",
                      f"{p.weights_per_device / GB:.1f}", f"{p.kv_per_device / GB:.1f}",
                      f"{p.need_per_device / GB:.1f}", f"{p.gpu_memory_utilization:.3f}", f"{gets / GB:.1f}",
                      f"{(gets - p.need_per_device) / GB:.1f}")
    show(table)
    for g in gpu.gpus:
        on = [n for n, p in gpu.placements.items() if g.id in p.devices]
        out.print(f"GPU {g.id} ({g.total_bytes / GB:.0f} GB{', ' + g.name if g.name else ''}): "
                  f"{gpu.used.get(g.id, 0):.0%} handed out to {', '.join(on) or 'nothing'}", highlight=False)


def _ray_nodes(reg, names: list[str], address: str) -> dict[str, dict]:
    """Per Ray-placed model: its resource demand and the alive nodes that can hold it."""
    import ray

    from serving.placement.plan import ray_candidates, ray_demand

    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    try:
        nodes = ray.nodes()
    finally:
        ray.shutdown()
    cpu = not any(n.get("Resources", {}).get("GPU") for n in nodes)
    found = {}
    for name in names:
        demand = ray_demand(reg.get(name), cpu=cpu)
        found[name] = {"demand": demand, "nodes": [_describe(n) for n in ray_candidates(nodes, demand)]}
    return found


def _describe(node: dict) -> str:
    shown = {k: v for k, v in sorted(node["Resources"].items())
             if not k.startswith(("node:", "memory", "object_store"))}
    return f"{node['NodeManagerAddress']} {node['NodeID'][:8]} ({', '.join(f'{k} {v:g}' for k, v in shown.items())})"
