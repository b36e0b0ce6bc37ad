"""``vlrecipe demo [OUT_DIR] [--dpo] [--family NAME]`` (``python -m train.demo``): the embedded demo on CPU,
launch/demo.sh.

A synthetic world, then pretrain -> multitask -> SFT (-> DPO with --dpo) of models.presets.demo, each stage
evaluated on the world's held-out benchmarks; prints a table after each stage and writes OUT_DIR/metrics.json.
With ``--family qwen2_5_vl`` (any family with a recipes/tiny/demo_<family>.yaml): one SFT stage of that
family's tiny random model instead, in its own chat template and box convention, evaluated before and after.
The script is the demo (CI runs it as ``bash launch/demo.sh``); this verb runs it with the interpreter that
runs the command. Smaller runs set the script's environment variables (N_TRAIN, SFT_STEPS, ...: its header).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from models.errors import ArgumentParser, UserError, run_cli
from models.families.specs import FAMILIES
from models.qwen_tokenizer import write_tiktoken_ranks

REPO = Path(__file__).resolve().parents[1]
DEMO_SCRIPT = REPO / "launch" / "demo.sh"
DEMO_RECIPES = REPO / "recipes" / "tiny"
# The HF families the demo trains: those with a demo recipe (launch/demo.sh --family).
DEMO_FAMILIES = ["qwen_vl", *(name for name in FAMILIES if (DEMO_RECIPES / f"demo_{name}.yaml").is_file())]


def write_world_tiktoken(tokenizer_dir: str | Path, out: str | Path) -> None:
    """Write the synthetic world's byte-level BPE (data.synthetic, a Hugging Face tokenizer directory) as a
    `qwen.tiktoken` ranks file, which is what an HF family's tokenizer is built from
    (models.families.processor.build_family_tokenizer).

    Its BPE tokens in id order are the trainer's merge order, so as ranks every token is reached by merging
    its bytes; its own special tokens are left out (the family adds its own after the ranks). Written here
    because models.qwen_tokenizer.tiktoken_ranks_from_tokenizer accepts only tokenizers that qwen.tiktoken
    reproduces exactly, and the world's pre-tokenizer is GPT-2's, not Qwen's: the family tokenizer splits
    digits one by one, which changes how texts are cut, not which tokens exist.
    """
    state = json.loads(AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer.to_str())
    special = {token["content"] for token in state["added_tokens"]}
    byte_of_char = {char: byte for byte, char in bytes_to_unicode().items()}
    in_id_order = sorted((i, text) for text, i in state["model"]["vocab"].items() if text not in special)
    ranks = {bytes(byte_of_char[c] for c in text): rank for rank, (_, text) in enumerate(in_id_order)}
    write_tiktoken_ranks(ranks, out)


def main(argv: list[str] | None = None, prog: str = "python -m train.demo") -> int:
    examples = ["", "runs/demo_dpo --dpo", "runs/demo_qwen2_5_vl --family qwen2_5_vl"]
    p = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], examples=examples)
    p.add_argument(
        "out_dir",
        nargs="?",
        default="runs/demo",
        help="where the runs and metrics.json go (default runs/demo)",
    )
    p.add_argument(
        "--dpo",
        action="store_true",
        help="add a fourth stage, DPO on the world's count and colour pairs (2 minutes more)",
    )
    p.add_argument(
        "--family",
        choices=DEMO_FAMILIES,
        default="qwen_vl",
        help="qwen_vl: the Qwen-VL model through its four stages (default); an HF family: its tiny random "
        "model, one SFT stage (recipes/tiny/demo_<family>.yaml)",
    )
    args = p.parse_args(argv)
    if args.dpo and args.family != "qwen_vl":
        p.error(f"--dpo is a stage of the Qwen-VL demo; --family {args.family} has none")
    if not DEMO_SCRIPT.is_file():
        raise UserError(
            f"{DEMO_SCRIPT} not found: the demo runs from a clone of the repository (pip install -e . in it)"
        )
    env = {**os.environ, "PYTHON": sys.executable} | ({"DPO": "1"} if args.dpo else {})
    # The script changes into the repository: a relative OUT_DIR is the user's, so it is resolved here.
    argv = ["bash", str(DEMO_SCRIPT), str(Path(args.out_dir).resolve())]
    argv += ["--family", args.family] if args.family != "qwen_vl" else []
    return subprocess.run(argv, env=env).returncode


if __name__ == "__main__":
    run_cli(main)
