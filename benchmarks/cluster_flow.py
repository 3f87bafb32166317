"""Does the locality loss of spec 000 help, and does it beat or improve minibatch OT (issue 14)?

    python benchmarks/cluster_flow.py --out benchmarks/results/cluster_flow_ot.json
    python benchmarks/cluster_flow.py --datasets toy --pairings independent minibatch_ot \
        --locality-forms residual --lambdas 0.3 --out FILE.json

A configuration is a pairing of source draws with samples (``independent``, ``minibatch_ot``: OT-CFM's
exact minibatch OT, ``cluster_ot``: OT within each cluster of the batch; ``datamodules.couplings``), a
locality mode (``none``, ``random_perturbation``, ``cluster_neighborhood``) and, for a locality mode, its
form (``velocity``: the spec's term, ``residual``: the residual difference) and weight lambda. Every
pairing runs ``none`` once and every locality mode under every form and lambda. Seeds vary the weights,
the flow times and perturbations, and the data (the toy's training set; 5 seeds on the toy, 3 on digits by
default).

Each fit runs what the command line runs (``cli.py fit`` with ``configs/cluster_flow_toy.yaml``,
or ``configs/cluster_flow.yaml`` plus its CPU profile for digits) with those options, the seed and the
step count overridden. Every configuration trains on the same cluster-mate batches (the configs'
``samples_per_cluster``) and, under one seed, the same source draws, so pairing and locality term are the
only differences. Clusters: k-means at fit start on the samples (the configs' ``ClusterAssignment``).
``--samples-per-cluster 0`` trains on plain shuffled batches instead (the control arm).

Evaluation against the held-out split, from fixed source draws: W2 (exact assignment), unbiased
RBF-MMD^2, for digits the Frechet distance in the features of a small CNN trained on the digits
training split (``modules.networks.digit_classifier``), at NFE 1, 2, 4, 8, 16 with Euler (and
midpoint, RK4 where the NFE allows); straightness and path length ratio along the Euler path of
each NFE (0 and 1 at NFE 1 by construction). Also the share of samples with a cluster-mate in
random batches versus cluster-mate batches at the configs' batch size and cluster count.

Writes the JSON (every run, then mean and spread over seeds per configuration), prints markdown tables,
and saves a plot of quality against NFE, one line per configuration, next to the JSON (``--report``
redoes both from an existing JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from datamodules.cluster_batches import ClusterMateBatches  # noqa: E402
from datamodules.couplings import PAIRINGS  # noqa: E402
from datamodules.flow_data import EVAL_SEED_OFFSET, FlowDataModule, source_draw  # noqa: E402
from datamodules.index_batches import EpochPermutation  # noqa: E402
from modules.cluster_flow import LOCALITY_FORMS, LOCALITY_MODES  # noqa: E402
from modules.flow_evaluation import score_samples  # noqa: E402
from modules.losses.flow_matching import cluster_mate_pairs  # noqa: E402
from modules.metrics import label_agreement  # noqa: E402
from modules.networks.digit_classifier import classifier_accuracy, train_digit_classifier  # noqa: E402
from modules.ode import EVALUATIONS_PER_STEP, integrate, path_statistics  # noqa: E402

NFE_GRID = (1, 2, 4, 8, 16)
CONFIGS = {
    "toy": ["configs/cluster_flow_toy.yaml"],
    "digits": ["configs/cluster_flow.yaml", "configs/profiles/cluster_flow_cpu.yaml"],
}
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0",
         "--checkpoint.monitor", "null"]


DEFAULT_SEEDS = {"toy": [0, 1, 2, 3, 4], "digits": [0, 1, 2]}


def configurations(pairings, modes, forms, lambdas) -> list[dict]:
    """Every pairing with ``none``, and with each locality mode under every form and lambda."""
    grid = []
    for pairing in pairings:
        if "none" in modes:
            grid.append({"pairing": pairing, "mode": "none"})
        grid += [{"pairing": pairing, "mode": mode, "form": form, "lambda": weight}
                 for mode in modes if mode != "none" for form in forms for weight in lambdas]
    return grid


def label(config: dict) -> str:
    name = f"{config['pairing']} / {config['mode']}"
    return name if config["mode"] == "none" else f"{name} / {config['form']} / {config['lambda']:g}"


def options(config: dict) -> list[str]:
    args = ["--data.init_args.pairing", config["pairing"], "--model.init_args.locality_mode", config["mode"]]
    if config["mode"] != "none":
        args += ["--model.init_args.locality_form", config["form"],
                 "--model.init_args.locality_weight", str(config["lambda"])]
    return args


def untrained_quality(dataset: str, root: Path, features) -> list[dict]:
    """The velocity field at initialization (seed 0): the scale the trained models are read against."""
    cli, _ = fit(dataset, {"pairing": "independent", "mode": "none"}, 0, 0, root)
    x0, reference = held_out(cli.datamodule, 0)
    return evaluate(cli.model.eval().velocity, x0, reference, features)


def fit(dataset: str, config: dict, seed: int, steps: int, root: Path, data_overrides: tuple[str, ...] = ()):
    args = ["fit", *sum((["--config", c] for c in CONFIGS[dataset]), []), *QUIET, *data_overrides,
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
            "--trainer.max_epochs", "-1", "--seed_everything", str(seed),
            "--data.init_args.seed", str(seed), *options(config)]
    start = time.perf_counter()
    cli = cli_main(args)
    return cli, time.perf_counter() - start


def valid_pair_ratios(data: FlowDataModule) -> dict[str, float]:
    """Share of samples with a cluster-mate over epoch 0: random batches vs cluster-mate batches."""
    ids, hp = data.cluster_ids, data.hparams
    samplers = {
        "random_batches": EpochPermutation(len(ids), hp.batch_size, shuffle=True, drop_last=True, seed=hp.seed),
        # n = 4 as in the configs when this run trains on plain batches
        "cluster_mate_batches": ClusterMateBatches(len(ids), hp.batch_size, hp.samples_per_cluster or 4,
                                                   lambda: ids, seed=hp.seed),
    }
    return {name: float(torch.stack([cluster_mate_pairs(ids[b], item_ids=b)[1].float().mean()
                                     for b in sampler.rank_batches(sampler.generator())]).mean())
            for name, sampler in samplers.items()}


@torch.no_grad()
def evaluate(velocity, x0, reference, features) -> list[dict]:
    rows = []
    for solver, evaluations in EVALUATIONS_PER_STEP.items():
        for nfe in NFE_GRID:
            if nfe % evaluations:
                continue
            samples = integrate(velocity, x0, nfe, solver)
            row = {"solver": solver, "nfe": nfe} | score_samples(samples, reference, features)
            if solver == "euler":
                row |= {name: float(v) for name, v in path_statistics(velocity, x0, nfe).items()}
            rows.append(row)
    return rows


def held_out(data: FlowDataModule, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    reference = data.eval_split["x"]
    draw = source_draw(data.hparams.source, tuple(data.sample_shape), fixed_seed=seed + EVAL_SEED_OFFSET)
    return draw(None, len(reference))["x0"], reference


def cluster_quality(data: FlowDataModule) -> dict:
    ids = data.cluster_ids
    record = {"num_clusters": int(ids.unique().numel()), "sizes_min_max": [int(c) for c in
              torch.bincount(ids).aminmax()]}
    if "y" in data.train_split:
        record |= {f"{name}_vs_labels": value for name, value in label_agreement(ids, data.train_split["y"]).items()}
    return record


def summarize(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        for row in run["quality"]:
            groups.setdefault((run["dataset"], run["config"], row["solver"], row["nfe"]), []).append(row)
    summary = []
    for (dataset, config, solver, nfe), rows in groups.items():
        entry = {"dataset": dataset, "config": config, "solver": solver, "nfe": nfe, "seeds": len(rows)}
        for metric in ("w2", "mmd2", "fd", "straightness", "path_length_ratio"):
            values = [r[metric] for r in rows if metric in r]
            if values:
                entry[metric] = {"mean": statistics.fmean(values),
                                 "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        summary.append(entry)
    return summary


def markdown(summary: list[dict], dataset: str, metric: str) -> str:
    rows = [s for s in summary if s["dataset"] == dataset and s["solver"] == "euler" and metric in s]
    if not rows:
        return ""
    lines = [f"| {dataset}: {metric} (Euler), mean ± std | " + " | ".join(f"NFE {n}" for n in NFE_GRID) + " |",
             "|---|" + "---|" * len(NFE_GRID)]
    for config in dict.fromkeys(s["config"] for s in rows):
        cells = {s["nfe"]: s[metric] for s in rows if s["config"] == config}
        if cells:
            lines.append(f"| {config} | " + " | ".join(
                f"{cells[n]['mean']:.4g} ± {cells[n]['std']:.2g}" if n in cells else "" for n in NFE_GRID) + " |")
    return "\n".join(lines)


def euler(run: dict, metric: str, nfe: int) -> float:
    """A run's ``metric`` at ``nfe`` with the Euler sampler."""
    return next(r[metric] for r in run["quality"] if r["solver"] == "euler" and r["nfe"] == nfe)


