#!/usr/bin/env bash
# The embedded demo on CPU: synthetic world -> tiny pretrain -> multitask -> SFT -> evaluation.
#   bash launch/demo.sh [OUT_DIR]      (default runs/demo)
# Prints a metrics table after each stage and writes OUT_DIR/metrics.json as
# {stage: {benchmark: {metric: value}}}, the untrained model as stage "untrained".
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-runs/demo}")
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
WORLD="$OUT/data/synthetic"
BENCHES=${BENCHES:-synth_caption,synth_vqa,synth_grounding}
EVAL_LIMIT=${EVAL_LIMIT:-100}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
[[ -f "$WORLD/manifest.json" ]] || $PY -m data.synthetic --out "$WORLD" --seed 0

common=(model.tokenizer_path="$WORLD/tokenizer" log.progress_bar=false)
# The untrained model: stage 1's initial weights (same seed), exported by a one-step run at lr 0.
$PY -m train recipes/tiny/pretrain.yaml "${common[@]}" "data.paths=[$WORLD/pretrain.jsonl]" \
    checkpoint.out_dir="$OUT/untrained" train.steps=1 optim.lr=0.0 schedule.warmup_steps=0 schedule.min_lr=0.0
$PY -m train recipes/tiny/pretrain.yaml "${common[@]}" "data.paths=[$WORLD/pretrain.jsonl]" checkpoint.out_dir="$OUT/pretrain"
$PY -m train recipes/tiny/multitask.yaml "${common[@]}" "data.paths=[$WORLD/multitask.jsonl]" \
    model.init_from="$OUT/pretrain/final" checkpoint.out_dir="$OUT/multitask"
$PY -m train recipes/tiny/sft.yaml "${common[@]}" "data.paths=[$WORLD/sft.json]" \
    model.init_from="$OUT/multitask/final" checkpoint.out_dir="$OUT/sft"

$PY - "$OUT" "$BENCHES" "$EVAL_LIMIT" "$(dirname "$WORLD")" <<'PYEOF'
import json, sys
from pathlib import Path

import eval_mm
from eval_mm.prompts import checkpoint_prompt_format
from models import VLM

out, benches, limit, data_root = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]
results = {}
for stage in ("untrained", "pretrain", "multitask", "sft"):
    ckpt = out / stage / "final"
    model = VLM.from_pretrained(ckpt).eval()
    results[stage] = eval_mm.evaluate(model, model.tokenizer, benches, data_root, out / "eval" / stage, limit=limit,
                                      batch_size=8, prompt_format=checkpoint_prompt_format(ckpt))
    print(f"\n== {stage} ({checkpoint_prompt_format(ckpt)} prompts)")
    for bench, metrics in results[stage].items():
        print(f"  {bench:<20}" + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
print(f"\nwrote {out / 'metrics.json'}")
PYEOF
