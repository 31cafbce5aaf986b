"""LoRA adapters of a base model: where each lives, whether it fits its base, and how one vLLM engine serves them.

An adapter is checked against its base before the engine starts (rank, target modules, tensor shapes), so an
adapter trained for another model is an error naming the adapter and the reason, not a crash at the first
request. The engine gets one LoRA slot per adapter plus one for a *zero adapter* (every weight zero: the base
model's own answer), which requests for the base model carry on an engine with adapters: a request without an
adapter batched with adapter requests decoded garbage on an Intel AMX CPU (issue 26), and with the zero adapter
every request in a batch takes the same LoRA path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from serving.models.registry import ADAPTER_SEPARATOR, HFDirSource, HubSource, ModelSpec

# vLLM's allowed max_lora_rank values (vllm/config/lora.py, MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
WEIGHTS = "adapter_model.safetensors"
ZERO = "(base)"  # the zero adapter's name inside the engine


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names the model, the adapter and the reason."""


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str  # as models.yaml names it (the target is BASE:NAME)
    path: Path
    rank: int
    alpha: float
    targets: tuple[str, ...]
    bytes: int  # its weights on disk

    def describe(self) -> dict:
        return {"adapter": self.name, "path": str(self.path), "rank": self.rank, "alpha": self.alpha,
                "targets": list(self.targets), "bytes": self.bytes}


def adapter_dir(model: str, name: str, source: HFDirSource | HubSource) -> Path:
    """The directory of one adapter: a path (`~` and $MOA_HOME expanded) or a hub repo in the local cache."""
    if isinstance(source, HubSource):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(source.repo_id, revision=source.revision, local_files_only=True))
        except Exception as exc:
            raise AdapterError(f"model {model!r}, adapter {name!r}: {source.repo_id} is not in the local Hugging "
                               f"Face cache ({type(exc).__name__}); download it once with `huggingface-cli "
                               f"download {source.repo_id}`") from exc
    from serving.models.store import moa_home

    text = source.path.replace("${MOA_HOME}", str(moa_home())).replace("$MOA_HOME", str(moa_home()))
    return Path(os.path.expandvars(text)).expanduser()


def read_adapters(spec: ModelSpec, base_path: Path) -> list[Adapter]:
    """Every adapter of `spec`, checked against the base weights in `base_path`."""
    shapes = base_shapes(base_path) if spec.adapters else {}
    return [read_adapter(spec.name, name, adapter_dir(spec.name, name, source), shapes)
            for name, source in spec.adapters.items()]


def read_adapter(model: str, name: str, path: Path, base_shapes: dict[str, tuple[int, ...]]) -> Adapter:
    where = f"model {model!r}, adapter {name!r} ({path})"
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except OSError:
        raise AdapterError(f"{where}: no adapter_config.json there: an adapter is a PEFT LoRA directory "
                           "(`save_pretrained`); scripts/train_adapters.py makes small ones for the embedded "
                           "models") from None
    except ValueError as exc:
        raise AdapterError(f"{where}: adapter_config.json is not valid JSON: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: a {config.get('peft_type')} adapter; vLLM serves LoRA adapters only")
    rank = int(config.get("r") or 0)
    if not 1 <= rank <= VLLM_RANKS[-1]:
        raise AdapterError(f"{where}: rank r={rank}; vLLM serves ranks 1 to {VLLM_RANKS[-1]}")
    if config.get("modules_to_save"):
        raise AdapterError(f"{where}: it also trains whole modules ({config['modules_to_save']}); vLLM loads "
                           "LoRA weights only")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{where}: no {WEIGHTS} (save the adapter with safetensors, peft's default)")
    targets = _check_shapes(where, weights, rank, base_shapes)
    return Adapter(name, path, rank, float(config.get("lora_alpha") or rank), targets, weights.stat().st_size)


def base_shapes(base_path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(base_path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _check_shapes(where: str, weights: Path, rank: int, base: dict[str, tuple[int, ...]]) -> tuple[str, ...]:
    """Each LoRA pair must sit on a base weight of the right shape: A is (r, inputs), B is (outputs, r)."""
    from safetensors import safe_open

    targets: set[str] = set()
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            for part, axis in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
                if not key.endswith(part):
                    continue
                module = key.removesuffix(part).removeprefix("base_model.model.")
                shape = tuple(f.get_slice(key).get_shape())
                own = base.get(module + ".weight")
                if own is None:
                    raise AdapterError(f"{where}: it adapts {module}, which the base model has no weight for: it "
                                       "was trained for another model")
                if shape[axis] != own[axis]:
                    side = "inputs" if axis == 1 else "outputs"
                    raise AdapterError(f"{where}: {module} has {own[axis]} {side} in the base model but "
                                       f"{shape[axis]} in the adapter: it was trained for another model")
                if shape[1 - axis] != rank:
                    raise AdapterError(f"{where}: {key} has rank {shape[1 - axis]}, its config says r={rank}")
                targets.add(module.rsplit(".", 1)[-1])
    if not targets:
        raise AdapterError(f"{where}: {WEIGHTS} holds no LoRA weights (lora_A/lora_B)")
    return tuple(sorted(targets))


def lora_engine_args(adapters: list[Adapter]) -> dict:
    """vLLM engine arguments that keep every adapter and the zero adapter resident at once (no swapping)."""
    if not adapters:
        return {}
    rank = max(a.rank for a in adapters)
    slots = len(adapters) + 1  # + the zero adapter base requests carry
    return {"enable_lora": True, "max_loras": slots, "max_cpu_loras": slots,
            "max_lora_rank": next(r for r in VLLM_RANKS if r >= rank)}


def zero_adapter(adapters: list[Adapter], home: Path) -> Path:
    """A copy of the first adapter with every weight zero, made once per adapter file (under `home`)."""
    first = adapters[0]
    digest = hashlib.sha256((first.path / WEIGHTS).read_bytes()).hexdigest()[:16]
    out = home / "adapters" / ".zero" / digest
    if (out / WEIGHTS).is_file():
        return out
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {k: torch.zeros_like(v) for k, v in load_file(str(first.path / WEIGHTS)).items()}
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    (tmp / "adapter_config.json").write_text((first.path / "adapter_config.json").read_text())
    save_file(tensors, str(tmp / WEIGHTS))
    try:
        tmp.replace(out)
    except OSError:  # another process made it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def target(model: str, adapter: str) -> str:
    return f"{model}{ADAPTER_SEPARATOR}{adapter}"


def lora_memory_bytes(base_path: Path, slots: int, rank: int, dtype_bytes: int) -> int:
    """What vLLM preallocates for LoRA on a device: for every slot, an (A, B) pair of `rank` on each attention and
    MLP projection of every layer (q, k, v, o, gate, up, down), whichever of them the adapters target."""
    try:
        config = json.loads((base_path / "config.json").read_text())
        config = config.get("text_config", config)
        h, layers, i = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads", heads) * config.get("head_dim", h // heads)
    except (OSError, ValueError, KeyError, ZeroDivisionError):
        return 0
    per_layer = rank * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    return slots * layers * per_layer * dtype_bytes
