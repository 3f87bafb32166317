"""What the latent grid V looked like at one validation (spec 004 §0 "Plots", P1 "Logging & Visualization",
P2 "Metrics"), handed from a module to ``callbacks.latent_plots.LatentPlots``."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class LatentSnapshot:
    """Latent statistics over the fixed evaluation pack (spec 004 §0), set by a module as
    ``self.latent_snapshot`` in ``on_validation_epoch_end``.

    With S montage sentences (16 in the spec, same order every run), C channels, an H x W grid, K radial
    frequency bins and N readout embeddings of size D:

    - ``montage`` [S, C, H, W]: the latents of the montage sentences;
    - ``radii`` [K] and ``power`` [C, K]: the batch-mean radial power spectrum of each channel;
    - ``alpha`` [C]: the fitted spectral slope of each channel (power ~ radius^-alpha);
    - ``correlation`` [C, C]: the channel correlation matrix;
    - ``tv``: the total variation;
    - ``kurtosis`` [C]: the gradient kurtosis of each channel;
    - ``z`` [N, D], ``z_group`` [N], ``z_is_counterfactual`` [N] (bool): the embeddings g(V), the
      paraphrase group of each and whether it embeds a counterfactual of that group;
    - with a decoder (P4 on), ``attention`` [T, H, W] and ``attention_labels`` (T strings): the decoder's
      attention over the grid when it writes each content token of the first montage sentences;
    - with a decoder, ``round_trips``: rows ``{input, output, graph_f1, rouge_l, cosine}`` of the first held-out
      sentences and what the decoder wrote from their latents (spec P5's checker): the best of the sampled
      candidates once P5's terms train, else the greedy decoding.

    Tensors are detached and moved to the CPU here, so a snapshot never holds device memory or a graph.
    """

    montage: Tensor
    radii: Tensor
    power: Tensor
    alpha: Tensor
    correlation: Tensor
    tv: float
    kurtosis: Tensor
    z: Tensor
    z_group: Tensor
    z_is_counterfactual: Tensor
    epoch: int
    global_step: int
    attention: Tensor | None = None
    attention_labels: list[str] | None = None
    round_trips: list[dict] | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Tensor):
                setattr(self, field.name, value.detach().cpu())
        self.tv = float(self.tv)
        _expect_dims("montage", self.montage, 4)
        _expect_dims("radii", self.radii, 1)
        _expect_dims("z", self.z, 2)
        channels, bins, embeddings = self.montage.shape[1], self.radii.shape[0], self.z.shape[0]
        _expect_shape("power", self.power, (channels, bins))
        _expect_shape("alpha", self.alpha, (channels,))
        _expect_shape("correlation", self.correlation, (channels, channels))
        _expect_shape("kurtosis", self.kurtosis, (channels,))
        _expect_shape("z_group", self.z_group, (embeddings,))
        _expect_shape("z_is_counterfactual", self.z_is_counterfactual, (embeddings,))
        if self.z_is_counterfactual.dtype != torch.bool:
            raise ValueError(f"z_is_counterfactual must be bool, got {self.z_is_counterfactual.dtype}")
        if self.attention is not None:
            _expect_dims("attention", self.attention, 3)
            if len(self.attention_labels or ()) != len(self.attention):
                raise ValueError(f"attention_labels must name each of the {len(self.attention)} attention maps, "
                                 f"got {self.attention_labels}")


def _expect_dims(name: str, tensor: Tensor, dims: int) -> None:
    if tensor.ndim != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(tensor.shape)}")


def _expect_shape(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} to match montage, radii and z, "
                         f"got {tuple(tensor.shape)}")
