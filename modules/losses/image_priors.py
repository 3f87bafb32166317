"""Image-ness priors on a 2-D latent grid and the statistics that judge them (spec 004, sections 0 and P1).

Every function takes a latent ``v`` of shape ``[B, C, H, W]`` (float, ``H, W >= 8``) and is a
differentiable pure function unless it says otherwise. Half-precision inputs are promoted to float32:
fourth moments and log spectra lose too much in 16 bits.

The P1 objective is ``L_img = sum_i lambda_i L_i`` over ``PRIOR_NAMES`` (spec P1 "Losses", starting
weights ``(0.5, 0.1, 0.1, 0.05, 0.05, 0.05)``); ``image_prior_terms`` returns the unweighted terms.
"""

from __future__ import annotations

import functools
import math

import pywt
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

PRIOR_NAMES = ("spectrum", "tv", "wavelet", "grad_kurtosis", "cov", "var")
MIN_SIDE = 8
EPS = 1e-8


def _checked_latent(v: Tensor) -> Tensor:
    """``v`` after validation, promoted to at least float32."""
    if v.ndim != 4:
        raise ValueError(f"v must be a latent grid [B, C, H, W], got shape {tuple(v.shape)}")
    if not v.is_floating_point():
        raise ValueError(f"v must be a floating-point tensor, got dtype {v.dtype}")
    if min(v.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"v needs H and W >= {MIN_SIDE}, got shape {tuple(v.shape)}")
    return v.to(torch.promote_types(v.dtype, torch.float32))


def _check_batch_of_sentences(v: Tensor) -> None:
    if v.shape[0] < 2:
        raise ValueError(f"v needs at least 2 sentences to measure variation, got shape {tuple(v.shape)}")


