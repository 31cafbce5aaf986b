"""A decode-only fault for real vLLM engines: the shape of the AMX bf16 bug, made on any CPU.

vLLM applies logits processors when it samples a token (the decode path users get), not to the
prompt logprobs that teacher forcing reads. This one makes greedy sampling pick the runner-up,
only when the engine runs bf16: prefill stays right, decode goes wrong, float32 is healthy.
Loaded by the EngineCore from its qualified name (`engine.extra.logits_processors` in a test registry).
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

QUALNAME = "tests.decode_fault:WrongDecodeInBf16"


class WrongDecodeInBf16(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.broken = vllm_config.model_config.dtype == torch.bfloat16

    def is_argmax_invariant(self) -> bool:
        return not self.broken  # vLLM skips argmax-invariant processors under greedy sampling

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.broken:
            return logits
        return logits.scatter(-1, logits.argmax(dim=-1, keepdim=True), float("-inf"))
