from eval_mm.cli import main
from models.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
