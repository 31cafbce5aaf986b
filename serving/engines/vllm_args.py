"""models.yaml engine arguments → vLLM AsyncEngineArgs keyword arguments, with device defaults.

Kept apart from the engine so the mapping is testable without starting vLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serving.models.registry import ModelSpec
from serving.placement import machine
from serving.placement.devices import DEFAULT_MAX_MODEL_LEN

CPU_DEFAULT_KV_CACHE_GIB = 1.0
GPU_DEFAULT_MEMORY_UTILIZATION = 0.9


class EngineConfigError(ValueError):
    """A models.yaml engine argument that the chosen backend or device cannot honour."""


def build_engine_args(spec: ModelSpec, model_path: Path, *, gpu_memory_utilization: float | None = None,
                      cpu: bool | None = None, lora: dict[str, Any] | None = None) -> dict[str, Any]:
    """`lora`: the multi-LoRA arguments for the entry's adapters (serving/models/adapters.py, lora_engine_args)."""
    cpu = machine.on_cpu() if cpu is None else cpu
    e = spec.engine
    if e.device == "cuda" and cpu:
        raise EngineConfigError(
            f"model {spec.name!r} asks for device: cuda, but this vLLM build runs on the CPU "
            "(install the GPU extra: pip install 'moa-stack[gpu]')"
        )
    args: dict[str, Any] = {
        "model": str(model_path),
        "tokenizer": str(model_path),
        "served_model_name": spec.name,
        "dtype": auto_dtype_on_cpu(model_path, e.quantization) if cpu and e.dtype == "auto" else e.dtype,
        "max_model_len": e.max_model_len or default_max_model_len(model_path),
        "enable_prefix_caching": e.enable_prefix_caching,
        "tensor_parallel_size": e.tensor_parallel_size,
        "pipeline_parallel_size": e.pipeline_parallel_size,
        "scheduling_policy": e.scheduling_policy,
        # Compact JSON under guided decoding: with free whitespace, small models can emit blank
        # space until max_tokens (seen with Qwen2.5-0.5B on the council schema).
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    }
    if e.max_num_seqs is not None:
        args["max_num_seqs"] = e.max_num_seqs
    if e.speculative is not None:
        args["speculative_config"] = e.speculative.model_dump()
        args["per_request_spec_decode_metrics"] = "summary"  # each call's drafted and accepted tokens, for traces
    if e.quantization is not None:
        if e.quantization == "bitsandbytes-8bit":
            raise EngineConfigError(
                f"model {spec.name!r}: vLLM quantizes with bitsandbytes in 4 bit only; "
                "use quantization: bitsandbytes, or backend: transformers for 8 bit"
            )
        args["quantization"] = e.quantization
    if cpu:
        max_len = args["max_model_len"]
        # vLLM-CPU refuses to start without an explicit KV cache size.
        args["kv_cache_memory_bytes"] = int((e.cpu_kv_cache_gib or CPU_DEFAULT_KV_CACHE_GIB) * 2**30)
        # Eager starts in ~20 s; torch.compile takes ~90 s for the same speed on CPU.
        args["enforce_eager"] = True if e.enforce_eager is None else e.enforce_eager
        # A seeded request caught mid-way through a chunked prefill kills the CPU worker
        # (vLLM-CPU 0.32 rewinds its generator with get_offset(), which CPU generators lack).
        # Without chunking every prefill completes in one step, so seeds are safe in a batch.
        args["enable_chunked_prefill"] = False
        args["max_num_batched_tokens"] = max(max_len, 4096)
    else:
        args["gpu_memory_utilization"] = (
            e.gpu_memory_utilization or gpu_memory_utilization or GPU_DEFAULT_MEMORY_UTILIZATION
        )
        if e.enforce_eager is not None:
            args["enforce_eager"] = e.enforce_eager
    args = {k: v for k, v in args.items() if v is not None}
    args.update(lora or {})
    args.update(e.extra)
    return args


