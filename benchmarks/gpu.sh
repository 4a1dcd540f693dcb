#!/usr/bin/env bash
# LoRA training speed and memory on one CUDA GPU: lorakit vs PEFT vs the frozen floor, QLoRA beside.
# One command, under 8 minutes on an H200:   bash benchmarks/gpu.sh [extra gpu_bench.py flags]
# Needs a CUDA build of torch (and bitsandbytes with CUDA for the qlora variant) in the environment
# that PYTHON names (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
exec timeout 470 "$PYTHON" benchmarks/gpu_bench.py --json "${GPU_BENCH_JSON:-gpu_bench.json}" "$@"
