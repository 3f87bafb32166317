"""One quiet, timed ``cli.py fit`` in process: what every benchmark fit runs, so it is what the command
line runs (the configs, the seed for the run and the data, no logger, progress bar or model summary)."""

from __future__ import annotations

import time
from pathlib import Path

from cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def timed_fit(configs: list[str], seed: int, root: str, args: list[str]):
    """``(cli, seconds)`` of ``cli.py fit --config C ... --seed_everything SEED`` into ``root``, plus ``args``."""
    command = ["fit"]
    for config in configs:
        command += ["--config", str(REPO / config)]
    command += ["--seed_everything", str(seed), "--data.init_args.seed", str(seed),
                "--trainer.default_root_dir", root, "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *args]
    start = time.perf_counter()
    cli = cli_main(command)
    return cli, time.perf_counter() - start
