"""IMU window encoder for 2.56 s windows at 50 Hz (issue 10, "IMU encoder"): a convolutional stem
with a small Transformer over time, and the projection into the text space.

The stem (two strided 1-D convolutions, kernel 5, BatchNorm, GELU) turns ``[B, C, T]`` into
``T / 4`` tokens of ``width`` features, each seeing 17 samples (0.34 s at 50 Hz, about half a
step); a pre-LayerNorm Transformer (``nn.TransformerEncoder``) mixes them over the whole window
with learned position embeddings, and a mean over time gives one feature vector per window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STEM_STRIDE = 4  # two stride-2 convolutions
POSITION_INIT_STD = 0.02


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(in_channels, out_channels, kernel_size=5, stride=2, padding=2, bias=False),
                         nn.BatchNorm1d(out_channels), nn.GELU())


class IMUEncoder(nn.Module):
    """``[B, C, T]`` windows to ``[B, width]`` features.

    Args:
        num_channels: ``C`` (nine for UCI HAR: body acc, body gyro, total acc, each x/y/z).
        window_length: ``T``, a multiple of 4 (128 samples for 2.56 s at 50 Hz).
        width: token features; depth, heads: of the Transformer; dropout: inside it.
    """

    def __init__(self, num_channels: int, window_length: int, width: int = 128, depth: int = 2, heads: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if window_length % STEM_STRIDE:
            raise ValueError(f"window_length must be a multiple of {STEM_STRIDE}, got {window_length}")
        if width % heads:
            raise ValueError(f"width must be divisible by heads, got width={width}, heads={heads}")
        self.num_channels, self.window_length, self.width = num_channels, window_length, width
        self.stem = nn.Sequential(conv_block(num_channels, width // 2), conv_block(width // 2, width))
        self.positions = nn.Parameter(torch.randn(1, window_length // STEM_STRIDE, width) * POSITION_INIT_STD)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        if windows.dim() != 3 or windows.shape[1:] != (self.num_channels, self.window_length):
            raise ValueError(f"IMU windows must have shape [B, {self.num_channels}, {self.window_length}], "
                             f"got {tuple(windows.shape)}")
        tokens = self.stem(windows).transpose(1, 2) + self.positions
        return self.norm(self.transformer(tokens)).mean(dim=1)


class TextProjection(nn.Module):
    """Encoder features to unit vectors of the frozen text space (a two-layer MLP, then L2 normalization)."""

    def __init__(self, width: int, text_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, text_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(features), dim=-1)
