"""Velocity networks ``v(x, t)`` for flow matching: an MLP for vectors and 2-D toys, a small U-Net
for images. Both take ``x [B, *sample_shape]`` and times ``t [B]`` in [0, 1] and return ``[B, *sample_shape]``."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn


class TimeEmbedding(nn.Module):
    """Sinusoidal features of ``t`` (Transformer positional encoding of ``1000 t``, as in DDPM) and an MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding size must be even, got {dim}")
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # The angles reach 1000 rad: computed in fp32 whatever the module's dtype (a bf16 table
        # would be off by radians), then cast to the MLP's dtype (bf16 under ``bf16-true``).
        half = self.dim // 2
        frequencies = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000 * t.float().unsqueeze(1) * frequencies
        features = torch.cat([angles.sin(), angles.cos()], dim=1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        state_dict.pop(prefix + "frequencies", None)  # earlier checkpoints stored the constant table
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _check_input(x: torch.Tensor, t: torch.Tensor, sample_shape: tuple[int, ...]) -> None:
    if tuple(x.shape[1:]) != sample_shape or t.shape != x.shape[:1]:
        raise ValueError(f"expected x [B, {', '.join(map(str, sample_shape))}] and t [B], "
                         f"got x {tuple(x.shape)} and t {tuple(t.shape)}")


class VelocityMLP(nn.Module):
    """``v(x, t)``: the flattened sample and a time embedding through ``depth`` SiLU layers."""

    def __init__(self, sample_shape: list[int], hidden_dim: int = 256, depth: int = 3, time_dim: int = 64) -> None:
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        dim = math.prod(self.sample_shape)
        self.time = TimeEmbedding(time_dim)
        layers, width = [], dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden_dim), nn.SiLU()]
            width = hidden_dim
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_input(x, t, self.sample_shape)
        out = self.net(torch.cat([x.flatten(1), self.time(t)], dim=1))
        return out.view(x.shape)


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between (DDPM's ResBlock)."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(8, in_channels), in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_dim, out_channels)
        self.norm2, self.conv2 = nn.GroupNorm(min(8, out_channels), out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + rearrange(self.time(time), "b c -> b c 1 1")
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return h + self.skip(x)


class VelocityUNet(nn.Module):
    """A small U-Net ``v(x, t)`` for images ``[C, H, W]``: one residual block per level, strided-conv
    downsampling, nearest upsampling, skip connections by concatenation, zero-initialized output.

    ``channels`` gives the width of each level; H and W must be divisible by ``2 ** (levels - 1)``.
    """

    def __init__(self, sample_shape: list[int], channels: list[int] = (32, 64, 128), time_dim: int = 128) -> None:
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        if len(self.sample_shape) != 3:
            raise ValueError(f"the U-Net takes images [C, H, W]; samples have shape {list(sample_shape)}")
        in_channels, height, width = self.sample_shape
        scale = 2 ** (len(channels) - 1)
        if height % scale or width % scale:
            raise ValueError(f"images of {height}x{width} cannot be halved {len(channels) - 1} times "
                             f"(channels={list(channels)}); use fewer levels")
        self.time = TimeEmbedding(time_dim)
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList(ResidualBlock(a, b, time_dim) for a, b in zip([channels[0], *channels[:-1]], channels))
        self.downsample = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in channels[:-1])
        self.middle = ResidualBlock(channels[-1], channels[-1], time_dim)
        self.up = nn.ModuleList(ResidualBlock(2 * c, c_out, time_dim)
                                for c, c_out in zip(channels[::-1], [*channels[::-1][1:], channels[0]]))
        self.out = nn.Sequential(nn.GroupNorm(min(8, channels[0]), channels[0]), nn.SiLU(),
                                 nn.Conv2d(channels[0], in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_input(x, t, self.sample_shape)
        time = self.time(t)
        h, skips = self.stem(x), []
        for level, block in enumerate(self.down):
            h = block(h, time)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self.middle(h, time)
        for level, block in enumerate(self.up):
            if level:
                h = nn.functional.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1), time)
        return self.out(h)


def build_velocity_network(kind: str, sample_shape: list[int], hidden_dim: int, depth: int,
                           channels: list[int], time_dim: int) -> nn.Module:
    if kind == "mlp":
        return VelocityMLP(sample_shape, hidden_dim, depth, time_dim)
    if kind == "unet":
        return VelocityUNet(sample_shape, channels, time_dim)
    raise ValueError(f"network must be 'mlp' or 'unet', got {kind!r}")
