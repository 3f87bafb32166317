"""Clustering quality of k-means, TEMI (official loss) and TEMI as spec 003 writes it.

    python benchmarks/temi.py --seeds 0 1 2 --out results/temi_digits.json
    python benchmarks/temi.py --embeddings X.npy --labels Y.npy --out FILE.json

Each TEMI fit runs exactly what the command line runs (``cli.py fit`` with the method config
plus its CPU profile in ``configs/profiles/``), then the teacher's selected head is evaluated.
k-means is faiss with 10 restarts on the same embeddings. Prints a markdown table and writes
``{"results": [{"method", "seed", "acc", "nmi", "ari", "clusters_used", "fit_seconds"}], ...}``.
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

import faiss  # noqa: E402
import torch  # noqa: E402

from benchmarks.cli_fit import timed_fit  # noqa: E402
from benchmarks.record import write_record  # noqa: E402
from datamodules.embeddings import EmbeddingsDataModule  # noqa: E402
from modules.metrics import ClusterOccupancy, label_metrics  # noqa: E402

CONFIGS = {
    "temi": ["configs/temi.yaml", "configs/profiles/temi_cpu.yaml"],
    "temi_spec": ["configs/temi_spec.yaml", "configs/profiles/temi_spec_cpu.yaml"],
}


def scores(preds: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> dict[str, float]:
    metrics = label_metrics(num_clusters, int(labels.max()) + 1)(preds, labels)
    occupancy = ClusterOccupancy(num_clusters)
    occupancy.update(preds)
    return {
        "acc": metrics["acc"].item(),
        "nmi": metrics["nmi"].item(),
        "ari": metrics["ari"].item(),
        "clusters_used": int(occupancy.compute()["clusters_used"]),
    }


def run_kmeans(data: EmbeddingsDataModule, seed: int) -> dict:
    x = data.train_split["x"].numpy()
    start = time.perf_counter()
    kmeans = faiss.Kmeans(x.shape[1], data.num_clusters, niter=100, nredo=10, seed=seed)
    kmeans.train(x)
    preds = torch.from_numpy(kmeans.index.search(x, 1)[1][:, 0]).long()
    seconds = time.perf_counter() - start
    return scores(preds, data.train_split["y"], data.num_clusters) | {"fit_seconds": seconds}


def run_temi(method: str, seed: int, data_args: list[str], extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as root:
        cli, seconds = timed_fit(CONFIGS[method], seed, root, [*data_args, *extra])
        metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    scored = {name: metrics[f"val/{name}"] for name in ("acc", "nmi", "ari")}
    return scored | {"clusters_used": int(metrics["val/clusters_used"]), "fit_seconds": seconds}


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        row = {"method": method, "seeds": len(runs)}
        for key in ("acc", "nmi", "ari", "clusters_used", "fit_seconds"):
            values = [r[key] for r in runs]
            row[key] = statistics.mean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | seeds | ACC | NMI | ARI | clusters used | fit seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]:.3f} ± {r[k + '_std']:.3f}" for k in ("acc", "nmi", "ari")]
        cells += [f"{r['clusters_used']:.1f}", f"{r['fit_seconds']:.1f} ± {r['fit_seconds_std']:.1f}"]
        lines.append(f"| {r['method']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["kmeans", "temi", "temi_spec"],
                        choices=["kmeans", *CONFIGS])
    parser.add_argument("--embeddings", help="embeddings file (.npy/.npz/.pt); default: scikit-learn digits")
    parser.add_argument("--labels", help="labels file matching --embeddings")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args, extra = parser.parse_known_args()  # the rest go to cli.py, e.g. --trainer.max_epochs=50
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    data_args = []
    if args.embeddings:
        data_args += ["--data.init_args.embeddings", args.embeddings]
    if args.labels:
        data_args += ["--data.init_args.labels", args.labels]
    data = EmbeddingsDataModule(embeddings=args.embeddings, labels=args.labels)
    if "y" not in data.eval_split:
        parser.error("the benchmark scores against labels: give --labels (or an archive holding them)")

    results = []
    for seed in args.seeds:
        for method in args.methods:
            if method == "kmeans":
                result = run_kmeans(data, seed)
            else:
                result = run_temi(method, seed, data_args, extra)
            results.append({"method": method, "seed": seed} | result)
            print(json.dumps(results[-1]), flush=True)

    rows = summarize(results)
    table = markdown(rows)
    print(table)
    write_record(args.out, {"data": args.embeddings or "sklearn digits", "results": results, "summary": rows},
                 args.threads)


if __name__ == "__main__":
    main()
