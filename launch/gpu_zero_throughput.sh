#!/usr/bin/env bash
# Full SFT of the full-scale Qwen-VL shape (random weights; ViT frozen, LLM + resampler train) under
# DeepSpeed ZeRO on all GPUs of one node, for tokens/s, MFU and peak memory (printed by the training loop):
#   bash launch/gpu_zero_throughput.sh [zero2|zero3] [OUT_DIR] [key=value ...]
# The synthetic world's tokenizer is small; model.pad_vocab_to gives the decoder Qwen's 151,936-row
# embedding and LM head, so the model is the real 9.65B shape. Samples of up to 2048 tokens packed into
# rows of up to 16384 (data.pack_len: no row padding), varlen attention,
# liger kernels and fused linear cross-entropy, every decoder layer checkpointed.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-zero3}
OUT=$(realpath -m "${2:-runs/zero_throughput}")
shift $(( $# > 2 ? 2 : $# ))
WORLD="$OUT/data/synthetic"
NGPU=${NGPU:-$(python -c 'import torch; print(torch.cuda.device_count())')}
# More than torchrun's default of one CPU thread per rank (image transforms, host-side set-up).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false CUDA_DEVICE_MAX_CONNECTIONS=1
vlrecipe() { python -m train.cli "$@"; }  # the command (train/cli.py), installed or not
[[ -f "$WORLD/manifest.json" ]] || vlrecipe synth --out "$WORLD" --seed 0 --n-train 2000 --n-eval 10
torchrun --standalone --nproc_per_node "$NGPU" -m train recipes/sft.yaml model.init_from=null \
    model.preset=qwen_vl_7b model.pad_vocab_to=151936 model.tokenizer_path="$WORLD/tokenizer" \
    "data.paths=[$WORLD/sft.json]" data.num_workers=6 data.pack_len=16384 parallel.mode="$MODE" \
    perf.attention=varlen perf.loss_impl=auto perf.liger_kernels=true perf.check_image_spans=false \
    checkpoint.out_dir="$OUT/$MODE" checkpoint.every=0 train.steps=100 train.micro_batch=24 train.grad_accum=1 \
    train.stop_after_steps=16 train.resume=null "eval.benches=[]" schedule.warmup_steps=2 log.backend=console \
    log.every=4 log.progress_bar=false "$@"
