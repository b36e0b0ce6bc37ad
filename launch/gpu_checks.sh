#!/usr/bin/env bash
# GPU-only checks for the lead (needs 2 GPUs for the ZeRO part, 1 for Q-LoRA):
#   bash launch/gpu_checks.sh [OUT_DIR]
# 1. bf16 ZeRO-2 and ZeRO-3 over 2 GPUs on a small-but-real model (models.presets.small: a ViT-L/14-shaped
#    tower at 448 px, 256 queries, a Qwen2-0.5B-shaped decoder, random weights) on the synthetic world:
#    save -> resume -> export, and
# 2. Q-LoRA (4-bit NF4, double quant, bf16 compute) on one GPU, plus the gpu-marked pytest.
# Set LLM_PATH to a local HF causal LM directory (e.g. Qwen2-0.5B) to run the ZeRO checks on it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-runs/gpu_checks}")
WORLD="$OUT/data/synthetic"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false CUDA_DEVICE_MAX_CONNECTIONS=1
mkdir -p "$OUT"
[[ -f "$WORLD/manifest.json" ]] || python -m data.synthetic --out "$WORLD" --seed 0
if [[ -n "${LLM_PATH:-}" ]]; then
  model=(model.preset=qwen_vl_7b model.llm_path="$LLM_PATH" model.tokenizer_path="$LLM_PATH")
  # a small vision side so the LLM dominates; the 7B-shape ViT would not fit the point of this check
else
  model=(model.preset=small model.tokenizer_path="$WORLD/tokenizer" model.image_size=448 data.image_size=448
         data.max_len=1024 optim.lr=1.0e-4)
fi
common=("${model[@]}" "data.paths=[$WORLD/multitask.jsonl]" train.bf16=true train.steps=40 train.micro_batch=4
        train.grad_accum=2 checkpoint.every=10 log.every=5 log.progress_bar=false freeze.llm=train)
for mode in zero2 zero3; do
  run="$OUT/$mode"
  rm -rf "$run"
  torchrun --standalone --nproc_per_node 2 -m train recipes/tiny/pretrain.yaml "${common[@]}" \
      parallel.mode=$mode checkpoint.out_dir="$run" train.stop_after_steps=20
  torchrun --standalone --nproc_per_node 2 -m train recipes/tiny/pretrain.yaml "${common[@]}" \
      parallel.mode=$mode checkpoint.out_dir="$run" train.resume=auto
  python -c "from models import VLM; m = VLM.from_pretrained('$run/final'); print('$mode export loads:', sum(p.numel() for p in m.parameters()), 'params')"
done
# Q-LoRA on one GPU: the tiny SFT recipe from the ZeRO-2 export, decoder in 4-bit.
CUDA_VISIBLE_DEVICES=0 python -m train recipes/tiny/sft_lora.yaml "data.paths=[$WORLD/sft.json]" \
    model.init_from="$OUT/zero2/final" checkpoint.out_dir="$OUT/qlora" quantization.enabled=true \
    train.bf16=true train.steps=20 log.every=5 log.progress_bar=false parallel.mode=ddp
python -m pytest -q -m gpu tests/test_train_lora.py
echo "gpu checks done: $OUT"
