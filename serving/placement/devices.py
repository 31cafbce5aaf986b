"""Where each engine runs: a memory plan for GPUs, a core split for CPUs, decided before anything loads.

A pure function of the inventory and the models (`plan_gpus`, `plan_cores`), so it is tested
without hardware and `moa plan --gpus 8x80GB` answers on any machine. The plan is the one place
that says where an engine goes; the engine pool applies it (CUDA_VISIBLE_DEVICES and
gpu_memory_utilization per engine, or a core list on a CPU).

Memory per engine = weights + KV cache + headroom, split evenly over its TP x PP devices:
- weights: the checkpoint's safetensors bytes when they are on disk (AWQ/GPTQ packing included),
  rescaled when the engine runs another 16/32-bit dtype; else parameters x bytes per parameter of
  the dtype or quantization, from the checkpoint's config.json or the entry's `size:` block.
- KV cache: 2 (K and V) x layers x KV heads x head dim x 2 bytes, for `max_num_seqs` sequences of
  `max_model_len` tokens (16 sequences when max_num_seqs is unset: what must fit; vLLM uses any
  memory left in the engine's fraction for more).
- headroom: CUDA context, activations and CUDA graphs, 1.5 GB per device plus 5% of the weights.
Engines sharing a device get fractions that add up to at most `budget` (0.9) of it, each at least
its need; leftover budget is shared out in proportion to need, so KV caches grow.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9
DEFAULT_BUDGET = 0.9
DEFAULT_PLANNING_SEQS = 16
HEADROOM_PER_DEVICE = 1.5 * GB
HEADROOM_SHARE_OF_WEIGHTS = 0.05
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "auto": 2.0, "fp8": 1.0,
                   # 4-bit weights plus group scales and zeros (group size 128) and unquantized norms
                   "awq": 0.56, "gptq": 0.56, "bitsandbytes": 0.56, "compressed-tensors": 0.56,
                   "bitsandbytes-8bit": 1.06}


# The context an engine gets when models.yaml leaves max_model_len unset, on every device: the plan budgets
# KV cache for exactly this, and the engine arguments (serving/engines/vllm_args.py) pass it, so vLLM does not
# take the model's whole context (a plan that fit could then be refused at load).
DEFAULT_MAX_MODEL_LEN = 4096


class PlanError(ValueError):
    """The models do not fit, or a placement is impossible; the message names the model and the shortfall."""


@dataclass(frozen=True, slots=True)
class Gpu:
    id: str  # what goes into CUDA_VISIBLE_DEVICES (an index, or a UUID)
    total_bytes: float
    name: str = ""


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the planner needs to know about a model's size."""

    params: float  # parameters (all experts of a MoE count: they all live in memory)
    layers: int
    kv_heads: int
    head_dim: int
    checkpoint_bytes: float | None = None  # safetensors on disk, when known
    checkpoint_dtype: str | None = None


