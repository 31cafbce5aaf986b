#!/bin/bash
# raw engine throughput under four LD_PRELOAD variants, two rounds interleaved
cd /work/main
TC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
IO=$PWD/.venv/lib/libiomp5.so
for round in 1 2; do
for v in none tcmalloc iomp both; do
  case $v in none) P="";; tcmalloc) P=$TC;; iomp) P=$IO;; both) P=$TC:$IO;; esac
  echo "== $round $v $(date +%T)"
  LD_PRELOAD=$P .venv/bin/python scripts/bench_engines.py qwen2.5-coder-0.5b --json /tmp/preload/raw-$v-$round.json > /tmp/preload/raw-$v-$round.log 2>&1
  echo "rc=$?"
done; done
echo done
