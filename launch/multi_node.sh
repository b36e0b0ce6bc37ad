#!/usr/bin/env bash
# Several nodes. Run on every node with the same MASTER_ADDR/MASTER_PORT/NNODES and its own NODE_RANK:
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 bash launch/multi_node.sh recipes/sft.yaml
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 bash launch/multi_node.sh recipes/sft.yaml
# Or, with passwordless ssh and a DeepSpeed hostfile ("host slots=8" per line), from one node:
#   HOSTFILE=hostfile bash launch/multi_node.sh recipes/sft.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_DEVICE_MAX_CONNECTIONS=1
if [[ -n "${HOSTFILE:-}" ]]; then
  # The deepspeed launcher starts `python -m train` on every host (it adds --local_rank, which we accept).
  exec deepspeed --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" --module train "$@"
fi
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}" "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}"
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" -m train "$@"