def speculation_refusal(spec: ModelSpec, temperature: float, *, cpu: bool | None = None) -> str | None:
    """Why a request at `temperature` cannot be served by this engine's speculation, or None.

    vLLM-CPU 0.32's n-gram speculation is right greedily (on a copying aggregation 81% of the drafts were accepted,
    1.87x the tokens/s at batch 1, the same text as without), but at any temperature above 0 it accepts no draft and the
    tokens it samples instead are garbage ("a hashhawks", "hash Nurse algorithm"), seeded or not (docs/ENGINES.md,
    "Prompt-lookup speculation"). vLLM cannot turn speculation off per request, so the request is refused: a
    clear 400 beats an answer that looks served and is not.
    """
    speculating = spec.engine.speculative is not None or "speculative_config" in spec.engine.extra
    # below 1e-5: vLLM's greedy; the platform is asked last (it imports vLLM)
    if not speculating or temperature < 1e-5 or not (machine.on_cpu() if cpu is None else cpu):
        return None
    return (f"model {spec.name!r} runs prompt-lookup speculation (engine.speculative), which on vLLM-CPU samples "
            f"garbage at temperature > 0 (got {temperature}): ask for temperature 0, or serve the model without "
            "speculation (drop engine.speculative / --speculative); docs/ENGINES.md, \"Prompt-lookup speculation\"")


# float32 weights may take up to this share of the machine's memory where `auto` picks float32 on a CPU.
FLOAT32_MEMORY_SHARE = 1 / 3


def auto_dtype_on_cpu(model_path: Path, quantization: str | None = None) -> str:
    """What `dtype: auto` runs on a CPU: "auto" (vLLM then takes the checkpoint's 16-bit dtype) where the CPU
    computes bf16 in hardware, else float32 where float32 weights take at most a third of the memory (a
    quantized checkpoint, or one whose size is unknown, stays "auto": AWQ/GPTQ kernels take 16 bit only).

    Why: vLLM-CPU's own `auto` is bf16 on every x86 CPU, but without AVX512-BF16 or AMX it converts bf16 for
    each matmul; on an AVX2-only EPYC the 1.5B decodes 3.5 tok/s in bf16 and 10.8 in float32 at n=8
    (docs/ENGINES.md), while on an `avx512_bf16` CPU bf16 is the faster one. A big model stays 16-bit.
    """
    from serving.placement.machine import native_bf16, physical_memory_bytes

    if native_bf16() or quantization is not None:
        return "auto"
    memory = physical_memory_bytes()
    weights = float32_weight_bytes(model_path)
    return "float32" if memory and weights and weights <= FLOAT32_MEMORY_SHARE * memory else "auto"


def float32_weight_bytes(model_path: Path) -> float:
    """The checkpoint's safetensors bytes, rescaled to 4 bytes per parameter from the dtype its config names;
    0 when unknown (no safetensors) or quantized (its config carries a quantization_config)."""
    import json

    size = sum(f.stat().st_size for f in model_path.glob("*.safetensors"))
    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if config.get("quantization_config") or config.get("text_config", {}).get("quantization_config"):
        return 0.0
    stored = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return size * (1 if stored == "float32" else 2)


def default_max_model_len(model_path: Path) -> int:
    """DEFAULT_MAX_MODEL_LEN, or the model's own context where its config.json says it is shorter (vLLM refuses
    a max_model_len beyond it)."""
    import json

    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return DEFAULT_MAX_MODEL_LEN
    text = config.get("text_config", config)
    # The keys vLLM derives a model's context from, the smallest present winning, and model_max_length over
    # all (vllm/transformers_utils/model_arch_config_convertor.py, derive_max_model_len_and_key).
    found = [v for k in CONTEXT_KEYS if isinstance(v := text.get(k), int) and v > 0]
    own = text["model_max_length"] if isinstance(text.get("model_max_length"), int) else min(found, default=None)
    return min(DEFAULT_MAX_MODEL_LEN, own) if own else DEFAULT_MAX_MODEL_LEN


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")


def server_command(spec: ModelSpec, model_path: Path, *, host: str = "127.0.0.1", port: int = 8000,
                   python: str = "python") -> list[str]:
    """The `vllm.entrypoints.openai.api_server` command serving `spec` with the same engine arguments.

    For the scale-out path: start this on another machine and point an `openai` backend
    entry at it. (`vllm serve` does not work with the vllm-cpu distribution name.)
    """
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--host", host, "--port", str(port),
           "--enable-prompt-tokens-details"]
    for key, value in build_engine_args(spec, model_path).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (dict, list)):
            import json

            cmd += [flag, json.dumps(value)]
        else:
            cmd += [flag, str(value)]
    return cmd
