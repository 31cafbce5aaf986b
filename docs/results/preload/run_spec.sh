#!/bin/bash
cd /work/main
IO=$PWD/.venv/lib/libiomp5.so
for v in iomp none; do
  case $v in none) P="";; iomp) P=$IO;; esac
  echo "== $v $(date +%T)"
  LD_PRELOAD=$P .venv/bin/python scripts/bench_speculative.py --json /tmp/preload/spec-$v.json > /tmp/preload/spec-$v.log 2>&1
  echo "rc=$? $(date +%T)"
done
echo done
