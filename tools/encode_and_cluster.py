"""Encode a flow-matching training set and cluster it with k-means, once, before training.

The samples come from ``FlowDataModule`` built with the same dataset arguments training uses, so
row ``i`` here is training sample ``i`` there. Each sample is encoded to a vector, by one of:

* ``identity``: the flattened sample;
* ``pca``: scikit-learn PCA of the flattened samples to ``--pca-dim`` components (no whitening);
* ``torchscript``: a scripted or traced module (``--encoder-path``) that maps ``[B, *sample_shape]``
  to ``[B, ...]``; its output is flattened per sample;
* ``hf``: a Hugging Face vision backbone read from a local folder (``--encoder-path``), fed the
  images (``[C, H, W]`` in [-1, 1], grayscale repeated to RGB) as 8-bit pictures; its
  ``pooler_output``, else its CLS token, is the vector.

The vectors are clustered with faiss k-means (``clustering.kmeans``). Written to ``--out-dir``:
``latents.npy`` [N, D'], ``cluster_centers.npy`` [K', D'], ``assignments.csv`` (what training
reads) and ``clusters.json`` (arguments, cluster sizes, and agreement with the labels when the
dataset has them).

Usage::

    python -m tools.encode_and_cluster --dataset digits --encoder pca --n-clusters 50 --out-dir DIR
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from callbacks.json_files import write_json_atomically
from clustering.features import nonfinite_rows
from clustering.kmeans import KMeansResult, check_num_clusters, kmeans, write_assignments
from datamodules.flow_data import FlowDataModule, fingerprint
from modules.metrics import label_agreement

DATASETS = ("moons", "checkerboard", "digits", "mnist", "npy")
ENCODERS = ("identity", "pca", "torchscript", "hf")


# ---- encoders ---------------------------------------------------------------------------------
def encode_pca(samples: torch.Tensor, pca_dim: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """``[N, pca_dim]`` PCA coordinates of the flattened samples and the share of variance they keep."""
    from sklearn.decomposition import PCA

    flat = samples.flatten(1).float().numpy()
    check_pca_dim(pca_dim, flat.shape)
    pca = PCA(n_components=pca_dim, whiten=False, random_state=seed)
    latents = pca.fit_transform(flat)
    return torch.from_numpy(np.asarray(latents, dtype=np.float32)), float(pca.explained_variance_ratio_.sum())


def check_pca_dim(pca_dim: int, flat_shape: tuple[int, int]) -> None:
    num_samples, dim = flat_shape
    if not 1 <= pca_dim <= min(num_samples, dim):
        raise ValueError(
            f"--pca-dim {pca_dim} must lie in [1, min(N, D)] = [1, {min(num_samples, dim)}] "
            f"for N={num_samples} samples of D={dim} values each"
        )


def encode_torchscript(
    samples: torch.Tensor, encoder_path: str | Path, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """``[N, D']`` float32: the scripted module at ``encoder_path`` applied batch by batch, flattened."""
    encoder_path = Path(encoder_path)
    if not encoder_path.is_file():
        raise FileNotFoundError(f"{encoder_path}: no such TorchScript file (--encoder-path)")
    try:
        module = torch.jit.load(str(encoder_path), map_location=device).eval()
    except RuntimeError as error:
        raise ValueError(f"{encoder_path}: not a TorchScript module ({error})") from error
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size].to(device)
            chunks.append(_run_batch(module, batch, encoder_path).flatten(1).float().cpu())
    return torch.cat(chunks)


def _run_batch(module: torch.jit.ScriptModule, batch: torch.Tensor, encoder_path: Path) -> torch.Tensor:
    try:
        output = module(batch)
    except Exception as error:  # TorchScript re-raises the module's errors as its own types
        raise RuntimeError(
            f"{encoder_path}: failed on a batch of shape {tuple(batch.shape)} ({error})"
        ) from error
    if not isinstance(output, torch.Tensor) or output.dim() == 0 or len(output) != len(batch):
        found = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(
            f"{encoder_path}: must map a batch [B, ...] to a tensor [B, ...]; "
            f"a batch of shape {tuple(batch.shape)} gave {found}"
        )
    return output


