"""GPU check of every method's hot path (issue 9, item 6): training steps in bf16 with no host-device
sync, and faiss k-means on the GPU.

Usage::

    python benchmarks/gpu_check.py --steps 300 --out gpu_check.json

For each method (TEMI on digits embeddings, the visual latent at the CPU profile's size, cluster
flow on digits with cluster-mate batches) a ``lightning.Trainer(accelerator="gpu",
precision=--precision)`` runs ``--steps`` training steps with ``torch.cuda.set_sync_debug_mode("error")``
active from ``on_train_batch_start`` to ``on_train_batch_end``: any operation inside a training step
that waits for the device (``.item()``, boolean-mask indexing, ``nonzero``, a copy of a host value
to the device) raises there, naming the method. Logging, progress and checkpoints outside the step
are not checked, nor are the first ``--unchecked-steps`` steps, which build once what later steps
reuse (Lightning's logged-value states, cached filter banks). Then
``clustering.kmeans`` clusters random features on the GPU (faiss-gpu). Steps per second (after
``--warmup`` steps) and peak GPU memory are printed as a markdown table and written with ``--out``.
Without CUDA the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402


class SyncDebugInStep(L.Callback):
    """Makes any host-device sync inside a training step an error, and times the steps after ``warmup``."""

    def __init__(self, warmup: int, unchecked_steps: int) -> None:
        self.warmup, self.unchecked_steps, self.start = warmup, unchecked_steps, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()
        if trainer.global_step >= self.unchecked_steps:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode(0)

    def on_exception(self, trainer, pl_module, exception) -> None:
        torch.cuda.set_sync_debug_mode(0)

    def steps_per_second(self, trainer: L.Trainer) -> float:
        torch.cuda.synchronize()
        return (trainer.global_step - self.warmup) / (time.perf_counter() - self.start)


def temi():
    from datamodules.embeddings import EmbeddingsDataModule
    from modules.temi import TEMIClustering

    data = EmbeddingsDataModule(knn=50, batch_size=256)
    model = TEMIClustering(input_dim=data.input_dim, num_clusters=data.num_clusters, num_classes=data.num_classes,
                           batch_size=256, num_heads=16, per_head_metrics=False)
    return model, data, []


def visual_latent():
    from datamodules.blocks_text import BlocksTextDataModule
    from modules.visual_latent import VisualLatentText

    data = BlocksTextDataModule(num_train_scenes=4000, vocab_size=1024, batch_size=32, counterfactuals_per_anchor=4)
    model = VisualLatentText(vocab_size=data.vocab_size, max_length=data.max_length, dim=128, depth=2, heads=4,
                             ffn_dim=512, head_dim=64, head_depth=1, head_ffn_dim=128, head_dropout=0.0,
                             query_channels=32, readout_hidden_dim=256, pool_levels=(1, 2, 4), warmup_steps=50,
                             positions="learned")
    return model, data, []


def cluster_flow():
    from callbacks.cluster_assignment import ClusterAssignment
    from datamodules.flow_data import FlowDataModule
    from modules.cluster_flow import ClusterFlowMatching

    data = FlowDataModule(dataset="digits", source="gaussian", batch_size=128, samples_per_cluster=4)
    model = ClusterFlowMatching(sample_shape=[1, 8, 8], network="unet", channels=[32, 64], time_dim=64,
                                locality_mode="cluster_neighborhood", warmup_steps=50)
    return model, data, [ClusterAssignment(num_clusters=100)]


METHODS = {"temi": temi, "visual_latent": visual_latent, "cluster_flow": cluster_flow}


def check_method(name: str, steps: int, warmup: int, unchecked_steps: int, precision: str) -> dict:
    model, data, callbacks = METHODS[name]()
    timer = SyncDebugInStep(warmup, unchecked_steps)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision=precision, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[*callbacks, timer])
    torch.cuda.reset_peak_memory_stats()
    try:
        trainer.fit(model, data)
    except RuntimeError as error:
        if "synchroniz" in str(error):
            raise SystemExit(f"{name}: a training step synchronizes host and device: {error}") from error
        raise
    loss = trainer.callback_metrics.get("train/loss", trainer.callback_metrics.get("training/loss"))
    return {"method": name, "steps": trainer.global_step, "steps_per_second": timer.steps_per_second(trainer),
            "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20,
            "final_loss": None if loss is None else float(loss)}


def check_kmeans(num_points: int, dim: int, num_clusters: int) -> dict:
    from clustering.kmeans import kmeans

    features = torch.randn(num_points, dim, generator=torch.Generator().manual_seed(0))
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = kmeans(features, num_clusters, gpu=True)
    return {"method": f"faiss k-means ({num_points} x {dim}, k={num_clusters})", "seconds": time.perf_counter() - start,
            "clusters": len(result.centroids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per method")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the clock starts")
    parser.add_argument("--unchecked-steps", type=int, default=3, help="first steps run without the sync check")
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning precision (bf16-mixed, bf16-true)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--kmeans-points", type=int, default=200_000)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; run it on a machine with a GPU", file=sys.stderr)
        sys.exit(2)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(0, verbose=False)
    rows = [check_method(name, args.steps, args.warmup, args.unchecked_steps, args.precision)
            for name in args.methods]
    clustering = check_kmeans(args.kmeans_points, 128, 1000)

    print(f"\n{torch.cuda.get_device_name()}, {args.precision}, {args.steps} steps, no sync inside a training step\n")
    print("| method | steps | steps/s | peak memory (MiB) | final loss |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        loss = "-" if row["final_loss"] is None else f"{row['final_loss']:.4f}"
        print(f"| {row['method']} | {row['steps']} | {row['steps_per_second']:.1f} | {row['peak_memory_mib']:.0f} "
              f"| {loss} |")
    print(f"\n{clustering['method']}: {clustering['seconds']:.2f} s, {clustering['clusters']} clusters")
    if args.out is not None:
        result = {"methods": rows, "kmeans": clustering, "precision": args.precision,
                  "device": torch.cuda.get_device_name(), "torch": torch.__version__, "lightning": L.__version__,
                  "python": platform.python_version()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
