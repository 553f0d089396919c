#!/usr/bin/env bash
# The GPU benchmark in one short call (< 8 minutes on one H100): DiT-XL/2 dense vs TREAD, bf16, eager,
# per-block torch.compile, FSDP2 on one GPU, and the reference's routing mechanics (variant reference).
# Prints a table and a RESULT line; writes it to $OUT if set.
#   benchmarks/gpu_bench.sh [--batch 64] [--variants dense,tread]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
log="${OUT:-.}/gpu_bench.txt"
timeout "${GPU_BENCH_TIMEOUT:-470}" "$PY" benchmarks/gpu_bench.py "$@" 2>&1 | tee "$log"
