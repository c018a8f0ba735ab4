#!/usr/bin/env bash
# The CUDA paths checked in one command on a GPU box (torch for its CUDA installed, see README): encoder + head
# throughput and memory at 767 and 16,907 genes in fp32 and bf16, the full preset's training under a one-process
# torchrun over NCCL with and without --amp, and AMP-vs-fp32 predictions. Results: benchmarks/results/gpu_check.md.
#   bash benchmarks/gpu_check.sh            # at most 8 minutes
#   bash benchmarks/gpu_check.sh --smoke    # a tiny model on the CPU (what CI runs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
timeout 480 python -m benchmarks.gpu_check "$@"
