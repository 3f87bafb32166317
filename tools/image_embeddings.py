"""Embed a folder of images with a pretrained vision backbone and write a TEMI embedding folder.

A Hugging Face ``transformers`` image model (``AutoModel`` + ``AutoImageProcessor``, e.g. DINOv2)
turns every image into one vector: the model's ``pooler_output`` when it has one, else the CLS
token ``last_hidden_state[:, 0]``. The model is read from a local directory; a hub name is only
downloaded when asked for (``--allow-download``), so nothing reaches the network by surprise.

Images are read either ImageFolder style (one subfolder per class, labels from the sorted
subfolder names) or from a flat folder (no labels). The output is the official TEMI
``gen_embeds.py`` layout (``embeddings.pt``, ``label.pt``, ``knn.pt`` and the ``-test`` files),
which the project's embeddings datamodule reads with ``data.folder=OUT``; ``classes.json`` and
``files.txt`` are written next to it so every row can be traced back to its image and class.

Usage::

    python -m tools.image_embeddings --images DIR --model PATH_OR_NAME --out DIR \\
        [--test-images DIR] [--k 50] [--batch-size 64] [--device cpu|cuda] [--allow-download]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, BaseImageProcessor, PreTrainedModel

from clustering.knn import check_k, cosine_knn
from datamodules.arrays import save_temi_folder

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _visible_subfolders(folder: Path) -> list[Path]:
    # Hidden folders (.ipynb_checkpoints, .git) are tool output, never classes.
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


ImageList = tuple[list[Path], torch.Tensor | None, list[str] | None]


def list_images(image_dir: str | Path) -> ImageList:
    """Image paths in a fixed order, plus labels ``[N]`` and class names when there are class subfolders."""
    folder = Path(image_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    flat = sorted(p for p in folder.iterdir() if _is_image(p))
    class_dirs = _visible_subfolders(folder)
    if not class_dirs:
        if not flat:
            raise ValueError(f"{folder}: holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return flat, None, None
    if flat:
        # Silently dropping top-level images (as torchvision's ImageFolder does) hides data loss.
        raise ValueError(f"{folder}: mixes images ({flat[0].name}, ...) with class subfolders; pick one")
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        members = sorted(p for p in class_dir.rglob("*") if _is_image(p))
        if not members:
            raise ValueError(f"{class_dir}: class folder holds no images")
        paths += members
        labels += [label] * len(members)
    return paths, torch.tensor(labels, dtype=torch.long), [d.name for d in class_dirs]


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports some corrupt files as SyntaxError
        raise ValueError(f"{path}: not a readable image ({error})") from error


def load_backbone(
    model: str | Path, device: str | torch.device | None = None, local_files_only: bool = True
) -> tuple[BaseImageProcessor, PreTrainedModel]:
    """Image processor and model in eval mode on ``device`` (default: cuda when available)."""
    try:
        processor = AutoImageProcessor.from_pretrained(str(model), local_files_only=local_files_only)
        backbone = AutoModel.from_pretrained(str(model), local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        hint = (
            "hub downloads are off unless --allow-download (local_files_only=False) is given; "
            "otherwise pass a local directory with config.json, the weights and preprocessor_config.json"
            if local_files_only
            else "check the name and the network"
        )
        raise OSError(f"could not load the image model {str(model)!r}: {hint} ({error})") from error
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return processor, backbone.to(device).eval()


def embed_pictures(pictures: Sequence[Image.Image], processor: BaseImageProcessor,
                   backbone: PreTrainedModel) -> torch.Tensor:
    """``[B, D]`` float32 CPU embeddings of one batch: ``pooler_output`` when the model has one, else the CLS token."""
    with torch.inference_mode():
        inputs = processor(images=list(pictures), return_tensors="pt").to(backbone.device)
        outputs = backbone(**inputs)
        pooled = getattr(outputs, "pooler_output", None)
        pooled = pooled if pooled is not None else outputs.last_hidden_state[:, 0]
        return pooled.float().cpu()


def embed_paths(
    paths: Sequence[Path], processor: BaseImageProcessor, backbone: PreTrainedModel, batch_size: int = 64
) -> torch.Tensor:
    """``[N, D]`` float32 CPU embeddings of image files (see ``embed_pictures``)."""
    return torch.cat([embed_pictures([load_rgb(p) for p in paths[start : start + batch_size]], processor, backbone)
                      for start in range(0, len(paths), batch_size)])


def embed_images(
    image_dir: str | Path,
    model: str | Path,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    local_files_only: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None, list[Path]]:
    """Embed every image of ``image_dir``.

    Returns ``(embeddings [N, D] float32, labels [N] or None, class names or None, paths)``.
    """
    paths, labels, class_names = list_images(image_dir)
    embeddings = embed_paths(paths, *load_backbone(model, device, local_files_only), batch_size)
    return embeddings, labels, class_names, paths


def _labels_by_train_classes(
    labels: torch.Tensor | None, class_names: list[str] | None, train_class_names: list[str] | None
) -> torch.Tensor | None:
    """Re-index test labels by class name, so a class has the same id in both splits."""
    if labels is None or train_class_names is None:
        return labels
    unknown = sorted(set(class_names) - set(train_class_names))
    if unknown:
        raise ValueError(f"test classes {unknown} do not occur among the train classes {train_class_names}")
    lookup = torch.tensor([train_class_names.index(name) for name in class_names])
    return lookup[labels]


def _write_lines(path: Path, paths: Sequence[Path]) -> None:
    path.write_text("".join(f"{p.resolve()}\n" for p in paths))


def write_embedding_folder(
    out_dir: str | Path,
    image_dir: str | Path,
    model: str | Path,
    k: int = 50,
    test_image_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    local_files_only: bool = True,
) -> dict:
    """Embed the train (and optional test) images and write the TEMI folder; returns a summary.

    Train rows get a ``k``-nearest cosine neighbour table (``knn.pt``); the test split has none,
    as in the official layout. Test labels take the train ids of the same class names.
    ``files.txt`` (``files-test.txt``) lists each row's image; the model is loaded once.
    """
    out_dir = Path(out_dir)
    paths, labels, class_names = list_images(image_dir)
    # Folder, class and k problems surface before the (slow) model runs and before any file is written.
    check_k(k, len(paths))
    test_paths: list[Path] = []
    test_labels = None
    if test_image_dir is not None:
        test_paths, test_labels, test_class_names = list_images(test_image_dir)
        test_labels = _labels_by_train_classes(test_labels, test_class_names, class_names)
        class_names = class_names or test_class_names
    processor, backbone = load_backbone(model, device, local_files_only)

    embeddings = embed_paths(paths, processor, backbone, batch_size)
    save_temi_folder(out_dir, embeddings, labels, cosine_knn(embeddings, k))
    _write_lines(out_dir / "files.txt", paths)
    if test_paths:
        test_embeddings = embed_paths(test_paths, processor, backbone, batch_size)
        save_temi_folder(out_dir, test_embeddings, test_labels, split="-test")
        _write_lines(out_dir / "files-test.txt", test_paths)
    if class_names is not None:
        (out_dir / "classes.json").write_text(json.dumps(class_names, indent=1) + "\n")
    return {
        "num_train": len(paths),
        "num_test": len(test_paths),
        "dim": embeddings.shape[1],
        "k": k,
        "out_dir": str(out_dir),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.image_embeddings", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--images", required=True, help="train images: class subfolders or a flat folder")
    parser.add_argument("--model", required=True, help="local model folder (hub name: --allow-download)")
    parser.add_argument("--out", required=True, help="output folder (TEMI layout)")
    parser.add_argument("--test-images", default=None, help="optional held-out images, same layout")
    parser.add_argument("--k", type=int, default=50, help="cosine neighbours per train image (TEMI: 50)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--allow-download", action="store_true", help="fetch --model from the hub")
    args = parser.parse_args(argv)
    summary = write_embedding_folder(
        args.out, args.images, args.model, k=args.k, test_image_dir=args.test_images,
        batch_size=args.batch_size, device=args.device, local_files_only=not args.allow_download,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
