"""Which vLLM-CPU kernel each linear layer and the attention of a model take, on this CPU and on an AMX CPU.

Asks the installed vLLM's own dispatch functions (`check_cpu_sgl_kernel`, `_get_attn_isa`) with
the model's real layer shapes, once as this machine answers `torch.cpu._is_amx_tile_supported()`
and once as an AMX CPU (Sapphire Rapids and later) would. Explains why only some models' bf16
answers change on AMX: e.g. SmolLM2-135M's 576x576 o_proj is the one embedded projection small
enough (<= 1 MiB in bf16) for the AMX-only SGL `weight_packed_linear` kernel.

    .venv/bin/python scripts/cpu_kernel_paths.py smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse
import json
from unittest import mock

import torch


def layer_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(N, K) of each dense projection of a llama/qwen2-style decoder layer, plus lm_head."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    return {
        "qkv_proj": ((heads + 2 * kv_heads) * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_up_proj": (2 * inter, hidden),
        "down_proj": (hidden, inter),
        "lm_head": (config["vocab_size"], hidden),
    }


def paths(config: dict, dtype: torch.dtype, amx: bool) -> dict[str, str]:
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    with mock.patch.object(torch.cpu, "_is_amx_tile_supported", return_value=amx):
        out = {name: ("sgl weight_packed_linear (AMX)" if check_cpu_sgl_kernel(n, k, dtype) else "oneDNN / torch")
               for name, (n, k) in layer_shapes(config).items()}
        out["attention"] = _get_attn_isa(dtype, 128, head_dim)
    return out


def main() -> None:
    from serving.models.registry import load_registry
    from serving.models.store import resolve

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    registry = load_registry()
    report = {}
    for name in args.models:
        config = json.loads((resolve(registry.get(name)).path / "config.json").read_text())
        report[name] = {
            f"{dtype_name}, {'AMX' if amx else 'this CPU'}": paths(config, dtype, amx)
            for dtype_name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32))
            for amx in (torch.cpu._is_amx_tile_supported(), True)
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
