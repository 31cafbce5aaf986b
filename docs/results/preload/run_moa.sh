#!/bin/bash
cd /work/main
TC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
for v in none tcmalloc; do
  case $v in none) P="";; tcmalloc) P=$TC;; esac
  echo "== $v $(date +%T)"
  LD_PRELOAD=$P .venv/bin/moa bench -p self-moa --swap qwen2.5-coder-1.5b=qwen2.5-coder-0.5b --max-tokens 64 --concurrency 8 --requests 24 --systems moa -o /tmp/preload/moa-$v > /tmp/preload/moa-$v.log 2>&1
  echo "rc=$? $(date +%T)"
done
echo done
