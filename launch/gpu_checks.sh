#!/usr/bin/env bash
# GPU-only checks (needs 2 GPUs for the ZeRO part, 1 for Q-LoRA):
#   bash launch/gpu_checks.sh [OUT_DIR] [key=value ...]
# 1. bf16 ZeRO-2 and ZeRO-3 over 2 GPUs on a small-but-real model (models.presets.small: a ViT-L/14-shaped
#    tower at 448 px, 256 queries, a Qwen2-0.5B-shaped decoder, random weights) on the synthetic world:
#    train 20 of 40 steps -> resume from the step-20 checkpoint -> export -> load the export;
# 2. Q-LoRA (4-bit NF4, double quant, bf16 compute) SFT on one GPU from the ZeRO-2 export,
# 3. the gpu-marked LoRA tests.
# Extra key=value overrides apply to every training run (SKIP_QLORA=1 skips 2 and 3, e.g. on CPU with
# DS_ACCELERATOR=cpu and a tiny model to check the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-runs/gpu_checks}")
shift $(( $# > 0 ? 1 : 0 ))
WORLD="$OUT/data/synthetic"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false CUDA_DEVICE_MAX_CONNECTIONS=1
vlrecipe() { python -m train.cli "$@"; }  # the command (train/cli.py), installed or not
mkdir -p "$OUT"
[[ -f "$WORLD/manifest.json" ]] || vlrecipe synth --out "$WORLD" --seed 0
# The tiny recipes' optimiser, schedule and logging, with the small model at 448 px (256 image tokens).
model=(model.preset=small model.tokenizer_path="$WORLD/tokenizer" model.image_size=448 data.image_size=448
       data.max_len=1024 train.bf16=true log.every=5 log.progress_bar=false "$@")
for mode in zero2 zero3; do
  run="$OUT/$mode"
  rm -rf "$run"
  args=("${model[@]}" "data.paths=[$WORLD/multitask.jsonl]" freeze.llm=train optim.lr=1.0e-4 train.steps=40
        train.micro_batch=4 train.grad_accum=2 checkpoint.every=10 parallel.mode=$mode checkpoint.out_dir="$run")
  torchrun --standalone --nproc_per_node 2 -m train recipes/tiny/pretrain.yaml "${args[@]}" train.stop_after_steps=20
  torchrun --standalone --nproc_per_node 2 -m train recipes/tiny/pretrain.yaml "${args[@]}" train.resume=auto
  python -c "from models import load_vlm; m = load_vlm('$run/final'); print('$mode export loads:', sum(p.numel() for p in m.parameters()), 'params')"
done
[[ -n "${SKIP_QLORA:-}" ]] && { echo "gpu checks done (Q-LoRA skipped): $OUT"; exit 0; }
# Q-LoRA on one GPU: SFT from the ZeRO-2 export, the decoder in 4-bit.
CUDA_VISIBLE_DEVICES=0 vlrecipe train recipes/tiny/sft_lora.yaml "${model[@]}" "data.paths=[$WORLD/sft.json]" \
    model.preset=null model.init_from="$OUT/zero2/final" checkpoint.out_dir="$OUT/qlora" \
    quantization.enabled=true train.steps=20 train.micro_batch=4 parallel.mode=auto
CUDA_VISIBLE_DEVICES=0 python -m pytest -q -m gpu tests/test_train_lora.py
echo "gpu checks done: $OUT"
