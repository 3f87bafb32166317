"""Spec 004 phases P1 then P2 on the CPU profiles, scored by their phase gates.

    python benchmarks/visual_latent.py --out benchmarks/results/visual_latent.json
    python benchmarks/visual_latent.py --runs p1 p2 p2_scratch p1_spec_var --out FILE.json

Each run is exactly what the command line runs (``cli.py fit`` with the phase config plus its CPU
profile); ``p2`` starts from the last checkpoint of ``p1``, ``p2_scratch`` is the main job as
``make demo`` runs it, ``p1_spec_var`` is P1 with the anti-collapse term off (the spec's literal
priors). Prints a markdown table of every gate criterion's value and writes
``{"runs": [{"run", "phase", "passed", "wall_seconds", "criteria": [...]}], ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.record import write_record  # noqa: E402
from cli import main as cli_main  # noqa: E402

P1 = ["configs/p1_priors.yaml", "configs/profiles/p1_priors_cpu.yaml"]
P2 = ["configs/p2_contrastive.yaml", "configs/profiles/p2_contrastive_cpu.yaml"]
RUNS = {
    "p1": (P1, []),
    "p2": (P2, ["--model.init_args.init_from", "{p1}/checkpoints/last.ckpt"]),
    "p2_scratch": (P2, []),
    "p1_spec_var": (P1, ["--model.init_args.text_variance_weight", "0.0"]),
}


def run(name: str, workdir: Path, seed: int, extra: list[str]) -> dict:
    configs, options = RUNS[name]
    root = workdir / name
    args = ["fit"]
    for config in configs:
        args += ["--config", str(REPO / config)]
    args += [option.format(p1=workdir / "p1") for option in options]
    args += ["--seed_everything", str(seed), "--data.init_args.seed", str(seed),
             "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]
    start = time.perf_counter()
    cli_main(args)
    seconds = time.perf_counter() - start
    report = json.loads((root / "gate_report.json").read_text())
    return {"run": name, "seed": seed, "phase": report["phase"], "passed": report["passed"],
            "evaluations": report["evaluations"], "global_step": report["global_step"],
            "wall_seconds": seconds, "criteria": report["criteria"]}


def markdown(results: list[dict]) -> str:
    names = list(dict.fromkeys(c["name"] for r in results for c in r["criteria"]))
    lines = ["| run | phase | passed | steps | wall s | " + " | ".join(names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]
    for r in results:
        by_name = {c["name"]: c for c in r["criteria"]}
        cells = []
        for name in names:
            c = by_name.get(name)
            cells.append("" if c is None else f"{c['value']:.3g} {'✓' if c['passed'] else '✗'}")
        lines.append(f"| {r['run']} | {r['phase']} | {r['passed']} | {r['global_step']} | "
                     f"{r['wall_seconds']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["p1", "p2"], choices=list(RUNS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args, extra = parser.parse_known_args()  # the rest go to cli.py, e.g. --trainer.max_epochs=4
    if "p2" in args.runs and "p1" not in args.runs:
        parser.error("run p2 starts from p1's checkpoint: include p1 before it")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(args.workdir or temporary)
        results = []
        for name in args.runs:
            results.append(run(name, workdir, args.seed, extra))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "criteria"}), flush=True)

    print(markdown(results))
    write_record(args.out, {"results": results}, args.threads)


if __name__ == "__main__":
    main()
