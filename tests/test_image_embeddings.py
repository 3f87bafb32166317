"""Image folder -> TEMI embedding folder, with a tiny randomly initialized DINOv2 saved locally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.image_embeddings import embed_images, write_embedding_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (20, 40, 230), "green": (30, 200, 40), "red": (220, 30, 30)}
IMAGES_PER_CLASS = 4


pytestmark = pytest.mark.usefixtures("offline_hub")


def write_image(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    noise = np.random.default_rng(seed).integers(-12, 13, size=(40, 48, 3))
    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def class_folder(root: Path, per_class: int = IMAGES_PER_CLASS, seed: int = 0) -> Path:
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(per_class):
            write_image(root / name / f"img{i}.png", colour, seed=seed + 100 * c + i)
    return root


@pytest.fixture(scope="module")
def written(tiny_dinov2, tmp_path_factory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("written")
    train, test = class_folder(base / "train"), class_folder(base / "test", per_class=2, seed=1000)
    summary = write_embedding_folder(base / "out", train, tiny_dinov2, k=3, test_image_dir=test, device="cpu")
    return base / "out", summary


def test_folder_holds_the_temi_layout(written):
    out, summary = written
    assert summary == {"num_train": 12, "num_test": 6, "dim": 32, "k": 3, "out_dir": str(out)}
    embeddings, labels, knn = (torch.load(out / f"{n}.pt") for n in ("embeddings", "label", "knn"))
    assert embeddings.shape == (12, 32) and embeddings.dtype == torch.float32
    assert torch.isfinite(embeddings).all()
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # sorted class names: blue, green, red
    assert knn.shape == (12, 3)
    assert not (knn == torch.arange(12).unsqueeze(1)).any()
    assert json.loads((out / "classes.json").read_text()) == ["blue", "green", "red"]
    lines = (out / "files.txt").read_text().splitlines()
    assert len(lines) == 12 and lines[0].endswith("blue/img0.png") and lines[-1].endswith("red/img3.png")


def test_test_split_has_no_knn(written):
    out, _ = written
    assert torch.load(out / "embeddings-test.pt").shape == (6, 32)
    assert torch.load(out / "label-test.pt").tolist() == [0, 0, 1, 1, 2, 2]
    assert not (out / "knn-test.pt").exists()
    assert len((out / "files-test.txt").read_text().splitlines()) == 6


def test_neighbours_share_the_colour_class(written):
    out, _ = written
    labels, knn = torch.load(out / "label.pt"), torch.load(out / "knn.pt")
    # Solid colours separate cleanly even through a random network; 3 same-class neighbours exist per image.
    assert (labels[knn] == labels.unsqueeze(1)).float().mean() >= 0.9


def test_embeddings_are_deterministic(tiny_dinov2, tmp_path):
    folder = class_folder(tmp_path / "images", per_class=2)
    first, labels, names, paths = embed_images(folder, tiny_dinov2, batch_size=4, device="cpu")
    second, *_ = embed_images(folder, tiny_dinov2, batch_size=5, device="cpu")
    assert torch.equal(first, second)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2] and names == ["blue", "green", "red"]
    assert [p.name for p in paths] == ["img0.png", "img1.png"] * 3


def test_flat_folder_has_no_labels(tiny_dinov2, tmp_path):
    for i in range(4):
        write_image(tmp_path / "flat" / f"{i}.PNG", (100, 100, 100), seed=i)
    summary = write_embedding_folder(tmp_path / "out", tmp_path / "flat", tiny_dinov2, k=2, device="cpu")
    assert summary["num_train"] == 4 and summary["num_test"] == 0
    assert torch.load(tmp_path / "out" / "embeddings.pt").shape == (4, 32)
    assert not (tmp_path / "out" / "label.pt").exists()
    assert not (tmp_path / "out" / "classes.json").exists()


def test_missing_folder(tiny_dinov2, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        embed_images(tmp_path / "nowhere", tiny_dinov2)


def test_folder_without_images(tiny_dinov2, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="empty"):
        embed_images(tmp_path / "empty", tiny_dinov2)


def test_corrupt_image_is_named(tiny_dinov2, tmp_path):
    folder = class_folder(tmp_path / "images", per_class=1)
    (folder / "red" / "x.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="x.png"):
        embed_images(folder, tiny_dinov2, device="cpu")


def test_k_must_be_below_the_number_of_images(tiny_dinov2, tmp_path):
    folder = class_folder(tmp_path / "images", per_class=1)
    with pytest.raises(ValueError, match="k=3"):
        write_embedding_folder(tmp_path / "out", folder, tiny_dinov2, k=3)
    assert not (tmp_path / "out").exists()


def test_unloadable_model_names_it(tmp_path):
    folder = class_folder(tmp_path / "images", per_class=1)
    with pytest.raises(OSError, match="no-such-model.*--allow-download"):
        embed_images(folder, tmp_path / "no-such-model")


def test_cli_prints_the_summary(tiny_dinov2, tmp_path):
    folder = class_folder(tmp_path / "images", per_class=2)
    command = [sys.executable, "-m", "tools.image_embeddings", "--images", str(folder),
               "--model", str(tiny_dinov2), "--out", str(tmp_path / "out"), "--k", "2", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["num_train"] == 6
    assert (tmp_path / "out" / "knn.pt").exists()


def test_images_beside_class_folders_are_refused(tiny_dinov2, tmp_path):
    folder = class_folder(tmp_path / "images", per_class=1)
    write_image(folder / "stray.png", (0, 0, 0), seed=0)
    with pytest.raises(ValueError, match="mixes"):
        embed_images(folder, tiny_dinov2)


def test_test_labels_follow_the_train_class_ids(tiny_dinov2, tmp_path):
    train = class_folder(tmp_path / "train", per_class=2)
    test = tmp_path / "test"
    write_image(test / "red" / "a.png", COLOURS["red"], seed=0)  # the only test class: id 2, not 0
    write_embedding_folder(tmp_path / "out", train, tiny_dinov2, k=2, test_image_dir=test, device="cpu")
    assert torch.load(tmp_path / "out" / "label-test.pt").tolist() == [2]
    write_image(test / "purple" / "b.png", (128, 0, 128), seed=0)
    with pytest.raises(ValueError, match="purple"):
        write_embedding_folder(tmp_path / "out2", train, tiny_dinov2, k=2, test_image_dir=test)
    assert not (tmp_path / "out2").exists()
