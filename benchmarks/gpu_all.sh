#!/usr/bin/env bash
# Every CUDA block of docs/PERFORMANCE.md in one call of at most 10 minutes on a lent GPU (benchmarks/gpu_all.py).
# Try it first on the CPU: bash benchmarks/gpu_all.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_all.py "$@"