def as_rgb_pictures(images: torch.Tensor) -> list:
    """PIL RGB images from ``[B, C, H, W]`` values in [-1, 1] (C = 1 is repeated to 3 channels)."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            "the hf encoder needs image samples [1 or 3, H, W]; "
            f"these samples have shape {tuple(images.shape[1:])}"
        )
    low, high = float(images.min()), float(images.max())
    if low < -1.001 or high > 1.001:
        raise ValueError(
            f"the hf encoder expects images scaled to [-1, 1]; the samples span [{low:.3g}, {high:.3g}]"
        )
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(picture) for picture in pixels]


def encode_hf(
    samples: torch.Tensor, encoder_path: str | Path, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """``[N, D']`` float32 embeddings of the images by the local Hugging Face backbone at ``encoder_path``."""
    from tools.image_embeddings import embed_pictures, load_backbone

    as_rgb_pictures(samples[:1])  # a sample shape or range the backbone cannot take fails before loading it
    processor, backbone = load_backbone(encoder_path, device, local_files_only=True)
    return torch.cat([embed_pictures(as_rgb_pictures(samples[start : start + batch_size]), processor, backbone)
                      for start in range(0, len(samples), batch_size)])


def encode(
    samples: torch.Tensor,
    encoder: str,
    encoder_path: str | Path | None = None,
    pca_dim: int = 32,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> tuple[torch.Tensor, dict]:
    """Latents ``[N, D']`` float32 and a description of the encoder for ``clusters.json``."""
    device = torch.device(device)
    description: dict = {"name": encoder}
    if encoder == "identity":
        latents = samples.flatten(1).float()
    elif encoder == "pca":
        latents, kept = encode_pca(samples, pca_dim, seed)
        description |= {"pca_dim": pca_dim, "explained_variance": kept}
    elif encoder == "torchscript":
        latents = encode_torchscript(samples, encoder_path, device, batch_size)
    elif encoder == "hf":
        latents = encode_hf(samples, encoder_path, device, batch_size)
    else:
        raise ValueError(f"unknown encoder {encoder!r}; use one of {', '.join(ENCODERS)}")
    if encoder_path is not None and encoder in ("torchscript", "hf"):
        description["path"] = str(encoder_path)
    _check_finite(latents, description)
    return latents.contiguous(), description | {"latent_dim": latents.shape[1]}


def _check_finite(latents: torch.Tensor, description: dict) -> None:
    bad_rows = nonfinite_rows(latents)
    if len(bad_rows):
        raise ValueError(
            f"encoder {description['name']!r} ({description.get('path', 'built in')}) gave NaN or inf for "
            f"{len(bad_rows)} of {len(latents)} samples (first: {bad_rows[:5].tolist()})"
        )


def _check_arguments(encoder: str, encoder_path: str | Path | None) -> None:
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; use one of {', '.join(ENCODERS)}")
    if encoder in ("torchscript", "hf") and encoder_path is None:
        raise ValueError(f"--encoder {encoder} reads its model from --encoder-path; give the file or folder")


# ---- the whole step ---------------------------------------------------------------------------
def cluster_report(result: KMeansResult, labels: torch.Tensor | None) -> dict:
    """Cluster sizes, and the agreement of the clusters with the labels when there are labels."""
    sizes = torch.bincount(result.assignments, minlength=result.num_clusters).tolist()
    report = {
        "k_final": result.num_clusters,
        "dropped_empty": result.dropped_empty,
        "inertia": result.inertia,
        "cluster_size": {"min": min(sizes), "median": statistics.median(sizes), "max": max(sizes)},
        "adjusted_rand_index": None,
        "nmi": None,
    }
    if labels is not None:
        agreement = label_agreement(result.assignments, labels)
        report["adjusted_rand_index"], report["nmi"] = agreement["ari"], agreement["nmi"]
    return report


def _write_outputs(out_dir: Path, latents: torch.Tensor, result: KMeansResult, record: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "latents.npy", latents.numpy().astype(np.float32))
    np.save(out_dir / "cluster_centers.npy", result.centroids.numpy().astype(np.float32))
    write_assignments(out_dir / "assignments.csv", result.assignments)
    # Written last: its presence says the other three files are complete.
    write_json_atomically(out_dir / "clusters.json", record)


def encode_and_cluster(
    out_dir: str | Path,
    n_clusters: int,
    dataset: str = "digits",
    path: str | None = None,
    key: str | None = None,
    num_train: int | None = None,
    data_seed: int = 0,
    eval_fraction: float = 0.2,
    encoder: str = "identity",
    encoder_path: str | Path | None = None,
    pca_dim: int = 32,
    seed: int = 0,
    niter: int = 25,
    device: str | torch.device | None = None,
    batch_size: int = 256,
) -> dict:
    """Encode the training set, run k-means, write the four files to ``out_dir``; returns ``clusters.json``.

    The dataset arguments are ``FlowDataModule``'s (``data_seed`` is its ``seed``) and must match
    training's. ``seed`` seeds PCA and k-means; ``device`` (default cuda when available) runs the
    encoder, and k-means on the GPU when faiss has GPU support.
    """
    _check_arguments(encoder, encoder_path)
    data_args = {"dataset": dataset, "path": path, "key": key, "num_train": num_train,
                 "seed": data_seed, "eval_fraction": eval_fraction}
    training_split = FlowDataModule(**data_args).train_split  # row i here is training sample i there
    samples, labels = training_split["x"], training_split.get("y")
    # Fail before the (possibly slow) encoder runs and before anything is written.
    check_num_clusters(n_clusters, len(samples), what=f"training samples of {dataset}")
    if encoder == "pca":
        check_pca_dim(pca_dim, samples.flatten(1).shape)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    latents, encoder_description = encode(samples, encoder, encoder_path, pca_dim, seed, device, batch_size)
    gpu = "auto" if device.type == "cuda" else False
    result = kmeans(latents, n_clusters, seed=seed, niter=niter, gpu=gpu)
    record = {
        "data": data_args | {"num_samples": len(samples), "sample_shape": list(samples.shape[1:]),
                             "fingerprint": fingerprint(samples)},
        "encoder": encoder_description,
        "kmeans": {"k_requested": n_clusters, "seed": seed, "niter": niter},
    }
    record["kmeans"] |= cluster_report(result, labels)
    _write_outputs(Path(out_dir), latents, result, record)
    return record


def summary_line(record: dict, out_dir: str | Path) -> str:
    """One line for the terminal: data, encoder, clusters and, with labels, ARI and NMI."""
    data, found = record["data"], record["kmeans"]
    sizes = found["cluster_size"]
    agreement = (
        f", ARI {found['adjusted_rand_index']:.3f} NMI {found['nmi']:.3f} vs labels"
        if found["adjusted_rand_index"] is not None
        else ""
    )
    return (
        f"{data['dataset']}: {data['num_samples']} samples -> {record['encoder']['name']} "
        f"[{record['encoder']['latent_dim']}] -> {found['k_final']} clusters "
        f"(asked {found['k_requested']}, {found['dropped_empty']} empty dropped; "
        f"sizes {sizes['min']}/{sizes['median']}/{sizes['max']}), inertia {found['inertia']:.4g}"
        f"{agreement} -> {out_dir}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.encode_and_cluster", description=__doc__.split("\n")[0]
    )
    data = parser.add_argument_group("training data (must match the training run's data arguments)")
    data.add_argument("--dataset", choices=DATASETS, default="digits")
    data.add_argument("--path", default=None, help="MNIST IDX folder or array file (mnist, npy)")
    data.add_argument("--key", default=None, help="entry of an .npz or dict .pt array file (npy)")
    data.add_argument("--num-train", type=int, default=None, help="training samples (toy size, or cap)")
    data.add_argument("--data-seed", type=int, default=0, help="the datamodule's seed (draws the toys)")
    data.add_argument("--eval-fraction", type=float, default=0.2, help="held out of digits/npy/mnist")
    parser.add_argument("--encoder", choices=ENCODERS, default="identity")
    parser.add_argument("--encoder-path", default=None, help="TorchScript file or local Hugging Face folder")
    parser.add_argument("--pca-dim", type=int, default=32)
    parser.add_argument("--n-clusters", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0, help="seeds PCA and k-means")
    parser.add_argument("--niter", type=int, default=25, help="k-means iterations")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per encoder batch")
    args = parser.parse_args(argv)
    record = encode_and_cluster(
        args.out_dir, args.n_clusters, dataset=args.dataset, path=args.path, key=args.key,
        num_train=args.num_train, data_seed=args.data_seed, eval_fraction=args.eval_fraction,
        encoder=args.encoder, encoder_path=args.encoder_path, pca_dim=args.pca_dim, seed=args.seed,
        niter=args.niter, device=args.device, batch_size=args.batch_size,
    )
    print(summary_line(record, args.out_dir))


if __name__ == "__main__":
    main()