def paired_differences(runs: list[dict], dataset: str, metric: str) -> str:
    """Each configuration minus its pairing's ``none`` under the same seed (same data and draws), mean ± std
    over seeds (Euler): a difference the seeds share shows here even when it is below their spread."""
    runs = [run for run in runs if run["dataset"] == dataset and "pairing" in run and metric in run["quality"][0]]
    baseline = {(run["pairing"], run["seed"]): run for run in runs if run["mode"] == "none"}
    lines = [f"| {dataset}: {metric} minus the pairing's none, same seed | " + " | ".join(f"NFE {n}" for n in NFE_GRID)
             + " |", "|---|" + "---|" * len(NFE_GRID)]
    for config in dict.fromkeys(run["config"] for run in runs if run["mode"] != "none"):
        mates = [(run, baseline[run["pairing"], run["seed"]]) for run in runs
                 if run["config"] == config and (run["pairing"], run["seed"]) in baseline]
        if len(mates) < 2:
            continue
        cells = []
        for nfe in NFE_GRID:
            differences = [euler(run, metric, nfe) - euler(base, metric, nfe) for run, base in mates]
            cells.append(f"{statistics.fmean(differences):+.3g} ± {statistics.stdev(differences):.2g}")
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def pairing_table(runs: list[dict]) -> str:
    """Share of samples with a cluster-mate at the configs' batch size and cluster count."""
    lines = ["| data | clusters | random batches | cluster-mate batches |", "|---|---|---|---|"]
    for dataset in dict.fromkeys(run["dataset"] for run in runs):
        rows = [run for run in runs if run["dataset"] == dataset]
        ratios = {name: statistics.fmean(r["valid_pair_ratio"][name] for r in rows)
                  for name in ("random_batches", "cluster_mate_batches")}
        lines.append(f"| {dataset} | {rows[0]['clusters']['num_clusters']} | {ratios['random_batches']:.3f} | "
                     f"{ratios['cluster_mate_batches']:.3f} |")
    return "\n".join(lines)