@dataclass(frozen=True, slots=True)
class Demand:
    """One engine's request for devices: from models.yaml `engine:` (see registry.EngineArgs)."""

    name: str
    shape: ModelShape
    dtype: str = "auto"
    quantization: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    max_num_seqs: int | None = None
    devices: tuple[str, ...] | None = None  # explicit placement
    gpu_memory_utilization: float | None = None  # explicit fraction of each of its devices
    lora_bytes: float = 0.0  # the LoRA slots vLLM preallocates for the entry's adapters (serving/models/adapters.py)

    @property
    def world(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def weight_bytes(self) -> float:
        s = self.shape
        if s.checkpoint_bytes is not None:
            if self.quantization is None and s.checkpoint_dtype in BYTES_PER_PARAM and self.dtype in BYTES_PER_PARAM:
                return s.checkpoint_bytes * BYTES_PER_PARAM[self.dtype] / BYTES_PER_PARAM[s.checkpoint_dtype]
            return s.checkpoint_bytes
        return s.params * BYTES_PER_PARAM[self.quantization or self.dtype]

    @property
    def kv_bytes(self) -> float:
        per_token = 2 * self.shape.layers * self.shape.kv_heads * self.shape.head_dim * 2
        return per_token * self.max_model_len * (self.max_num_seqs or DEFAULT_PLANNING_SEQS)

    @property
    def need_per_device(self) -> float:
        weights = self.weight_bytes
        return ((weights * (1 + HEADROOM_SHARE_OF_WEIGHTS) + self.kv_bytes + self.lora_bytes) / self.world
                + HEADROOM_PER_DEVICE)


@dataclass(slots=True)
class Placement:
    name: str
    devices: tuple[str, ...]
    gpu_memory_utilization: float
    need_per_device: float
    weights_per_device: float
    kv_per_device: float
    tensor_parallel_size: int
    pipeline_parallel_size: int

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(self.devices)


@dataclass(slots=True)
class GpuPlan:
    gpus: list[Gpu]
    placements: dict[str, Placement]
    budget: float = DEFAULT_BUDGET
    used: dict[str, float] = field(default_factory=dict)  # device id -> fraction handed out

    def to_dict(self) -> dict:
        return {
            "budget": self.budget,
            "gpus": [{"id": g.id, "total_gb": round(g.total_bytes / GB, 1), "name": g.name,
                      "fraction_used": round(self.used.get(g.id, 0.0), 3)} for g in self.gpus],
            "engines": {name: {"devices": list(p.devices), "cuda_visible_devices": p.cuda_visible_devices,
                               "gpu_memory_utilization": p.gpu_memory_utilization,
                               "need_gb_per_device": round(p.need_per_device / GB, 1),
                               "weights_gb_per_device": round(p.weights_per_device / GB, 1),
                               "kv_gb_per_device": round(p.kv_per_device / GB, 1),
                               "tensor_parallel_size": p.tensor_parallel_size,
                               "pipeline_parallel_size": p.pipeline_parallel_size}
                        for name, p in self.placements.items()},
        }


# -- inventory -----------------------------------------------------------------------------------

_GPU_SPEC = re.compile(r"^\s*(?:(\d+)\s*[x×]\s*)?(\d+(?:\.\d+)?)\s*(GB|GiB|G)?\s*$", re.IGNORECASE)


def parse_gpus(text: str) -> list[Gpu]:
    """`8x80GB`, `2x24GB,1x48GB`, `80GB`: GPUs numbered 0.. in the order given."""
    gpus: list[Gpu] = []
    for part in text.split(","):
        match = _GPU_SPEC.match(part)
        if not match or not part.strip():
            raise PlanError(f"--gpus: cannot read {part.strip()!r}; write e.g. 8x80GB or 2x24GB,1x48GB")
        count, size, unit = int(match.group(1) or 1), float(match.group(2)), (match.group(3) or "GB").lower()
        if count < 1 or size <= 0:
            raise PlanError(f"--gpus: {part.strip()!r} has no GPUs or no memory")
        total = size * (2**30 if unit == "gib" else GB)
        gpus += [Gpu(str(len(gpus) + i), total) for i in range(count)]
    return gpus


def detect_gpus() -> list[Gpu]:
    """This machine's GPUs through NVML (nvidia-ml-py), without initialising CUDA; [] when there are none.

    Honours CUDA_VISIBLE_DEVICES given as indices: the plan then uses only those devices.
    """
    import os

    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(Gpu(str(i), float(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                            name.decode() if isinstance(name, bytes) else name))
    finally:
        pynvml.nvmlShutdown()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(v.strip().isdigit() for v in visible.split(",") if v.strip()):
        order = os.environ.get("CUDA_DEVICE_ORDER", "")
        if order not in ("", "PCI_BUS_ID"):  # engines get PCI_BUS_ID, NVML's numbering; these indices would not
            raise PlanError(f"CUDA_VISIBLE_DEVICES={visible} with CUDA_DEVICE_ORDER={order}: moa numbers GPUs in "
                            "PCI bus order (NVML's, and CUDA's with CUDA_DEVICE_ORDER=PCI_BUS_ID, which every "
                            "engine gets), so these indices may name other GPUs. Unset CUDA_DEVICE_ORDER or set "
                            "it to PCI_BUS_ID, and give the indices nvidia-smi shows")
        keep = [v.strip() for v in visible.split(",") if v.strip()]
        gpus = [g for g in gpus if g.id in keep]
    return gpus


# -- model shapes ------------------------------------------------------------------------------


def shape_from_config(config: dict, checkpoint_bytes: float | None = None) -> ModelShape:
    """Parameters and KV geometry of a decoder-only model from its Hugging Face config.json."""
    text = config.get("text_config", config)  # multimodal wrappers keep the LM's config inside
    hidden = text["hidden_size"]
    layers = text["num_hidden_layers"]
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or hidden // heads
    inter = text.get("intermediate_size") or 4 * hidden
    vocab = text["vocab_size"]
    experts = text.get("num_local_experts") or text.get("num_experts") or 1
    moe_inter = text.get("moe_intermediate_size") or inter
    attention = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * (moe_inter * experts if experts > 1 else inter) + (hidden * experts if experts > 1 else 0)
    embeddings = vocab * hidden * (1 if text.get("tie_word_embeddings", config.get("tie_word_embeddings")) else 2)
    params = layers * (attention + mlp + 2 * hidden) + embeddings + hidden
    dtype = str(text.get("torch_dtype") or config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return ModelShape(float(params), layers, kv_heads, head_dim, checkpoint_bytes, dtype)


def shape_from_checkpoint(path: Path) -> ModelShape:
    config = json.loads((path / "config.json").read_text())
    files = list(path.glob("*.safetensors"))
    size = float(sum(f.stat().st_size for f in files)) if files else None
    return shape_from_config(config, size)


# -- the plan ------------------------------------------------------------------------------------


def plan_gpus(gpus: list[Gpu], demands: list[Demand], *, budget: float = DEFAULT_BUDGET) -> GpuPlan:
    """Assign each engine its devices and memory fraction, or raise PlanError naming what does not fit.

    Explicit `devices` are placed first, then the rest, largest need first, each on the TP x PP
    devices with the most budget left (ties: the lowest index), so big models spread out and
    small ones fill the gaps.
    """
    if not gpus:
        raise PlanError("no GPUs to plan for: give an inventory with --gpus (e.g. 8x80GB), or run on a GPU machine")
    by_id = {g.id: g for g in gpus}
    free = {g.id: g.total_bytes * budget for g in gpus}  # bytes still unpromised on each device
    chosen: dict[str, tuple[str, ...]] = {}
    ordered = sorted(demands, key=lambda d: (d.devices is None, -d.need_per_device * d.world))
    for d in ordered:
        if d.devices is not None:
            unknown = [x for x in d.devices if x not in by_id]
            if unknown:
                raise PlanError(f"model {d.name!r}: devices {unknown} are not among the GPUs {list(by_id)}")
            if len(d.devices) != d.world:
                raise PlanError(f"model {d.name!r}: {len(d.devices)} devices listed, but tensor_parallel_size x "
                                f"pipeline_parallel_size = {d.world}")
            devices = tuple(d.devices)
        else:
            if d.world > len(gpus):
                have = sum(max(v, 0.0) for v in free.values())
                raise PlanError(
                    f"model {d.name!r} needs {d.world} GPUs (TP {d.tensor_parallel_size} x PP "
                    f"{d.pipeline_parallel_size}) with {d.need_per_device / GB:.1f} GB each, "
                    f"{d.need_per_device * d.world / GB:.1f} GB in all; the inventory has {len(gpus)} GPU(s) with "
                    f"{have / GB:.1f} GB left of its {budget:.0%} budget: "
                    f"{(d.need_per_device * d.world - have) / GB:.1f} GB short")
            ranked = sorted(gpus, key=lambda g: (-free[g.id], int(g.id) if g.id.isdigit() else g.id))
            devices = tuple(g.id for g in ranked[:d.world])
        need = _need_on(d, by_id, devices)
        short = max(need[x] - free[x] for x in devices)
        if short > 0:
            worst = max(devices, key=lambda x: need[x] - free[x])
            raise PlanError(
                f"model {d.name!r} does not fit: it needs {need[worst] / GB:.1f} GB on each of its {d.world} GPU(s) "
                f"(weights {d.weight_bytes / d.world / GB:.1f} + KV cache {d.kv_bytes / d.world / GB:.1f} for "
                f"{d.max_num_seqs or DEFAULT_PLANNING_SEQS} x {d.max_model_len} tokens + headroom), but GPU "
                f"{worst} ({by_id[worst].total_bytes / GB:.0f} GB) has {max(free[worst], 0) / GB:.1f} GB left "
                f"of its {budget:.0%} budget: {short / GB:.1f} GB short. Use more or larger GPUs, a larger "
                "tensor_parallel_size, quantization, or a smaller max_model_len / max_num_seqs.")
        for x in devices:
            free[x] -= need[x]
        chosen[d.name] = devices
    return _fractions(gpus, demands, chosen, budget)


def _need_on(d: Demand, by_id: dict[str, Gpu], devices: tuple[str, ...]) -> dict[str, float]:
    """Bytes the engine takes on each device: its estimate, or its explicit fraction of the device."""
    if d.gpu_memory_utilization is None:
        return {x: d.need_per_device for x in devices}
    out = {}
    for x in devices:
        given = d.gpu_memory_utilization * by_id[x].total_bytes
        if given < d.need_per_device:
            raise PlanError(f"model {d.name!r}: gpu_memory_utilization {d.gpu_memory_utilization} gives "
                            f"{given / GB:.1f} GB on GPU {x}, but it needs {d.need_per_device / GB:.1f} GB")
        out[x] = given
    return out


def _fractions(gpus: list[Gpu], demands: list[Demand], chosen: dict[str, tuple[str, ...]],
               budget: float) -> GpuPlan:
    """Each engine's gpu_memory_utilization: its need scaled up by what its devices leave unused."""
    by_id = {g.id: g for g in gpus}
    fixed = {d.name: d for d in demands}
    need = {x: 0.0 for x in by_id}
    for name, devices in chosen.items():
        d = fixed[name]
        for x, nbytes in _need_on(d, by_id, devices).items():
            need[x] += nbytes
    placements, used = {}, {x: 0.0 for x in by_id}
    for name, devices in chosen.items():
        d = fixed[name]
        if d.gpu_memory_utilization is not None:
            fraction = d.gpu_memory_utilization
        else:
            # On each device, spread its budget over the engines there in proportion to need; an
            # engine's one fraction must hold on all its devices, so take the smallest.
            fraction = min(budget * d.need_per_device / need[x] for x in devices)
            fraction = math.floor(fraction * 1000) / 1000
        for x in devices:
            used[x] += fraction
        placements[name] = Placement(name, devices, fraction, d.need_per_device, d.weight_bytes / d.world,
                                     d.kv_bytes / d.world, d.tensor_parallel_size, d.pipeline_parallel_size)
    over = [x for x, f in used.items() if f > 1.0 + 1e-9]
    if over:
        raise PlanError(f"GPU {over[0]}: the engines' gpu_memory_utilization values add up to {used[over[0]]:.2f}")
    return GpuPlan(gpus, placements, budget, used)


def plan_cores(cores: list[int], weights: dict[str, float]) -> dict[str, str]:
    """Core lists for CPU engines, in proportion to `weights` (e.g. parameters).

    Engines whose share is a core or more get disjoint lists. An engine whose share is under one core (a
    135M model beside a 0.5B on 2 cores) does not take a whole core from the others: it binds one core of
    the largest engine, which keeps all of its own. A disjoint 1 + 1 split leaves the small engine's core
    idle whenever it is (most of a pipeline, since small models answer first) and halves the large one;
    sharing the core measured +26% requests/s and 0.87x the p90 for moa-lite at 8 clients on 2 cores
    (docs/BENCHMARKS.md, "CPU cores"). Engines of similar size still get disjoint cores: two busy engines
    on the same cores raised that p90 by a third.
    """
    names = list(weights)
    if not names:
        return {}
    cores = sorted(cores)
    total = sum(max(w, 0.0) for w in weights.values())
    shares = {n: (max(weights[n], 0.0) / total if total else 1 / len(names)) * len(cores) for n in names}
    largest = max(names, key=lambda n: shares[n])
    hosts = [n for n in names if n == largest or shares[n] >= 1.0]
    out = _split(cores, {n: shares[n] for n in hosts})
    guests = [n for n in names if n not in hosts]
    for i, name in enumerate(guests):  # from the largest engine's last core backwards
        out[name] = [out[largest][-1 - i % len(out[largest])]]
    return {n: ",".join(map(str, out[n])) for n in names}


def _split(cores: list[int], shares: dict[str, float]) -> dict[str, list[int]]:
    """Disjoint core lists by largest remainder, one core at least (round-robin when cores run short)."""
    names = list(shares)
    if len(cores) < len(names):
        return {n: [cores[i % len(cores)]] for i, n in enumerate(names)}
    scale = len(cores) / sum(shares.values())
    shares = {n: s * scale for n, s in shares.items()}
    counts = {n: max(1, math.floor(shares[n])) for n in names}
    # Hand out what is left by largest remainder; take back from the biggest if the minimums overshot.
    while sum(counts.values()) < len(cores):
        n = max(names, key=lambda k: shares[k] - counts[k])
        counts[n] += 1
    while sum(counts.values()) > len(cores):
        n = max((k for k in names if counts[k] > 1), key=lambda k: counts[k] - shares[k])
        counts[n] -= 1
    out, start = {}, 0
    for n in names:
        out[n] = cores[start:start + counts[n]]
        start += counts[n]
    return out
