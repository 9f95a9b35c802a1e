#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): installs what this checkout needs and the machine lacks, runs the CUDA tests,
# measures the GPU rows, fine-tunes briefly on Market-1501; under 8 minutes on one GPU.
#   bench/gpu_check.sh --dry-run          # print and check the plan (no GPU needed)
#   bench/gpu_check.sh                    # run it; results in bench/results/gpu_check/<timestamp>/
# PYTHON picks the interpreter (default python3: on a GPU machine, the one that has the CUDA build of torch).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py --python "${PYTHON:-python3}" "$@"
