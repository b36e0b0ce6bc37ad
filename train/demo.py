"""``vlrecipe demo [OUT_DIR] [--dpo]`` (``python -m train.demo``): the embedded demo on CPU, launch/demo.sh.

A synthetic world, then pretrain -> multitask -> SFT (-> DPO with --dpo) of models.presets.demo, each stage
evaluated on the world's held-out benchmarks; prints a table after each stage and writes OUT_DIR/metrics.json.
The script is the demo (CI runs it as ``bash launch/demo.sh``); this verb runs it with the interpreter that
runs the command. Smaller runs set the script's environment variables (N_TRAIN, SFT_STEPS, ...: its header).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from models.errors import ArgumentParser, UserError, run_cli

DEMO_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "demo.sh"


def main(argv: list[str] | None = None, prog: str = "python -m train.demo") -> int:
    p = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], examples=["", "runs/demo_dpo --dpo"])
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
    args = p.parse_args(argv)
    if not DEMO_SCRIPT.is_file():
        raise UserError(
            f"{DEMO_SCRIPT} not found: the demo runs from a clone of the repository (pip install -e . in it)"
        )
    env = {**os.environ, "PYTHON": sys.executable} | ({"DPO": "1"} if args.dpo else {})
    # The script changes into the repository: a relative OUT_DIR is the user's, so it is resolved here.
    return subprocess.run(["bash", str(DEMO_SCRIPT), str(Path(args.out_dir).resolve())], env=env).returncode


if __name__ == "__main__":
    run_cli(main)
