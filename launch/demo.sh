#!/usr/bin/env bash
# The embedded demo on CPU: synthetic world -> pretrain -> multitask -> SFT of models.presets.demo,
# each stage evaluated on held-out synthetic benchmarks (the recipe's eval section, train/loop.py).
#   bash launch/demo.sh [OUT_DIR]      (default runs/demo; about 8 minutes on 2 free CPU cores)
#   DPO=1 bash launch/demo.sh [OUT_DIR]   adds a fourth stage, DPO on the world's count and colour preference
#                                         pairs (about 2 minutes more),
#                                         the held-out preference accuracy (synth_preference) to every
#                                         evaluation, and DPO's change over SFT sample by sample
#   bash launch/demo.sh OUT_DIR --family qwen2_5_vl   a tiny random Qwen2.5-VL (transformers' own class,
#                                         models.families) instead: one SFT stage on the world's conversations
#                                         in the family's chat template and box convention
#                                         (recipes/tiny/demo_qwen2_5_vl.yaml), evaluated untrained and trained
#   vlrecipe demo [OUT_DIR] [--dpo] [--family NAME]   the same: runs this script (train/demo.py)
# Prints a metrics table after each stage and writes OUT_DIR/metrics.json as
# {stage: {benchmark: {metric: value}}}, the untrained model as stage "untrained"; with DPO=1 also
# OUT_DIR/dpo_vs_sft.json (eval_mm.compare: each change with its paired standard error).
# Smaller runs (tests/test_demo.py) set N_TRAIN, N_EVAL, EVAL_LIMIT, PRETRAIN_STEPS, MULTITASK_STEPS,
# SFT_STEPS, DPO_STEPS and MICRO_BATCH; by default the recipes/tiny/demo_*.yaml values apply. DEMO_THREADS
# (default 2) is torch's CPU thread count; the README's figures are for 2.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-runs/demo}")
# --family NAME: the Qwen-VL model of models.presets (qwen_vl, the default) or an HF family with a demo recipe.
FAMILY=qwen_vl
if [[ $# -gt 1 ]]; then
    if [[ $# -ne 3 || $2 != --family ]]; then
        echo "error: launch/demo.sh: usage: bash launch/demo.sh [OUT_DIR [--family NAME]]" >&2; exit 2
    fi
    FAMILY=$3
fi
if [[ $FAMILY != qwen_vl && ! -f recipes/tiny/demo_$FAMILY.yaml ]]; then
    known=$(cd recipes/tiny && ls demo_qwen*.yaml | sed 's/^demo_//; s/\.yaml$//' | paste -sd, -)
    echo "error: launch/demo.sh --family $FAMILY: no recipes/tiny/demo_$FAMILY.yaml (families: qwen_vl,$known)" >&2
    exit 2
fi
if [[ $FAMILY != qwen_vl && -n "${DPO:-}" ]]; then
    echo "error: launch/demo.sh: DPO=1 (--dpo) is for the Qwen-VL demo; --family $FAMILY has no DPO stage" >&2
    exit 2
fi
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
DATA_ROOT="$OUT/data"  # eval_mm's data root: the synthetic benchmarks live in DATA_ROOT/synthetic
WORLD="$DATA_ROOT/synthetic"
BENCHES=${BENCHES:-synth_caption,synth_vqa,synth_grounding,synth_mc${DPO:+,synth_preference}}
# Every held-out sample by default: one per eval image for caption, VQA, grounding and multiple choice (1,000),
# every preference pair of those images (several per image) for synth_preference. EVAL_LIMIT caps each benchmark.
# 1,000 rather than 200 images: a change of a few points between two stages is then about twice its paired
# standard error (about 1.2 points for VQA and grounding), where on 200 it was within it (README).
EVAL_LIMIT=${EVAL_LIMIT:-}
# The thread count is pinned, not taken from the environment: it sets the order of float sums in torch's
# CPU kernels, so 1 and 2 threads give different weights from the first step (README "reproducible").
DEMO_THREADS=${DEMO_THREADS:-2}
export OMP_NUM_THREADS=$DEMO_THREADS MKL_NUM_THREADS=$DEMO_THREADS TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
vlrecipe() { "$PY" -m train.cli "$@"; }  # the command (train/cli.py), run by the interpreter chosen above
start=$SECONDS
mkdir -p "$OUT"
[[ -f "$WORLD/manifest.json" ]] || vlrecipe synth --out "$WORLD" --seed 0 \
    --n-train "${N_TRAIN:-2000}" --n-eval "${N_EVAL:-1000}"
TOKENIZER=$WORLD/tokenizer
if [[ $FAMILY != qwen_vl ]]; then
    # A family's tokenizer is built from a qwen.tiktoken ranks file: the world's own BPE written as one
    # (train/demo.py), so the model has one embedding row per world token, as the Qwen-VL demo's does.
    TOKENIZER=$WORLD/qwen.tiktoken
    "$PY" -c 'import sys; from train.demo import write_world_tiktoken; write_world_tiktoken(*sys.argv[1:])' \
        "$WORLD/tokenizer" "$TOKENIZER"
fi

# Overrides shared by every stage; the optional ones only when set in the environment.
common=(model.tokenizer_path="$TOKENIZER" log.progress_bar=false
        "eval.benches=[$BENCHES]" eval.data_root="$DATA_ROOT")
[[ -n "$EVAL_LIMIT" ]] && common+=(eval.limit="$EVAL_LIMIT")
[[ -n "${MICRO_BATCH:-}" ]] && common+=(train.micro_batch="$MICRO_BATCH")
stage() {  # stage NAME RECIPE DATA_FILE STEPS [overrides...]
    local name=$1 recipe=$2 data=$3 n=$4; shift 4
    echo -e "\n===== $name ($(( SECONDS - start )) s so far)"
    vlrecipe train "recipes/tiny/$recipe" "${common[@]}" "data.paths=[$WORLD/$data]" \
        checkpoint.out_dir="$OUT/$name" ${n:+train.steps=$n} "$@"
}

# The untrained model: the first stage's initial weights (same seed), exported by a one-step run at lr 0.
untrained=(1 optim.lr=0.0 schedule.warmup_steps=0 schedule.min_lr=0.0)
if [[ $FAMILY == qwen_vl ]]; then
    stages=(untrained pretrain multitask sft ${DPO:+dpo})
    stage untrained demo_pretrain.yaml pretrain.jsonl "${untrained[@]}"
    stage pretrain demo_pretrain.yaml pretrain.jsonl "${PRETRAIN_STEPS:-}"
    stage multitask demo_multitask.yaml multitask.jsonl "${MULTITASK_STEPS:-}" model.init_from="$OUT/pretrain/final"
    stage sft demo_sft.yaml sft.json "${SFT_STEPS:-}" model.init_from="$OUT/multitask/final"
    if [[ -n "${DPO:-}" ]]; then
        stage dpo demo_dpo.yaml dpo_count_color.json "${DPO_STEPS:-}" model.init_from="$OUT/sft/final"
    fi
else
    stages=(untrained sft)
    stage untrained "demo_$FAMILY.yaml" sft.json "${untrained[@]}"
    stage sft "demo_$FAMILY.yaml" sft.json "${SFT_STEPS:-}"
fi

# Gather the per-stage figures (RUN/final/metrics.json, written by the recipe's eval) into one file.
$PY - "$OUT" "$(( SECONDS - start ))" "${stages[@]}" <<'PYEOF'
import json, sys
from pathlib import Path

out, seconds, stages = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
results = {s: json.loads((out / s / "final" / "metrics.json").read_text()) for s in stages}
(out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
# The headline metric of each benchmark, one row per stage (the README's table).
headline = {"synth_caption": "CIDEr", "synth_vqa": "vqa_accuracy", "synth_grounding": "accuracy_iou0.5", "synth_mc": "accuracy",
            "synth_preference": "accuracy"}
columns = [(b, m) for b, m in headline.items() if b in results["sft"] and m in results["sft"][b]]
print("\n| stage | " + " | ".join(f"{b} {m}" for b, m in columns) + " |")
print("|---|" + "---:|" * len(columns))
for s in stages:
    print(f"| {s} | " + " | ".join(f"{results[s][b][m]:.1f}" for b, m in columns) + " |")
if "dpo" in results:  # DPO against its start, the SFT export, sample by sample (vlrecipe eval compare)
    from eval_mm.compare import compare_runs, format_comparison

    comparison = compare_runs(out / "sft" / "eval", out / "dpo" / "eval", out / "data")
    (out / "dpo_vs_sft.json").write_text(json.dumps(comparison, indent=2) + "\n")
    reward_keys = ("reward_accuracy", "mean_margin_change", "num_pairs")
    if "synth_preference" in comparison:
        results["dpo"]["synth_preference"] |= {k: comparison["synth_preference"][k] for k in reward_keys}
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\nDPO against the SFT export it started from, on the same held-out samples (change and its paired "
          "standard error in points;\nreward accuracy: the share of pairs whose margin log p(chosen) - log p(rejected) "
          "grew over the SFT export's):")
    print(format_comparison(comparison, baseline="SFT", candidate="DPO"))
print(f"\nwrote {out / 'metrics.json'}; demo wall time {seconds // 60} min {seconds % 60} s")
PYEOF
