#!/usr/bin/env bash
# Set up, pull the embedded models the tests use, and run the whole test suite (real engines).
# Extra arguments go to pytest, e.g. scripts/test.sh -k registry -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 VLLM_HOST_IP=127.0.0.1
.venv/bin/moa models pull smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b  # every embedded model: the known-answer test checks each
exec .venv/bin/python -m pytest -ra --timeout=900 "$@"