# Cached constants are built outside inference mode: Lightning validates under inference mode, and an
# inference tensor in the cache could not be saved for backward in the next training step.
@functools.lru_cache(maxsize=32)
@torch.inference_mode(False)
def _radial_bins(height: int, width: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Averaging weights ``[H, W, K]`` of the FFT frequencies in each radius bin, and each bin's mean radius.

    Radii are in cycles per image along the shorter side, so bin ``k`` holds the frequencies whose radius
    rounds to ``k`` for ``k = 1..min(H, W) // 2``; DC and the corners beyond the last bin fall in none.
    """
    side = min(height, width)
    freq_y = torch.fft.fftfreq(height, dtype=dtype, device=device) * side
    freq_x = torch.fft.fftfreq(width, dtype=dtype, device=device) * side
    radius = torch.sqrt(freq_y[:, None] ** 2 + freq_x[None, :] ** 2)
    bins = torch.arange(1, side // 2 + 1, dtype=dtype, device=device)
    membership = (radius.round()[..., None] == bins).to(dtype)
    weights = membership / membership.sum(dim=(0, 1))
    return weights, torch.einsum("hw,hwk->k", radius, weights)


def radial_power_spectrum(v: Tensor) -> tuple[Tensor, Tensor]:
    """Radially averaged power ``|FFT|^2`` of each mean-removed map (spec 0 "1/f spectrum"; DC ignored).

    Returns ``radii [K]``, the mean radius of the frequencies in each integer bin ``1..min(H, W) // 2``
    (fitting against it rather than the bin's integer removes most of the binning bias at low radii),
    and ``power [B, C, K]`` with orthonormal FFT scaling, so that ``sum |FFT|^2 = sum v^2``.
    """
    v = _checked_latent(v)
    # The mean only reaches the ignored DC term, but left in, a large offset costs float32 FFT precision.
    centered = v - v.mean(dim=(-2, -1), keepdim=True)
    spectrum = torch.fft.fft2(centered, norm="ortho")
    # real^2 + imag^2 rather than abs(): abs has no gradient at the zeroed DC term.
    power = spectrum.real.square() + spectrum.imag.square()
    weights, radii = _radial_bins(v.shape[-2], v.shape[-1], v.dtype, v.device)
    return radii, torch.einsum("bchw,hwk->bck", power, weights)


def spectrum_slope(power: Tensor, radii: Tensor, eps: float = 1e-12) -> Tensor:
    """Spectral exponent ``alpha`` in ``power ~ radius^-alpha``, one per leading index of ``power [..., K]``.

    Closed-form least squares of ``log(power + eps)`` on ``log radius`` (spec P1: target ``alpha ~ 2``).
    """
    if radii.ndim != 1 or radii.shape[0] < 2 or power.shape[-1] != radii.shape[0]:
        raise ValueError(
            f"power [..., K] and radii [K] need matching K >= 2, "
            f"got shapes {tuple(power.shape)} and {tuple(radii.shape)}"
        )
    log_radius = radii.log()
    log_radius = log_radius - log_radius.mean()
    log_power = (power + eps).log()
    log_power = log_power - log_power.mean(dim=-1, keepdim=True)
    slope = (log_power * log_radius).sum(dim=-1) / log_radius.square().sum()
    return -slope


def spectrum_slope_loss(v: Tensor, target_alpha: float = 2.0) -> Tensor:
    """``L_spec`` (spec P1): mean squared error of each map's spectral exponent to ``target_alpha``."""
    radii, power = radial_power_spectrum(v)
    return (spectrum_slope(power, radii) - target_alpha).square().mean()


def _forward_differences(v: Tensor) -> tuple[Tensor, Tensor]:
    """``dx [B, C, H, W-1]`` and ``dy [B, C, H-1, W]``."""
    return v[..., :, 1:] - v[..., :, :-1], v[..., 1:, :] - v[..., :-1, :]


def total_variation(v: Tensor) -> Tensor:
    """``L_tv`` (spec P1): anisotropic TV, the mean of ``mean |dx|`` and ``mean |dy|``."""
    dx, dy = _forward_differences(_checked_latent(v))
    return (dx.abs().mean() + dy.abs().mean()) / 2


@functools.lru_cache(maxsize=32)
@torch.inference_mode(False)
def _wavelet_filter_bank(wavelet: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[4, 1, L, L]`` cross-correlation kernels of one 2-D DWT step from ``pywt.Wavelet(wavelet)``.

    Order: approximation, then pywt's horizontal, vertical and diagonal details (high-pass along H, W, both).
    Filters are reversed because ``conv2d`` correlates where the DWT convolves.
    """
    filters = pywt.Wavelet(wavelet)
    low = torch.tensor(filters.dec_lo[::-1], dtype=dtype, device=device)
    high = torch.tensor(filters.dec_hi[::-1], dtype=dtype, device=device)
    along_h_then_w = ((low, low), (high, low), (low, high), (high, high))
    return torch.stack([torch.outer(rows, cols) for rows, cols in along_h_then_w]).unsqueeze(1)


def _periodic_pad(maps: Tensor, pad: int) -> Tensor:
    """pywt's ``periodization`` extension: odd sides repeat their last sample, then wrap ``pad`` each side."""
    if maps.shape[-2] % 2:
        maps = torch.cat([maps, maps[..., -1:, :]], dim=-2)
    if maps.shape[-1] % 2:
        maps = torch.cat([maps, maps[..., -1:]], dim=-1)
    height, width = maps.shape[-2:]
    rows = torch.arange(-pad, height + pad, device=maps.device) % height
    cols = torch.arange(-pad, width + pad, device=maps.device) % width
    return maps[..., rows, :][..., cols]


def _dwt_step(maps: Tensor, bank: Tensor) -> tuple[Tensor, Tensor]:
    """One periodized 2-D DWT step of ``maps [N, 1, H, W]``: approximation ``[N, 1, h, w]``, details
    ``[N, 3, h, w]``.

    Matches ``pywt.dwt2(..., mode="periodization")`` with ``h, w = ceil(H / 2), ceil(W / 2)``.
    """
    coefficients = F.conv2d(_periodic_pad(maps, bank.shape[-1] // 2 - 1), bank, stride=2)
    return coefficients[:, :1], coefficients[:, 1:]


def wavelet_sparsity(v: Tensor, wavelet: str = "db2", levels: int = 2) -> Tensor:
    """``L_wav`` (spec P1): mean ``|detail coefficient|`` of a ``levels``-deep periodized 2-D DWT.

    Each map is divided by its own spatial std first, so the measure is scale-invariant and can only be
    lowered by concentrating band-pass energy in few coefficients (edges), not by shrinking the map.
    Levels are averaged with equal weight.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    v = _checked_latent(v)
    maps = rearrange(v, "b c h w -> (b c) 1 h w")
    approximation = maps / maps.var(dim=(-2, -1), correction=0, keepdim=True).add(EPS).sqrt()
    bank = _wavelet_filter_bank(wavelet, v.dtype, v.device)
    detail_means = []
    for _ in range(levels):
        approximation, details = _dwt_step(approximation, bank)
        detail_means.append(details.abs().mean())
    return torch.stack(detail_means).mean()


def gradient_kurtosis(v: Tensor) -> Tensor:
    """Kurtosis ``E[(g - mu)^4] / Var(g)^2`` of the pooled ``dx`` and ``dy`` of each channel; ``[C]``.

    Spec P1 "heavy-tailed gradients": natural images have > 3 (the Gaussian value).
    """
    dx, dy = _forward_differences(_checked_latent(v))
    per_channel = "b c h w -> c (b h w)"
    gradients = torch.cat([rearrange(dx, per_channel), rearrange(dy, per_channel)], dim=1)
    centered = gradients - gradients.mean(dim=1, keepdim=True)
    variance = centered.square().mean(dim=1)
    return centered.pow(4).mean(dim=1) / (variance.square() + EPS)


def gradient_kurtosis_loss(v: Tensor, target: float = 4.0) -> Tensor:
    """``L_gradkurt`` (spec P1): mean over channels of ``relu(target - kurtosis)``, a hinge to heavy tails."""
    return F.relu(target - gradient_kurtosis(v)).mean()


def channel_correlation(v: Tensor) -> Tensor:
    """Pearson correlation between channels over batch and positions; ``[C, C]`` (spec P1 "L_cov")."""
    values = rearrange(_checked_latent(v), "b c h w -> c (b h w)")
    centered = values - values.mean(dim=1, keepdim=True)
    covariance = centered @ centered.T / values.shape[1]
    std = (covariance.diagonal() + EPS).sqrt()
    return covariance / torch.outer(std, std)


def _off_diagonal(matrix: Tensor) -> Tensor:
    """``matrix`` with its diagonal zeroed."""
    return matrix.masked_fill(torch.eye(matrix.shape[0], dtype=torch.bool, device=matrix.device), 0.0)


def decorrelation_loss(v: Tensor) -> Tensor:
    """``L_cov`` (spec P1): squared off-diagonal channel correlations summed and divided by the number
    of channels, VICReg's covariance term (Bardes et al. 2022, eq. 3) on correlations; 0 for one channel.

    Summed, not averaged over the ``C(C-1)`` pairs: averaged, a weight of 0.05 leaves correlations
    of 0.4 costing ~1e-3, too little to move a latent that InfoNCE is also shaping."""
    correlation = channel_correlation(v)
    return _off_diagonal(correlation).square().sum() / correlation.shape[0]


def target_variance_loss(v: Tensor, target: float = 1.0, eps: float = 1e-6) -> Tensor:
    """``L_var`` (spec P1): mean over maps of ``log(std / sqrt(target))^2``, each map's spatial std.

    Per map, so no sentence may have a flat field; in log form, because the gradient of a variance
    vanishes as a map flattens (squared differences would let flat maps stay flat) while the log
    ratio's grows.
    """
    variance = _checked_latent(v).var(dim=(-2, -1), correction=0)
    return (0.5 * torch.log((variance + eps) / target)).square().mean()


def _between_sentence_variance(v: Tensor) -> Tensor:
    """Variance over the batch of each ``V[:, c, h, w]``, averaged over positions; ``[C]``."""
    return v.var(dim=0, correction=0).mean(dim=(-2, -1))


def text_variance_loss(v: Tensor, min_variance: float = 0.5) -> Tensor:
    """Anti-collapse hinge for P1: mean over channels of ``relu(min_variance - between-sentence variance)``.

    Every spec P1 prior is computed per sample, so a constant latent that ignores the text minimizes them
    all; this term, which needs the latent to vary across sentences, is what keeps P1 from collapsing.
    """
    v = _checked_latent(v)
    _check_batch_of_sentences(v)
    return F.relu(min_variance - _between_sentence_variance(v)).mean()


def text_dependence(v: Tensor) -> Tensor:
    """Share of the latent's variance that varies across sentences, in ``[0, 1]``.

    ``mean_{c,h,w} Var_batch(V) / mean_c Var_{batch,h,w}(V)``: 0 for a text-independent latent, 1 for one
    whose maps are constant in space and differ only between sentences (law of total variance).
    """
    v = _checked_latent(v)
    _check_batch_of_sentences(v)
    total = v.var(dim=(0, 2, 3), correction=0).mean()
    return _between_sentence_variance(v).mean() / (total + EPS)


def spatial_text_dependence(v: Tensor) -> Tensor:
    """Share of the across-sentence variance left after subtracting each map's channel mean, in ``[0, 1]``.

    ``mean_{c,h,w} Var_batch(V - mean_{h,w} V) / mean_{c,h,w} Var_batch(V)`` (issue 12): near 0 when the
    sentences differ only in each channel's brightness over a fixed texture, which every per-map prior and a
    pooled readout accept; a latent whose layout carries the sentence keeps a large share.
    """
    v = _checked_latent(v)
    _check_batch_of_sentences(v)
    spatial = v - v.mean(dim=(-2, -1), keepdim=True)
    return _between_sentence_variance(spatial).mean() / (_between_sentence_variance(v).mean() + EPS)


def template_share(v: Tensor) -> Tensor:
    """Per map, the share of its spatial variance the channel's template (the batch-mean map) explains,
    ``corr(V[b, c], mean_b V[:, c])^2`` over positions; ``[B, C]``. 1 everywhere: one fixed pattern per
    channel, only rescaled from sentence to sentence (issue 12)."""
    v = _checked_latent(v)
    _check_batch_of_sentences(v)
    maps = v - v.mean(dim=(-2, -1), keepdim=True)
    template = maps.mean(dim=0, keepdim=True)
    covariance = (maps * template).sum(dim=(-2, -1))
    variances = maps.square().sum(dim=(-2, -1)) * template.square().sum(dim=(-2, -1))
    return covariance.square() / (variances + EPS)


def gaussian_blur(v: Tensor, sigma: float = 0.8) -> Tensor:
    """Depthwise separable Gaussian blur, kernel radius ``ceil(3 sigma)``, reflect padding; same shape.

    Spec P1 "warmup trick": blur ``V`` before the priors for the first epochs.
    """
    v = _checked_latent(v)
    radius = math.ceil(3 * sigma)
    if sigma <= 0 or radius >= min(v.shape[-2:]):
        raise ValueError(
            f"sigma must be > 0 with ceil(3 sigma) < min(H, W), got sigma={sigma} for shape {tuple(v.shape)}"
        )
    offsets = torch.arange(-radius, radius + 1, dtype=v.dtype, device=v.device)
    kernel = torch.exp(-offsets.square() / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    maps = F.pad(rearrange(v, "b c h w -> (b c) 1 h w"), (radius,) * 4, mode="reflect")
    maps = F.conv2d(F.conv2d(maps, kernel.view(1, 1, -1, 1)), kernel.view(1, 1, 1, -1))
    return rearrange(maps, "(b c) 1 h w -> b c h w", c=v.shape[1])


def image_prior_terms(v: Tensor, target_alpha: float = 2.0, target_variance: float = 1.0,
                      kurtosis_target: float = 4.0, wavelet: str = "db2") -> dict[str, Tensor]:
    """The unweighted spec P1 terms of ``L_img``, one scalar per name in ``PRIOR_NAMES``."""
    return {
        "spectrum": spectrum_slope_loss(v, target_alpha),
        "tv": total_variation(v),
        "wavelet": wavelet_sparsity(v, wavelet),
        "grad_kurtosis": gradient_kurtosis_loss(v, kurtosis_target),
        "cov": decorrelation_loss(v),
        "var": target_variance_loss(v, target_variance),
    }


@torch.no_grad()
def latent_statistics(v: Tensor) -> dict[str, Tensor | float]:
    """Spec P1 "Logging & Visualization" statistics of a batch of latents, in float64 on the CPU.

    ``alpha [C]`` is fitted to the batch-mean spectrum ``power [C, K]`` of each channel (the gate wants
    alpha in [1.5, 2.5]); ``kurtosis [C]`` (> 3), ``correlation [C, C]`` (near-diagonal), ``tv``,
    ``max_offdiag_correlation`` (largest absolute off-diagonal correlation), ``text_dependence``,
    ``spatial_text_dependence`` and ``template_share`` (its mean over maps).
    """
    v = _checked_latent(v).detach().to("cpu", torch.float64)
    radii, power = radial_power_spectrum(v)
    mean_power = power.mean(dim=0)
    correlation = channel_correlation(v)
    return {
        "alpha": spectrum_slope(mean_power, radii),
        "power": mean_power,
        "radii": radii,
        "tv": total_variation(v).item(),
        "kurtosis": gradient_kurtosis(v),
        "correlation": correlation,
        "max_offdiag_correlation": _off_diagonal(correlation).abs().max().item(),
        "text_dependence": text_dependence(v).item(),
        "spatial_text_dependence": spatial_text_dependence(v).item(),
        "template_share": template_share(v).mean().item(),
    }
