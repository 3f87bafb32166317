"""Encoding a flow-matching training set and clustering it: files, shapes, encoders, the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clustering.kmeans import read_assignments
from datamodules.flow_data import FlowDataModule
from tools.encode_and_cluster import encode_and_cluster

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_FILES = ("latents.npy", "cluster_centers.npy", "assignments.csv", "clusters.json")


pytestmark = pytest.mark.usefixtures("offline_hub")


def test_identity_on_moons_writes_consistent_files(tmp_path):
    record = encode_and_cluster(tmp_path, 6, dataset="moons", num_train=300, data_seed=3, device="cpu")
    assert all((tmp_path / name).is_file() for name in OUTPUT_FILES)
    samples = FlowDataModule(dataset="moons", num_train=300, seed=3).train_split["x"]
    latents = np.load(tmp_path / "latents.npy")
    centers = np.load(tmp_path / "cluster_centers.npy")
    assert latents.dtype == np.float32
    assert np.array_equal(latents, samples.numpy())  # training's samples, in training's order
    assert centers.dtype == np.float32 and centers.shape == (6, 2)
    assignments = read_assignments(tmp_path, num_items=300)
    nearest = torch.cdist(torch.from_numpy(latents), torch.from_numpy(centers)).argmin(dim=1)
    assert torch.equal(assignments, nearest)
    written = json.loads((tmp_path / "clusters.json").read_text())
    assert written == json.loads(json.dumps(record))
    assert written["data"]["seed"] == 3
    assert written["data"]["num_samples"] == 300
    assert written["encoder"] == {"name": "identity", "latent_dim": 2}
    found = written["kmeans"]
    assert found["k_requested"] == found["k_final"] == 6 and found["dropped_empty"] == 0
    sizes = np.bincount(assignments.numpy())
    assert found["cluster_size"] == {"min": sizes.min(), "median": np.median(sizes), "max": sizes.max()}
    assert found["adjusted_rand_index"] is None  # moons come without labels here
    by_hand = float(((latents.astype(np.float64) - centers[assignments.numpy()]) ** 2).sum())
    assert found["inertia"] == pytest.approx(by_hand, rel=1e-6)


def test_pca_on_digits_finds_the_digits(tmp_path):
    record = encode_and_cluster(tmp_path, 10, dataset="digits", encoder="pca", pca_dim=16, device="cpu")
    latents = np.load(tmp_path / "latents.npy")
    assert latents.shape == (1438, 16)
    assert record["encoder"]["pca_dim"] == 16 and 0.5 < record["encoder"]["explained_variance"] < 1
    # PCA + k-means on digits gives ARI 0.55-0.66 over seeds; unrelated clusters give about 0.
    assert record["kmeans"]["adjusted_rand_index"] > 0.45
    assert record["kmeans"]["nmi"] > 0.6
    assert len(read_assignments(tmp_path / "assignments.csv", num_items=1438)) == 1438


def test_pca_dim_above_the_data_dimension_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--pca-dim 32 must lie in \[1, min\(N, D\)\] = \[1, 2\]"):
        encode_and_cluster(tmp_path / "out", 4, dataset="moons", num_train=100, encoder="pca", device="cpu")
    assert not (tmp_path / "out").exists()


class FlattenAndProject(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.project = torch.nn.Linear(64, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.project(images.flatten(1))).unsqueeze(1)  # [B, 1, 5]: flattened by the caller


def test_torchscript_encoder_is_applied_per_sample(tmp_path):
    torch.manual_seed(0)
    module = FlattenAndProject().eval()
    scripted = tmp_path / "encoder.pt"
    torch.jit.script(module).save(str(scripted))
    encode_and_cluster(tmp_path / "out", 8, dataset="digits", num_train=200, encoder="torchscript",
                       encoder_path=scripted, batch_size=64, device="cpu")
    samples = FlowDataModule(dataset="digits", num_train=200).train_split["x"]
    with torch.no_grad():
        by_hand = module(samples).flatten(1)
    latents = torch.from_numpy(np.load(tmp_path / "out" / "latents.npy"))
    assert latents.shape == (200, 5)
    assert torch.allclose(latents, by_hand, atol=1e-6)


class DropsRows(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:1]


def test_torchscript_encoder_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt: no such TorchScript file"):
        encode_and_cluster(tmp_path / "out", 4, dataset="moons", num_train=50, encoder="torchscript",
                           encoder_path=tmp_path / "missing.pt", device="cpu")
    bad = tmp_path / "drops.pt"
    torch.jit.script(DropsRows()).save(str(bad))
    with pytest.raises(ValueError, match=r"drops.pt: must map a batch .*shape \(16, 2\) gave \(1, 2\)"):
        encode_and_cluster(tmp_path / "out", 4, dataset="moons", num_train=50, encoder="torchscript",
                           encoder_path=bad, batch_size=16, device="cpu")
    assert not (tmp_path / "out").exists()
    nan_rows = tmp_path / "nan_rows.pt"
    torch.jit.script(NaNForNegativeFirstCoordinate()).save(str(nan_rows))
    with pytest.raises(ValueError, match=r"encoder 'torchscript' \(.*nan_rows.pt\) gave NaN or inf for \d+ of 50 samples"):
        encode_and_cluster(tmp_path / "out", 4, dataset="moons", num_train=50, encoder="torchscript",
                           encoder_path=nan_rows, device="cpu")
    assert not (tmp_path / "out").exists()


class NaNForNegativeFirstCoordinate(torch.nn.Module):
    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return points[:, :1].sqrt()  # NaN where the first coordinate is negative


def test_too_many_clusters_fail_before_anything_is_written(tmp_path, monkeypatch):
    import tools.encode_and_cluster as module

    def no_encoding(*args, **kwargs):
        raise AssertionError("the encoder ran before the cluster count was checked")

    monkeypatch.setattr(module, "encode", no_encoding)
    with pytest.raises(ValueError, match=r"cannot make 80 clusters from only 50 training samples of moons"):
        encode_and_cluster(tmp_path / "out", 80, dataset="moons", num_train=50, device="cpu")
    assert not (tmp_path / "out").exists()


def test_hf_encoder_embeds_the_images(tmp_path, tiny_dinov2):
    record = encode_and_cluster(tmp_path, 5, dataset="digits", num_train=40, encoder="hf",
                                encoder_path=tiny_dinov2, batch_size=16, device="cpu")
    latents = np.load(tmp_path / "latents.npy")
    assert latents.shape == (40, 32) and np.isfinite(latents).all()
    assert record["encoder"] == {"name": "hf", "path": str(tiny_dinov2), "latent_dim": 32}
    # The same images written as 8-bit PNG files and embedded by image_embeddings give the same vectors.
    from PIL import Image

    from tools.image_embeddings import embed_paths, load_backbone

    images = FlowDataModule(dataset="digits", num_train=40).train_split["x"]
    paths = []
    for i, image in enumerate(images):
        pixels = ((image[0].numpy() + 1) * 127.5).round().astype(np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    from_files = embed_paths(paths, *load_backbone(tiny_dinov2, "cpu"), batch_size=16)
    assert np.allclose(latents, from_files.numpy(), atol=1e-5)
    assert np.unique(latents.round(5), axis=0).shape[0] == 40  # distinct digits, distinct vectors


def test_hf_encoder_refuses_points(tmp_path, tiny_dinov2):
    message = r"needs image samples \[1 or 3, H, W\]; these samples have shape \(2,\)"
    with pytest.raises(ValueError, match=message):
        encode_and_cluster(tmp_path / "out", 3, dataset="moons", num_train=30, encoder="hf",
                           encoder_path=tiny_dinov2, device="cpu")


def test_command_line(tmp_path):
    env = os.environ | {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "tools.encode_and_cluster", "--dataset", "checkerboard",
               "--num-train", "400", "--n-clusters", "8", "--out-dir", str(tmp_path), "--device", "cpu"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "checkerboard: 400 samples -> identity [2] -> 8 clusters" in done.stdout
    assert read_assignments(tmp_path, num_items=400).max() == 7
    assert json.loads((tmp_path / "clusters.json").read_text())["data"]["num_train"] == 400
