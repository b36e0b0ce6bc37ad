#!/usr/bin/env bash
# One node, all its GPUs (or N CPU processes): bash launch/single_node.sh RECIPE.yaml [key=value ...]
# torchrun starts `python -m train` (what `vlrecipe train` runs) in every process.
# NPROC (default: number of GPUs, else 1), MASTER_PORT (default 29500).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec torchrun --standalone --nproc_per_node "$NPROC" -m train "$@"
