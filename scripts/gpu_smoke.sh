#!/usr/bin/env bash
# On the first GPU machine: confirm the GPU path end to end in minutes, and write one report.
#
#   scripts/gpu_smoke.sh [-c CONFIG] [-o DIR]     (default: models.yaml, bench-results/gpu-smoke)
#
# 1. `moa plan` against this machine's GPUs (NVML), as JSON and as a table.
# 2. `moa serve` with that config; waits for GET /ready (engines loaded and known-answer checked).
# 3. For every EngineCore process: its CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER (from /proc/PID/environ)
#    against the plan; then every process nvidia-smi lists, mapped to its engine (MOA_ENGINE): its
#    memory must be on a GPU the plan gave that engine (serving/placement/check.py).
# 4. One request per served model and per pipeline through the OpenAI API.
# 5. A short `moa bench --url` on the first pipeline.
# 6. The same pipeline in process under vLLM's fcfs and priority scheduling (issue: later layers first).
# 7. LoRA: the adapter tests and scripts/bench_lora.py on the GPU (three adapters, the base unchanged beside them).
# 8. Prompt-lookup speculation: the first pipeline in process with and without --speculative ngram (acceptance
#    per layer, aggregation-layer latency, p50/p90) at 1 and 8 clients.
# Exit status: non-zero if any step failed; the report says which.
set -uo pipefail
cd "$(dirname "$0")/.."
config=models.yaml
out=bench-results/gpu-smoke
while getopts "c:o:" opt; do
  case $opt in c) config=$OPTARG ;; o) out=$OPTARG ;; *) exit 2 ;; esac
done
mkdir -p "$out"
report="$out/report.md"
moa=.venv/bin/moa
[ -x "$moa" ] || { MOA_DEVICE=gpu scripts/setup.sh && moa=.venv/bin/moa; }
key="smoke-$RANDOM$RANDOM"
port=18000
failed=0
step() { echo "## $1" | tee -a "$report"; }
fail() { echo "FAILED: $1" | tee -a "$report"; failed=1; }

: > "$report"
echo "# GPU smoke test, $(date -u +%FT%TZ), config $config" >> "$report"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | sed 's/^/    /' >> "$report" \
  || fail "nvidia-smi"

step "1. plan"
if "$moa" plan -c "$config" --json > "$out/plan.json"; then
  "$moa" plan -c "$config" | tee -a "$report"
else
  fail "moa plan refused this machine's GPUs (see above)"; exit 1
fi

step "2. serve"
"$moa" serve -c "$config" --port "$port" --api-key "$key" > "$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
ready=""
for _ in $(seq 1 360); do  # up to 30 minutes for large models
  if ! kill -0 $server 2>/dev/null; then fail "moa serve exited (tail of serve.log below)"; tail -20 "$out/serve.log" >> "$report"; exit 1; fi
  ready=$(curl -sf -H "Authorization: Bearer $key" "http://127.0.0.1:$port/ready") && break
  sleep 5
done
[ -n "$ready" ] || { fail "/ready never answered 200"; exit 1; }
echo "$ready" > "$out/ready.json"
echo "ready: $ready" >> "$report"

step "3. placement as applied"
# Each EngineCore's CUDA_VISIBLE_DEVICES string, then where nvidia-smi says each engine's memory really is.
.venv/bin/python - "$out/plan.json" "$server" >> "$report" <<'PY' || fail "engine environments do not match the plan"
import json, sys
import psutil
from serving.placement.check import environ_of

plan = json.load(open(sys.argv[1]))["gpu"]
server = psutil.Process(int(sys.argv[2]))
cores = [p for p in server.children(recursive=True) if "EngineCore" in " ".join([p.name(), *p.cmdline()])]
seen = {}
for proc in cores:
    env = environ_of(proc.pid) or {}
    seen[env.get("MOA_ENGINE")] = (env.get("CUDA_VISIBLE_DEVICES"), env.get("CUDA_DEVICE_ORDER"))
    print(f"- EngineCore pid {proc.pid} ({env.get('MOA_ENGINE')}): CUDA_VISIBLE_DEVICES="
          f"{env.get('CUDA_VISIBLE_DEVICES')} CUDA_DEVICE_ORDER={env.get('CUDA_DEVICE_ORDER')}")
