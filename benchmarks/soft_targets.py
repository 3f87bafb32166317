"""Do soft targets help IMU-text alignment? Spec 002's five target modes on real sensor data (issue 10).

    python benchmarks/soft_targets.py --out benchmarks/results/soft_targets.json
    python benchmarks/soft_targets.py --data DIR --eval-data OTHER_DIR --protocols A B C --out FILE.json

Every fit runs exactly what the command line runs (``cli.py fit`` with ``configs/imu_text.yaml``
plus ``configs/profiles/imu_text_cpu.yaml``, the target mode set by ``--modes``), then ``test``.

* A, all activities seen: test accuracy and macro-F1 of zero-shot matching by label text, beside
  the supervised classifier with the same encoder (``configs/imu_supervised.yaml``, same profile)
  and a linear probe (logistic regression) on the frozen encoder features of each aligned model.
* B, held-out activities: train without two activities, test on the two alone (``unseen_accuracy``,
  chance 0.5) and on all (``harmonic_mean`` of the seen and unseen accuracy over all candidates).
  The held-out pairs are ``(i, i + 2 mod L)`` in the label file's order (``--pairs stride2``, every
  activity held out exactly twice; UCI HAR: 2 of the 6 pairs within the moving or the still group,
  as 6 of all 15 are) or all ``L (L - 1) / 2`` pairs (``--pairs all``). With fewer seen activities
  than ``num_prototypes`` + 1, k-means gets one cluster less than the seen activities.
* C, cross-dataset: train on ``--data``, test on ``--eval-data`` (labels matched by text).

Prints markdown tables (mean ± std over seeds; in B each seed's value is the mean over its pairs) and
writes ``{"results": [{"mode", "protocol", "seed", "holdout", "accuracy", "macro_f1",
"unseen_accuracy", ...}], "summary": [...]}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from benchmarks.cli_fit import timed_fit  # noqa: E402
from benchmarks.record import write_record  # noqa: E402
from modules.losses.soft_targets import TARGET_MODES  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "uci_har" / "UCI HAR Dataset"
PROFILE = "configs/profiles/imu_text_cpu.yaml"
CONFIGS = {"aligned": ["configs/imu_text.yaml", PROFILE], "supervised": ["configs/imu_supervised.yaml", PROFILE]}
METRICS = ("accuracy", "macro_f1", "recall_at_2", "unseen_accuracy", "seen_accuracy_all", "unseen_accuracy_all",
           "harmonic_mean", "linear_probe_accuracy", "fit_seconds")


def fit_and_test(kind: str, seed: int, data_args: list[str], extra: list[str], cache: str) -> tuple[dict, object]:
    with tempfile.TemporaryDirectory() as root:
        cli, seconds = timed_fit(CONFIGS[kind], seed, root, ["--data.init_args.text_cache_dir", cache, *data_args, *extra])
        metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    result = {name.removeprefix("test/"): value for name, value in metrics.items() if name.startswith("test/")}
    return result | {"fit_seconds": seconds}, cli


@torch.no_grad()
def encoder_features(cli, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data, model = cli.datamodule, cli.model.eval()
    tables = data.host_tables(split)
    features = torch.cat([model.encoder(chunk) for chunk in tables["window"].split(512)])
    return features, tables["label"]


def linear_probe_accuracy(cli) -> float:
    """Logistic regression on the frozen encoder's features of the training windows, scored on test."""
    train_x, train_y = encoder_features(cli, "train")
    test_x, test_y = encoder_features(cli, "test")
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(train_x.numpy(), train_y.numpy())
    return float(probe.score(test_x.numpy(), test_y.numpy()))


def heldout_pairs(label_names: list[str], how: str) -> list[tuple[str, str]]:
    if how == "all":
        return list(itertools.combinations(label_names, 2))
    count = len(label_names)
    return [(label_names[i], label_names[(i + 2) % count]) for i in range(count)]


