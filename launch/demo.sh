#!/usr/bin/env bash
# The embedded demo on CPU: synthetic world -> pretrain -> multitask -> SFT of models.presets.demo,
# each stage evaluated on held-out synthetic benchmarks (the recipe's eval section, train/loop.py).
#   bash launch/demo.sh [OUT_DIR]      (default runs/demo; about 8-10 minutes on 2 free CPU cores)
#   DPO=1 bash launch/demo.sh [OUT_DIR]   adds a fourth stage, DPO on preference pairs (about 3 minutes more),
#                                         and the held-out preference accuracy (synth_preference) to every
#                                         evaluation
# Prints a metrics table after each stage and writes OUT_DIR/metrics.json as
# {stage: {benchmark: {metric: value}}}, the untrained model as stage "untrained".
# Smaller runs (tests/test_demo.py) set N_TRAIN, N_EVAL, EVAL_LIMIT, PRETRAIN_STEPS, MULTITASK_STEPS,
# SFT_STEPS, DPO_STEPS and MICRO_BATCH; by default the recipes/tiny/demo_*.yaml values apply. DEMO_THREADS
# (default 2) is torch's CPU thread count; the README's figures are for 2.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-runs/demo}")
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
DATA_ROOT="$OUT/data"  # eval_mm's data root: the synthetic benchmarks live in DATA_ROOT/synthetic
WORLD="$DATA_ROOT/synthetic"
BENCHES=${BENCHES:-synth_caption,synth_vqa,synth_grounding,synth_mc${DPO:+,synth_preference}}
# Every held-out sample by default: one per eval image for caption, VQA, grounding and multiple choice (200),
# every preference pair of those images (several per image) for synth_preference. EVAL_LIMIT caps each benchmark.
EVAL_LIMIT=${EVAL_LIMIT:-}
# The thread count is pinned, not taken from the environment: it sets the order of float sums in torch's
# CPU kernels, so 1 and 2 threads give different weights from the first step (README "reproducible").
DEMO_THREADS=${DEMO_THREADS:-2}
export OMP_NUM_THREADS=$DEMO_THREADS MKL_NUM_THREADS=$DEMO_THREADS TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
start=$SECONDS
mkdir -p "$OUT"
[[ -f "$WORLD/manifest.json" ]] || $PY -m data.synthetic --out "$WORLD" --seed 0 \
    --n-train "${N_TRAIN:-2000}" --n-eval "${N_EVAL:-200}"

# Overrides shared by every stage; the optional ones only when set in the environment.
common=(model.tokenizer_path="$WORLD/tokenizer" log.progress_bar=false
        "eval.benches=[$BENCHES]" eval.data_root="$DATA_ROOT")
[[ -n "$EVAL_LIMIT" ]] && common+=(eval.limit="$EVAL_LIMIT")
[[ -n "${MICRO_BATCH:-}" ]] && common+=(train.micro_batch="$MICRO_BATCH")
stage() {  # stage NAME RECIPE DATA_FILE STEPS [overrides...]
    local name=$1 recipe=$2 data=$3 n=$4; shift 4
    echo -e "\n===== $name ($(( SECONDS - start )) s so far)"
    $PY -m train "recipes/tiny/$recipe" "${common[@]}" "data.paths=[$WORLD/$data]" \
        checkpoint.out_dir="$OUT/$name" ${n:+train.steps=$n} "$@"
}

# The untrained model: stage 1's initial weights (same seed), exported by a one-step run at lr 0.
stage untrained demo_pretrain.yaml pretrain.jsonl 1 optim.lr=0.0 schedule.warmup_steps=0 schedule.min_lr=0.0
stage pretrain demo_pretrain.yaml pretrain.jsonl "${PRETRAIN_STEPS:-}"
stage multitask demo_multitask.yaml multitask.jsonl "${MULTITASK_STEPS:-}" model.init_from="$OUT/pretrain/final"
stage sft demo_sft.yaml sft.json "${SFT_STEPS:-}" model.init_from="$OUT/multitask/final"
if [[ -n "${DPO:-}" ]]; then
    stage dpo demo_dpo.yaml dpo.json "${DPO_STEPS:-}" model.init_from="$OUT/sft/final"
fi

# Gather the per-stage figures (RUN/final/metrics.json, written by the recipe's eval) into one file.
$PY - "$OUT" "$(( SECONDS - start ))" "${DPO:-}" <<'PYEOF'
import json, sys
from pathlib import Path

out, seconds = Path(sys.argv[1]), int(sys.argv[2])
stages = ("untrained", "pretrain", "multitask", "sft") + (("dpo",) if sys.argv[3] else ())
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
if "dpo" in results:  # DPO's implicit reward on the held-out pairs, its SFT start as the reference
    from eval_mm.metrics import reward_accuracy
    from eval_mm.runner import read_predictions

    margins = {s: {k: r["prediction"] for k, r in read_predictions(out / s / "eval" / "synth_preference").items()}
               for s in ("sft", "dpo")}
    reward = reward_accuracy(margins["dpo"], margins["sft"], where="synth_preference")
    results["dpo"]["synth_preference"] |= reward
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nDPO's reward accuracy on the {reward['num_pairs']} held-out pairs (its margin over the SFT export's): "
          f"{reward['reward_accuracy']:.1f}% (mean margin change {reward['mean_margin_change']:+.2f} nats)")
print(f"\nwrote {out / 'metrics.json'}; demo wall time {seconds // 60} min {seconds % 60} s")
PYEOF
