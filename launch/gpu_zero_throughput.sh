#!/usr/bin/env bash
# Full SFT of the full-scale Qwen-VL shape (random weights; ViT frozen, LLM + resampler train) under
# DeepSpeed ZeRO on all GPUs of one node, for tokens/s per GPU and MFU (printed by the training loop):
#   bash launch/gpu_zero_throughput.sh [zero2|zero3] [OUT_DIR] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-zero3}
OUT=$(realpath -m "${2:-runs/zero_throughput}")
shift $(( $# > 2 ? 2 : $# ))
WORLD="$OUT/data/synthetic"
NGPU=${NGPU:-$(python -c 'import torch; print(torch.cuda.device_count())')}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false CUDA_DEVICE_MAX_CONNECTIONS=1
[[ -f "$WORLD/manifest.json" ]] || python -m data.synthetic --out "$WORLD" --seed 0 --n-train 2000 --n-eval 10
torchrun --standalone --nproc_per_node "$NGPU" -m train recipes/sft.yaml model.init_from=null \
    model.preset=qwen_vl_7b model.tokenizer_path="$WORLD/tokenizer" "data.paths=[$WORLD/sft.json]" \
    data.num_workers=4 parallel.mode="$MODE" checkpoint.out_dir="$OUT/$MODE" checkpoint.every=0 \
    train.steps=100 train.micro_batch=6 train.grad_accum=1 train.stop_after_steps=12 train.resume=null "eval.benches=[]" \
    schedule.warmup_steps=2 log.backend=console log.every=2 log.progress_bar=false "$@"
