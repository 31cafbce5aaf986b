#!/usr/bin/env bash
# README's first command on an empty machine: a fresh clone, an empty model home and empty installer caches.
# Prints the wall clock from `./scripts/moa serve` to: .venv ready, every model pulled, the first answer
# (the default model), and GET /ready == 200. Downloads vary: compare figures of one run, or one day.
#
#   scripts/first_answer.sh [REPO]     # REPO: what to clone (default: this checkout); PORT=8765
# Everything lands in one /tmp/first-answer.* folder (~8 GB: .venv, models, caches); remove it afterwards.
set -euo pipefail
src="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
work="$(mktemp -d /tmp/first-answer.XXXX)"
port="${PORT:-8765}"
deadline=$(( $(date +%s) + ${TIMEOUT:-3600} ))  # a model refused by its check keeps /ready 503
git clone -q "$src" "$work/clone"
export MOA_HOME="$work/home" UV_CACHE_DIR="$work/uv-cache" PIP_CACHE_DIR="$work/pip-cache"
model="$(awk '/^default_model:/ {print $2}' "$work/clone/models.yaml")"
cd "$work/clone"
t0=$(date +%s.%N)
since() { python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.0f}')" "$(date +%s.%N)" "$t0"; }
setsid ./scripts/moa serve --port "$port" >"$work/serve.log" 2>&1 &
pid=$!
cleanup() { kill -TERM -- "-$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
trap cleanup EXIT
venv="" pulled="" first="" ready=""
while kill -0 "$pid" 2>/dev/null && (( $(date +%s) < deadline )); do
  [[ -z "$venv" ]] && compgen -G ".venv/.moa-setup-*" >/dev/null && venv=$(since) && echo "venv ready: ${venv} s"
  if [[ -z "$pulled" ]] && grep -q "engine 1 of" "$work/serve.log" 2>/dev/null; then
    pulled=$(since); echo "models pulled, first engine starting: ${pulled} s"
  fi
  if [[ -z "$first" ]]; then
    code=$(curl -s -o "$work/answer.json" -w '%{http_code}' "http://127.0.0.1:$port/v1/chat/completions" \
      -H 'Content-Type: application/json' -d "{\"model\": \"$model\", \"max_tokens\": 16,
      \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}" || true)
    [[ "$code" == 200 ]] && first=$(since) && echo "first answer ($model): ${first} s: $(head -c 300 "$work/answer.json")"
  fi
  if [[ -n "$first" && -z "$ready" ]]; then
    [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ready" || true)" == 200 ]] \
      && ready=$(since) && echo "/ready 200: ${ready} s" && break
  fi
  sleep 2
done
[[ -n "$ready" ]] || { echo "no /ready 200 (the server stopped, or TIMEOUT passed); its log: $work/serve.log"; tail -20 "$work/serve.log"; exit 1; }
echo "{\"venv_s\": ${venv:-null}, \"pulled_s\": ${pulled:-null}, \"first_answer_s\": $first, \"ready_s\": $ready}" \
  | tee "$work/first_answer.json"
echo "log: $work/serve.log"
