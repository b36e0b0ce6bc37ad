from models.errors import run_cli
from train.data_check_cli import main

if __name__ == "__main__":
    run_cli(main)
