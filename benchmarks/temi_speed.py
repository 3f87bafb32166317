"""Training speed of TEMI on CPU: our Lightning path against the official code's style.

Usage::

    python benchmarks/temi_speed.py --heads 16 --batch-size 256 --out temi_speed.json
    python benchmarks/temi_speed.py --heads 16 --batch-size 256 --compile --out temi_speed_compiled.json

What is measured: full training steps per second on scikit-learn's digits (1,797 x 64,
10 classes, kNN pairs with k=50), on ``--threads`` CPU threads (``torch.set_num_threads``).
A full step is everything between the end of one step and the end of the next: fetching the
batch (input pipeline), student forward and backward, teacher forward, the loss, the optimizer
step and the teacher's EMA update, plus whatever the training loop does in between (logging,
hooks, epoch boundaries: digits has only 7 batches of 256 per epoch). The clock runs from the
end of step ``W`` (after ``--warmup`` steps) to the end of step ``W + --steps``
(``time.perf_counter``); each of ``--repeats`` repeats builds everything afresh, baseline and
ours alternate so both see the same machine load, and the median is reported.

* ours: ``lightning.Trainer(accelerator="cpu")`` fitting ``modules.temi.TEMIClustering``
  (``per_head_metrics=False``) with ``datamodules.embeddings.EmbeddingsDataModule(knn=50)``, timed by a
  ``Callback``: exactly what ``cli.py fit`` runs, minus logger, checkpoints and validation.
* baseline: the official TEMI code's structure (``HHU-MMBS/TEMI-official-BMVC2023``): one
  ``DINOHead`` ``nn.Module`` per head (``Linear -> GELU -> Linear -> L2-normalize ->
  weight_norm(Linear, bias=False)`` with ``weight_g`` filled with 1, ``trunc_normal_(std=0.02)``
  init), a Python loop over heads for the forward and for the loss (``beta_mi`` on
  probabilities, teacher pair weight averaged over heads, both view directions, ``p(k)`` an EMA
  of the teacher's batch mean), a per-item ``Dataset`` drawing each pair with
  ``np.random.choice`` from the kNN table behind a standard ``DataLoader`` (shuffle,
  drop_last, no workers), ``AdamW`` with the per-step learning-rate assignment of DINO's loop,
  and the EMA teacher updated by a Python loop over parameters.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402

from clustering.knn import cosine_knn  # noqa: E402
from datamodules.embeddings import (
    EmbeddingsDataModule,  # noqa: E402
    load_digits_arrays,  # noqa: E402
)
from modules.temi import TEMIClustering  # noqa: E402

KNN = 50
BETA = 0.6
TEMPERATURE = 0.1
MARGINAL_MOMENTUM = 0.9
TEACHER_MOMENTUM = 0.996
LR = WEIGHT_DECAY = 1e-4


# ---- baseline: the official code's structure -------------------------------------------------
class DINOHead(nn.Module):
    """Official ``DINOHead`` with ``nlayers=2``, ``norm_last_layer=False`` (trainable ``weight_g``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.apply(self._init_weights)
        with warnings.catch_warnings():  # the official code uses the deprecated nn.utils.weight_norm
            warnings.simplefilter("ignore")
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_heads: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList([DINOHead(in_dim, out_dim) for _ in range(num_heads)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [head(x) for head in self.heads]


def beta_mi(p1: torch.Tensor, p2: torch.Tensor, pk: torch.Tensor, beta: float) -> torch.Tensor:
    """Official ``losses.loss_utils.beta_mi``: ``-log sum_k (p1 p2)^beta / p(k)``."""
    return -(((p1 * p2) ** beta) / pk).sum(dim=-1).log()


class MultiHeadTEMILoss(nn.Module):
    """Official multi-head TEMI loss: per-head ``beta_mi``, weighted by the teacher ensemble's pair
    similarity, symmetrized over the two views, with ``p(k)`` per head an EMA of the teacher."""

    def __init__(self, num_heads: int, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("pk", torch.full((num_heads, 1, out_dim), 1.0 / out_dim))

    def forward(self, student_out: list[torch.Tensor], teacher_out: list[torch.Tensor]) -> torch.Tensor:
        s_probs = [F.softmax(s / TEMPERATURE, dim=-1).chunk(2) for s in student_out]
        with torch.no_grad():
            t_probs = [F.softmax(t / TEMPERATURE, dim=-1).chunk(2) for t in teacher_out]
            weight = sum((t1 * t2).sum(dim=-1) for t1, t2 in t_probs) / len(t_probs)
        losses = []
        for head, ((s1, s2), (t1, t2)) in enumerate(zip(s_probs, t_probs, strict=True)):
            with torch.no_grad():
                batch_mean = torch.cat([t1, t2]).mean(dim=0, keepdim=True)
                pk = self.pk[head] * MARGINAL_MOMENTUM + batch_mean * (1 - MARGINAL_MOMENTUM)
                self.pk[head] = pk
            loss = (weight * beta_mi(s1, t2, pk, BETA) + weight * beta_mi(s2, t1, pk, BETA)) / 2
            losses.append(loss.mean())
        return sum(losses) / len(losses)


class EmbedNN(Dataset):
    """Official ``EmbedNN``: an embedding and one of its k nearest neighbours, drawn per item."""

    def __init__(self, embeddings: torch.Tensor, knn: np.ndarray) -> None:
        self.embeddings, self.knn = embeddings, knn

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = np.random.choice(self.knn[idx])
        return self.embeddings[idx], self.embeddings[pair]


def params_groups(model: nn.Module) -> list[dict]:
    """DINO's ``get_params_groups``: no weight decay on biases and 1-D parameters."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or param.dim() == 1 else regularized).append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def time_baseline(x: torch.Tensor, knn: np.ndarray, num_heads: int, batch_size: int, warmup: int,
                  steps: int) -> float:
    """Steps per second of the official-style loop over ``steps`` steps after ``warmup``."""
    num_clusters = 10
    student = MultiHead(x.shape[1], num_clusters, num_heads)
    teacher = MultiHead(x.shape[1], num_clusters, num_heads)
    teacher.load_state_dict(student.state_dict())
    for param in teacher.parameters():
        param.requires_grad = False
    loss_fn = MultiHeadTEMILoss(num_heads, num_clusters)
    loader = DataLoader(EmbedNN(x, knn), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
    optimizer = torch.optim.AdamW(params_groups(student), lr=LR, weight_decay=WEIGHT_DECAY)
    step, start = 0, None
    for epoch in range(math.ceil((warmup + steps) / len(loader)) + 1):
        for images, pairs in loader:
            for group in optimizer.param_groups:  # DINO sets the scheduled lr every step
                group["lr"] = LR
            batch = torch.cat([images, pairs])
            student_out = student(batch)
            with torch.no_grad():
                teacher_out = teacher(batch)
            loss = loss_fn(student_out, teacher_out)
            if not math.isfinite(loss.item()):
                raise FloatingPointError("baseline loss is not finite")
            optimizer.zero_grad()
            loss.backward()
            if epoch == 0:  # official cancel_gradients_last_layer (freeze_last_layer=1)
                for name, param in student.named_parameters():
                    if "last_layer" in name:
                        param.grad = None
            optimizer.step()
            with torch.no_grad():
                for param_q, param_k in zip(student.parameters(), teacher.parameters(), strict=True):
                    param_k.data.mul_(TEACHER_MOMENTUM).add_((1 - TEACHER_MOMENTUM) * param_q.data)
            step += 1
            if step == warmup:
                start = time.perf_counter()
            elif step == warmup + steps:
                return steps / (time.perf_counter() - start)
    raise AssertionError("the loop ran out of epochs")


# ---- ours: the Lightning module as it trains ------------------------------------------------
class StepTimer(L.Callback):
    """Clock from the end of batch ``warmup`` to the end of batch ``warmup + steps``."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start = self.steps_per_second = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        elif trainer.global_step == self.warmup + self.steps:
            self.steps_per_second = self.steps / (time.perf_counter() - self.start)


def time_ours(num_heads: int, batch_size: int, warmup: int, steps: int, compile: bool) -> float:
    data = EmbeddingsDataModule(knn=KNN, batch_size=batch_size)
    model = TEMIClustering(input_dim=data.input_dim, num_clusters=data.num_clusters, num_classes=data.num_classes,
                           batch_size=batch_size, num_heads=num_heads, per_head_metrics=False, compile=compile)
    timer = StepTimer(warmup, steps)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=warmup + steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(model, data)
    return timer.steps_per_second


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before the clock starts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="ours with model.compile: torch.compile of the heads (compilation falls in the warmup)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banners in the table
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(0, verbose=False)
    x, _ = load_digits_arrays()
    knn = cosine_knn(x, KNN).numpy()
    baseline, ours = [], []
    for _ in range(args.repeats):
        if not args.skip_baseline:
            baseline.append(time_baseline(x, knn, args.heads, args.batch_size, args.warmup, args.steps))
        ours.append(time_ours(args.heads, args.batch_size, args.warmup, args.steps, args.compile))

    result = {
        "steps_per_second": statistics.median(ours),
        "steps_per_second_repeats": ours,
        "baseline_steps_per_second": statistics.median(baseline) if baseline else None,
        "baseline_steps_per_second_repeats": baseline,
        "speedup": statistics.median(ours) / statistics.median(baseline) if baseline else None,
        "heads": args.heads, "batch_size": args.batch_size, "compile": args.compile, "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats, "threads": torch.get_num_threads(), "data": f"sklearn digits, knn={KNN}",
        "torch": torch.__version__, "lightning": L.__version__, "python": platform.python_version(),
        "machine": machine(),
    }
    rows = [(f"ours (Lightning, TEMIClustering{', compiled' if args.compile else ''})", ours)]
    if baseline:
        rows.insert(0, ("baseline (official-style loops)", baseline))
    print(f"\nTEMI, {args.heads} heads, batch {args.batch_size}, {result['threads']} threads, "
          f"median of {args.repeats} x {args.steps} steps\n")
    print("| path | steps/s (median) | ms/step | range | speed-up |")
    print("|---|---:|---:|---|---:|")
    for name, runs in rows:
        median = statistics.median(runs)
        speedup = f"{median / result['baseline_steps_per_second']:.2f}x" if baseline else "-"
        print(f"| {name} | {median:.2f} | {1e3 / median:.1f} | {min(runs):.2f}-{max(runs):.2f} | {speedup} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
