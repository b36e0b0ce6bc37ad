from models.errors import run_cli
from train.run import main

if __name__ == "__main__":
    run_cli(main)
