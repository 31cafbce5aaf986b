#!/usr/bin/env bash
# Set up, pull the embedded models the tests use, and run the whole test suite (real engines).
# Extra arguments go to pytest, e.g. scripts/test.sh -k registry -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 VLLM_HOST_IP=127.0.0.1
.venv/bin/moa models pull smollm2-135m qwen2.5-coder-0.5b  # the models the tests' engines run (the 1.5B: none)
.venv/bin/python scripts/train_adapters.py  # the LoRA adapters the adapter tests serve (kept when up to date)
# The playground's browser tests drive the system's Chromium (Debian's package; Playwright downloads nothing).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "moa-stack: installing Debian's chromium for the browser tests…" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
      || echo "moa-stack: could not install chromium: the browser tests will skip" >&2
  else
    echo "moa-stack: no chromium: the browser tests skip (install it: sudo apt-get install chromium)" >&2
  fi
fi
exec .venv/bin/python -m pytest -ra --timeout=900 --durations=30 "$@"