def report(record: dict, out: Path) -> None:
    """Print the tables and save the plot of quality against NFE next to ``out``."""
    summary = record["summary"]
    for entry in [*summary, *record["runs"]]:  # the first round's records: the spec's form and lambda, no pairing
        if "config" not in entry:
            entry |= {"pairing": "independent",
                      "config": label({"pairing": "independent", "mode": entry["mode"], "form": "velocity",
                                       "lambda": 1.0})}
    datasets = dict.fromkeys(entry["dataset"] for entry in summary)
    plot(summary, out.with_suffix(".png"))
    tables = [markdown(summary, d, m) for d in datasets for m in ("w2", "mmd2", "fd", "straightness")]
    tables += [paired_differences(record["runs"], d, m) for d in datasets for m in ("w2", "fd")]
    print("\n\n".join([*(t for t in tables if t), pairing_table(record["runs"])]))


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("toy", "w2"), ("digits", "w2"), ("digits", "fd")]
    panels = [p for p in panels if any(s["dataset"] == p[0] and p[1] in s for s in summary)]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    # colour: pairing; line style: locality form (solid: none); marker: lambda. One line per configuration.
    colours = {pairing: f"C{i}" for i, pairing in enumerate(PAIRINGS)}
    styles = {"none": "-", **dict(zip(LOCALITY_FORMS, ("--", ":")))}
    markers = {}
    for axis, (dataset, metric) in zip(axes[0], panels):
        for config in dict.fromkeys(s["config"] for s in summary if s["dataset"] == dataset):
            rows = sorted((s for s in summary if s["dataset"] == dataset and s["config"] == config
                           and s["solver"] == "euler" and metric in s), key=lambda s: s["nfe"])
            pairing, _, *locality = config.split(" / ")
            form, weight = locality or ("none", "")
            marker = markers.setdefault(weight, "os^vD<>"[len(markers) % 7])
            if rows:
                axis.errorbar([s["nfe"] for s in rows], [s[metric]["mean"] for s in rows],
                              yerr=[s[metric]["std"] for s in rows], color=colours.get(pairing),
                              linestyle=styles[form], marker=marker, markersize=4, capsize=2, alpha=0.8,
                              label=config)
        axis.set(xscale="log", yscale="log", xlabel="NFE (Euler)", ylabel=metric.upper(), title=dataset)
        axis.set_xticks(NFE_GRID, [str(n) for n in NFE_GRID])
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")


