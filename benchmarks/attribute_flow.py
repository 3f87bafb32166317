"""Attribute transfer by a prototypical contrastive flow against its baselines (spec 001; issue 11).

    python benchmarks/attribute_flow.py --out benchmarks/results/attribute_flow.json
    python benchmarks/attribute_flow.py --world shapes --out benchmarks/results/attribute_flow_shapes.json
    python benchmarks/attribute_flow.py --embeddings X.npy --attributes A.npy --names a b c --out FILE.json

Each flow fit runs what the command line runs (``cli.py fit`` with ``configs/attribute_flow.yaml`` plus
``configs/profiles/attribute_flow_cpu.yaml``); ``flow`` is the default (prototypes the means of real
embeddings, the cycle term on), ``flow_no_cycle`` drops the cycle term, ``flow_light_identity`` lowers
the identity term to 0.3, ``flow_supcon`` adds the pairwise term, ``flow_spec`` is the document's literal
form. Baselines on the same data and targets: ``noop`` (z unchanged), ``linear`` (per-attribute difference of class means of
real training embeddings, strength chosen on validation), ``nearest`` (the nearest real training
embedding with exactly the target attributes); and, where the data knows it, ``counterfactual``, the
true counterfactual embedding itself, which shows each metric's ceiling. Every method is scored on the held-out test items by
``modules.attribute_transfer.transfer_metrics`` with standardized logistic probes fitted on the probe
split's real embeddings only; the flipped and kept accuracies are also given by plain probes (fitted
on the raw embeddings), a second reading of the same points. Prints markdown tables (mean ± std over seeds) and writes
``{"results": [{"method", "seed", "flipped_accuracy", "kept_accuracy", "all_correct",
"cos_to_counterfactual", "nn_uniqueness", ...}], "summary": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.cli_fit import timed_fit  # noqa: E402
from benchmarks.record import write_record  # noqa: E402
from datamodules.attribute_embeddings import WORLDS  # noqa: E402
from modules.attribute_transfer import (  # noqa: E402
    choose_strength,
    class_mean_directions,
    fit_probes,
    linear_steering,
    nearest_with_targets,
    probe_metrics,
    transfer_metrics,
)

CONFIGS = ["configs/attribute_flow.yaml", "configs/profiles/attribute_flow_cpu.yaml"]
# Each flow and what it changes in the config: the default (cycle term on); without the cycle term; with the
# identity term at 0.3 beside the cycle term; with the pairwise supervised-contrastive term; the document's
# literal form (prototypes as batch means of the flowed points, identity weight 0.05 of FIX 1, its InfoNCE
# without a temperature, the pairwise term on, no cycle term).
FLOWS = {
    "flow": [],
    "flow_no_cycle": ["--model.init_args.cycle_weight=0.0"],
    "flow_light_identity": ["--model.init_args.identity_weight=0.3"],
    "flow_supcon": ["--model.init_args.supcon_weight=0.5"],
    "flow_spec": ["--model.init_args.prototype_source=batch_flowed", "--model.init_args.identity_weight=0.05",
                  "--model.init_args.temperature=1.0", "--model.init_args.supcon_weight=0.5",
                  "--model.init_args.cycle_weight=0.0"],
}
HEADLINE = ("flipped_accuracy", "kept_accuracy", "plain_probe_flipped_accuracy", "plain_probe_kept_accuracy",
            "all_correct", "cos_to_counterfactual", "counterfactual_rank",
            "nearest_real_correct", "nn_uniqueness", "spread_ratio", "movement", "silhouette_by_target", "purity",
            "fit_seconds")


@torch.no_grad()
def flowed(cli, tables: dict) -> torch.Tensor:
    model = cli.model.eval()
    return model.move(tables["z"], tables["attributes"], tables["target"])


def score(z_moved: torch.Tensor, tables: dict, probes, names: list[str], plain_probes, pool) -> dict:
    """Every metric with the method's standardized probes, and the probe metrics again with plain ones
    (logistic regression on raw embeddings); ``pool``: the real embeddings the neighbour checks search."""
    metrics = transfer_metrics(z_moved, tables["z"], tables["attributes"], tables["target"], probes, names,
                               *pool, tables.get("z_star"))
    plain = probe_metrics(F.normalize(z_moved.float(), dim=1), tables["attributes"], tables["target"], *plain_probes,
                          names)
    return metrics | {f"plain_probe_{name}": plain[name] for name in ("flipped_accuracy", "kept_accuracy")}


def baselines(data, probes, names: list[str], plain_probes) -> dict[str, dict]:
    train, val, test = (data.split_tables(split) for split in ("train", "val", "test"))
    directions = class_mean_directions(train["z"], train["attributes"])
    strength = choose_strength(val["z"], val["attributes"], val["target"], directions, probes, names)
    moved = {"counterfactual": test["z_star"]} if "z_star" in test else {}  # the true answer: each metric's ceiling
    moved |= {"noop": test["z"],
             "linear": linear_steering(test["z"], test["attributes"], test["target"], directions, strength),
             "nearest": nearest_with_targets(test["z"], test["target"], train["z"], train["attributes"])}
    pool = data.neighbour_pool("test")
    results = {method: score(z, test, probes, names, plain_probes, pool) for method, z in moved.items()}
    results["linear"]["strength"] = strength
    return results


def run(args, extra: list[str]) -> list[dict]:
    data_args = ["--data.init_args.world", args.world]
    if args.embeddings:
        data_args += ["--data.init_args.embeddings", args.embeddings, "--data.init_args.attributes", args.attributes]
        if args.names:
            data_args += ["--data.init_args.attribute_names", json.dumps(args.names)]
    results = []
    for seed in args.seeds:
        L.seed_everything(seed)
        for method, overrides in FLOWS.items():
            with tempfile.TemporaryDirectory() as root:
                cli, seconds = timed_fit(CONFIGS, seed, root, [*overrides, *data_args, *extra])
            data, names = cli.datamodule, cli.datamodule.attribute_names
            probes = (cli.model.probe_weights.cpu(), cli.model.probe_biases.cpu())
            test, probe = data.split_tables("test"), data.split_tables("probe")
            plain_probes = fit_probes(probe["z"], probe["attributes"], standardize=False)
            results.append({"method": method, "seed": seed, "fit_seconds": seconds}
                           | score(flowed(cli, test), test, probes, names, plain_probes, data.neighbour_pool("test")))
            print(json.dumps(results[-1]), flush=True)
        assert torch.allclose(fit_probes(probe["z"], probe["attributes"])[0], probes[0], atol=1e-5)
        for method, metrics in baselines(data, probes, names, plain_probes).items():
            results.append({"method": method, "seed": seed} | metrics)
            print(json.dumps(results[-1]), flush=True)
    return results


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        row = {"method": method, "seeds": len(runs)}
        for key in sorted({k for r in runs for k in r if isinstance(r[k], float)}):
            values = [r[key] for r in runs if key in r and r[key] == r[key]]  # NaN: not defined here
            if values:
                row[key] = statistics.mean(values)
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.3f} ± {r[k + '_std']:.3f}" if k in r else "" for k in keys]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--world", choices=WORLDS, default="sentences",
                        help="the default data: block-world sentences (MiniLM) or rendered shape scenes (frozen CNN)")
    parser.add_argument("--embeddings", help="embeddings [N, D] (.npy/.npz/.pt); default: --world's")
    parser.add_argument("--attributes", help="binary attributes [N, A] matching --embeddings")
    parser.add_argument("--names", nargs="+", help="attribute names")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args, extra = parser.parse_known_args()  # the rest go to cli.py, e.g. --trainer.max_epochs=30
    if bool(args.embeddings) != bool(args.attributes):
        parser.error("--embeddings and --attributes go together")
    torch.set_num_threads(args.threads)
    results = run(args, extra)
    rows = summarize(results)
    headline = [k for k in HEADLINE if any(k in r for r in rows)]
    per_attribute = sorted({k for r in rows for k in r if "/" in k and not k.endswith("_std")})
    print(table(rows, headline))
    print()
    print(table(rows, per_attribute))
    write_record(args.out, {"data": args.embeddings or f"world {args.world}", "results": results,
                            "summary": rows}, args.threads)


if __name__ == "__main__":
    main()