planned = {name: (e["cuda_visible_devices"], "PCI_BUS_ID") for name, e in plan["engines"].items()}
print(f"- planned: {planned}")
sys.exit(0 if seen == planned else 1)
PY
.venv/bin/python -m serving.placement.check "$out/plan.json" >> "$report" \
  || fail "an engine's GPU memory is not on the GPU the plan gave it (nvidia-smi per process)"

step "4. one request per model and pipeline"
targets=$(curl -sf -H "Authorization: Bearer $key" "http://127.0.0.1:$port/v1/models" \
  | .venv/bin/python -c 'import json,sys; print(" ".join(m["id"] for m in json.load(sys.stdin)["data"]))')
for target in $targets; do
  started=$SECONDS
  body=$(printf '{"model":"%s","messages":[{"role":"user","content":"What is the capital of France? One word."}],"max_tokens":64}' "$target")
  if answer=$(curl -sf -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
                   "http://127.0.0.1:$port/v1/chat/completions" -d "$body"); then
    text=$(echo "$answer" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"][:80].replace("\n"," "))')
    printf -- '- %s: %d s: %s\n' "$target" $((SECONDS - started)) "$text" | tee -a "$report"
  else
    fail "$target did not answer"
  fi
done

step "5. short bench"
first=$(echo "$targets" | tr ' ' '\n' | .venv/bin/python -c '
import sys, yaml
names = [l.strip() for l in sys.stdin if l.strip()]
pipes = yaml.safe_load(open(sys.argv[1])).get("pipelines", {})
print(next((n for n in names if n in pipes), names[0]))' "$config")
"$moa" bench --url "http://127.0.0.1:$port" --api-key "$key" -p "$first" --requests 16 \
  --concurrency 1,8 --max-tokens 128 -o "$out/bench" >> "$report" 2>&1 || fail "moa bench --url"

step "6. scheduling: fcfs against priority (later layers first), in process"
kill $server 2>/dev/null; wait $server 2>/dev/null  # its engines hold the GPUs
if grep -q "^pipelines:" "$config" && "$moa" plan -c "$config" -p "$first" >/dev/null 2>&1; then
  for policy in fcfs priority; do
    "$moa" bench -c "$config" -p "$first" --systems moa,raw --requests 32 --concurrency 8,16 --max-tokens 128 \
      --scheduling "$policy" -o "$out/scheduling-$policy" >> "$report" 2>&1 || fail "moa bench --scheduling $policy"
  done
  echo "compare $out/scheduling-fcfs/summary.md with $out/scheduling-priority/summary.md (p90, efficiency)" >> "$report"
fi

step "7. LoRA: three adapters and the base in one batch on one GPU engine"
# Trains the three small adapters if needed (seconds on a GPU machine's CPU), then the adapter tests on the GPU
# engine: each adapter's trained reply, the base answer unchanged beside them, vLLM holding all four at once.
.venv/bin/python scripts/train_adapters.py >> "$report" 2>&1 || fail "train adapters"
.venv/bin/python -m pytest -q tests/test_adapters.py >> "$report" 2>&1 || fail "LoRA adapters on the GPU"
.venv/bin/python scripts/bench_lora.py --clients 1 8 --json "$out/lora.json" >> "$report" 2>&1 || fail "bench_lora"

step "8. prompt-lookup speculation (ngram) against none, in process"
if grep -q "^pipelines:" "$config" && "$moa" plan -c "$config" -p "$first" >/dev/null 2>&1; then
  for mode in off ngram; do
    "$moa" bench -c "$config" -p "$first" --systems moa --requests 16 --concurrency 1,8 --max-tokens 256 \
      --speculative "$mode" -o "$out/speculative-$mode" >> "$report" 2>&1 || fail "moa bench --speculative $mode"
  done
  echo "compare $out/speculative-off/summary.md with $out/speculative-ngram/summary.md (layers s, drafts accepted)" \
    >> "$report"
fi

echo >> "$report"
[ $failed -eq 0 ] && echo "RESULT: all steps passed" | tee -a "$report" || echo "RESULT: some steps failed" | tee -a "$report"
echo "report: $report"
exit $failed