def write_and_report(runs: list[dict], out: Path, threads: int, fields: dict) -> None:
    """The record of ``runs`` (with their summary, the plot's name and ``fields``) to ``out``, then the report."""
    record = {"runs": runs, "summary": summarize(runs), "plot": out.with_suffix(".png").name} | fields
    write_record(out, record, threads)
    report(record, out)


def merge(parts: list[dict], out: Path, threads: int) -> None:
    """One record from parts of a grid run as separate commands (e.g. seeds in parallel processes)."""
    fields = {"parts": [{"command": part.get("command"), "seeds": part["seeds"]} for part in parts]}
    fields |= {key: value for part in parts for key, value in part.items() if key.startswith("untrained_")
               or key == "digit_classifier_held_out_accuracy"}
    write_and_report([run for part in parts for run in part["runs"]], out, threads, fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--report", action="store_true", help="only print the tables and plot of an existing --out")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="write --out from the runs of these outputs (parts of one grid run apart), then report")
    parser.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--pairings", nargs="+", default=list(PAIRINGS), choices=PAIRINGS)
    parser.add_argument("--modes", nargs="+", default=["none", "cluster_neighborhood"], choices=LOCALITY_MODES)
    parser.add_argument("--locality-forms", nargs="+", default=list(LOCALITY_FORMS), choices=LOCALITY_FORMS)
    parser.add_argument("--lambdas", nargs="+", type=float, default=[0.1, 0.3, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="default: 0 to 4 on the toy, 0 to 2 on digits")
    parser.add_argument("--toy-steps", type=int, default=3000)
    parser.add_argument("--digits-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples-per-cluster", type=int, default=None,
                        help="override the configs' cluster-mate batches (0: plain shuffled batches)")
    args = parser.parse_args()
    if args.report:
        report(json.loads(Path(args.out).read_text()), Path(args.out))
        return
    if args.merge:
        merge([json.loads(Path(path).read_text()) for path in args.merge], Path(args.out), args.threads)
        return
    torch.set_num_threads(args.threads)
    runs, extras = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for dataset in args.datasets:
            steps = args.toy_steps if dataset == "toy" else args.digits_steps
            data_overrides = () if args.samples_per_cluster is None else (
                "--data.init_args.samples_per_cluster", str(args.samples_per_cluster))
            features = None
            grid = configurations(args.pairings, args.modes, args.locality_forms, args.lambdas)
            seeds = args.seeds or DEFAULT_SEEDS[dataset]
            for seed in seeds:
                for index, config in enumerate(grid):
                    cli, seconds = fit(dataset, config, seed, steps, Path(scratch) / f"{dataset}-{index}-{seed}",
                                       data_overrides)
                    model, data = cli.model.eval(), cli.datamodule
                    if dataset == "digits" and features is None:
                        features = train_digit_classifier(data.train_split["x"], data.train_split["y"], seed=0)
                        extras["digit_classifier_held_out_accuracy"] = classifier_accuracy(
                            features, data.eval_split["x"], data.eval_split["y"])
                    x0, reference = held_out(data, seed)
                    run = {"dataset": dataset, "config": label(config), **config, "seed": seed,
                           "steps": int(cli.trainer.global_step),
                           "samples_per_cluster": data.hparams.samples_per_cluster,
                           "fit_seconds": seconds, "clusters": cluster_quality(data),
                           "valid_pair_ratio": valid_pair_ratios(data),
                           "final_train_loss": float(cli.trainer.callback_metrics["training/loss_epoch"]),
                           "quality": evaluate(model.velocity, x0, reference, features)}
                    runs.append(run)
                    if seed == seeds[0] and index == 0:
                        extras[f"untrained_{dataset}"] = untrained_quality(dataset, Path(scratch) / "untrained", features)
                    print(f"{dataset} {run['config']} seed {seed}: {run['steps']} steps in {seconds:.0f} s, "
                          f"W2@1 {euler(run, 'w2', 1):.4f} W2@16 {euler(run, 'w2', 16):.4f}", flush=True)
    write_and_report(runs, Path(args.out), args.threads,
                     {"seeds": {dataset: args.seeds or DEFAULT_SEEDS[dataset] for dataset in args.datasets},
                      "steps": {"toy": args.toy_steps, "digits": args.digits_steps}} | extras)


if __name__ == "__main__":
    main()