def run(args, extra: list[str]) -> list[dict]:
    cache = str(Path(args.cache).resolve())
    data_args = ["--data.init_args.data_dir", str(args.data)]
    results = []

    def record(protocol: str, mode: str, seed: int, result: dict, holdout: list[str] | None = None) -> None:
        results.append({"protocol": protocol, "mode": mode, "seed": seed, "holdout": holdout} | result)
        print(json.dumps(results[-1]), flush=True)

    for seed in args.seeds:
        if "A" in args.protocols:
            for mode in args.modes:
                result, cli = fit_and_test("aligned", seed, data_args, [f"--model.init_args.target_mode={mode}", *extra],
                                           cache)
                record("A", mode, seed, result | {"linear_probe_accuracy": linear_probe_accuracy(cli)})
            result, _ = fit_and_test("supervised", seed, data_args, extra, cache)
            record("A", "supervised", seed, result)
        if "B" in args.protocols:
            label_names = probe_label_names(data_args, cache)
            for pair in heldout_pairs(label_names, args.pairs):
                seen = len(label_names) - len(pair)
                for mode in args.modes:
                    holdout = ["--data.init_args.holdout_activities", json.dumps(list(pair)),
                               f"--model.init_args.num_prototypes={min(args.num_prototypes, seen - 1)}"]
                    result, _ = fit_and_test("aligned", seed, data_args + holdout,
                                             [f"--model.init_args.target_mode={mode}", *extra], cache)
                    record("B", mode, seed, result, list(pair))
        if "C" in args.protocols:
            eval_args = data_args + ["--data.init_args.eval_data_dir", str(args.eval_data)]
            for mode in args.modes:
                result, _ = fit_and_test("aligned", seed, eval_args, [f"--model.init_args.target_mode={mode}", *extra],
                                         cache)
                record("C", mode, seed, result)
    return results


def probe_label_names(data_args: list[str], cache: str) -> list[str]:
    from datamodules.imu_windows import IMUTextDataModule

    return list(IMUTextDataModule(data_dir=data_args[1], text_cache_dir=cache).label_names)


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for protocol, mode in dict.fromkeys((r["protocol"], r["mode"]) for r in results):
        runs = [r for r in results if r["protocol"] == protocol and r["mode"] == mode]
        seeds = sorted({r["seed"] for r in runs})
        row = {"protocol": protocol, "mode": mode, "seeds": len(seeds), "fits": len(runs)}
        for key in METRICS:
            per_seed = [statistics.mean(values) for seed in seeds
                        if (values := [r[key] for r in runs if r["seed"] == seed and r.get(key) is not None])]
            if per_seed:
                row[key] = statistics.mean(per_seed)
                row[f"{key}_std"] = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        rows.append(row)
    return rows


COLUMNS = {
    "A": [("accuracy", "test accuracy"), ("macro_f1", "macro-F1"), ("linear_probe_accuracy", "linear probe"),
          ("fit_seconds", "fit s")],
    "B": [("unseen_accuracy", "unseen-only accuracy"), ("harmonic_mean", "H (all six)"),
          ("seen_accuracy_all", "seen (all six)"), ("unseen_accuracy_all", "unseen (all six)"), ("fit_seconds", "fit s")],
    "C": [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("unseen_accuracy", "unseen-only accuracy"),
          ("fit_seconds", "fit s")],
}


def markdown(rows: list[dict]) -> str:
    tables = []
    for protocol, columns in COLUMNS.items():
        mine = [r for r in rows if r["protocol"] == protocol]
        if not mine:
            continue
        lines = [f"Protocol {protocol}", "", "| mode | seeds | fits | " + " | ".join(t for _, t in columns) + " |",
                 "|---|---|---|" + "---|" * len(columns)]
        for r in mine:
            cells = [(f"{r[k]:.1f} ± {r[k + '_std']:.1f}" if k == "fit_seconds" else f"{r[k]:.3f} ± {r[k + '_std']:.3f}")
                     if k in r else "" for k, _ in columns]
            lines.append(f"| {r['mode']} | {r['seeds']} | {r['fits']} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="training data (UCI HAR layout or .npz)")
    parser.add_argument("--eval-data", type=Path, help="a second dataset in the same layout (protocol C)")
    parser.add_argument("--modes", nargs="+", default=list(TARGET_MODES), choices=TARGET_MODES)
    parser.add_argument("--protocols", nargs="+", default=["A", "B"], choices=["A", "B", "C"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pairs", choices=["stride2", "all"], default="stride2", help="protocol B's held-out pairs")
    parser.add_argument("--num-prototypes", type=int, default=5, help="the config's k-means prototypes")
    parser.add_argument("--cache", default=str(REPO / "runs" / "text_cache"), help="label-text embedding cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args, extra = parser.parse_known_args()  # the rest go to cli.py, e.g. --trainer.max_epochs=30
    if "C" in args.protocols and args.eval_data is None:
        parser.error("protocol C needs --eval-data")
    torch.set_num_threads(args.threads)
    results = run(args, extra)
    rows = summarize(results)
    print(markdown(rows))
    write_record(args.out, {"data": str(args.data), "eval_data": args.eval_data and str(args.eval_data),
                            "pairs": args.pairs, "results": results, "summary": rows}, args.threads)


if __name__ == "__main__":
    main()
