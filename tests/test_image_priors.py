"""Image-ness priors and latent statistics against synthetic fields and values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pywt
import torch

from modules.losses.image_priors import (
    PRIOR_NAMES,
    channel_correlation,
    decorrelation_loss,
    gaussian_blur,
    gradient_kurtosis,
    gradient_kurtosis_loss,
    image_prior_terms,
    latent_statistics,
    radial_power_spectrum,
    spatial_text_dependence,
    spectrum_slope,
    spectrum_slope_loss,
    target_variance_loss,
    template_share,
    text_dependence,
    text_variance_loss,
    total_variation,
    wavelet_sparsity,
)


def frequency_radius(size: int) -> torch.Tensor:
    freq = torch.fft.fftfreq(size, dtype=torch.float64) * size
    return torch.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)


def white_noise(batch: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, size, size, generator=generator, dtype=torch.float64)


def power_law_amplitude(alpha: float, size: int) -> torch.Tensor:
    """f^(-alpha/2) on the FFT grid, 0 at DC."""
    radius = frequency_radius(size)
    return torch.where(radius > 0, radius.clamp_min(1.0) ** (-alpha / 2), 0.0)


def power_law_field(alpha: float, size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Random phases (Hermitian, from white noise) with amplitude f^(-alpha/2): power exactly f^-alpha."""
    phases = torch.fft.fft2(white_noise(batch, size, seed)).angle()
    return torch.fft.ifft2(power_law_amplitude(alpha, size) * torch.exp(1j * phases)).real


def filtered_noise(alpha: float, size: int, batch: int, seed: int = 0) -> torch.Tensor:
    """White noise shaped by f^(-alpha/2): power f^-alpha only in expectation (Rayleigh amplitudes)."""
    spectrum = torch.fft.fft2(white_noise(batch, size, seed))
    return torch.fft.ifft2(power_law_amplitude(alpha, size) * spectrum).real


def step_image() -> torch.Tensor:
    """[1, 1, 8, 8]: 0 left of column 4, 1 from it on."""
    image = torch.zeros(1, 1, 8, 8)
    image[..., 4:] = 1.0
    return image


def checkerboard(axis: int, size: int = 8) -> torch.Tensor:
    """[size, size] of +-1 alternating along ``axis``: zero mean, unit variance."""
    signs = (-1.0) ** torch.arange(size)
    return signs[:, None].expand(size, size) if axis == 0 else signs[None, :].expand(size, size)


def rectangles(size: int = 32) -> torch.Tensor:
    image = torch.zeros(size, size)
    image[4:14, 3:20] = 2.0
    image[18:29, 10:27] = -1.0
    image[8:24, 22:30] += 1.5
    return image


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
def test_slope_recovers_alpha_of_power_law_fields(alpha, size):
    radii, power = radial_power_spectrum(power_law_field(alpha, size))
    assert radii.shape == (size // 2,)
    assert spectrum_slope(power, radii) == pytest.approx(torch.full((2, 1), alpha), abs=0.1)


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
def test_statistics_alpha_on_filtered_noise(alpha):
    stats = latent_statistics(filtered_noise(alpha, size=64, batch=16).float())
    assert stats["alpha"].item() == pytest.approx(alpha, abs=0.1)


def test_radial_binning_of_a_single_frequency():
    # cos(2 pi 3 w / 16): orthonormal FFT puts 16*16/2 / 2 = 64 at each of (0, +-3), nothing elsewhere.
    size = 16
    wave = torch.cos(2 * math.pi * 3 * torch.arange(size) / size).expand(size, size).reshape(1, 1, size, size)
    radii, power = radial_power_spectrum(wave + 5.0)  # the offset only moves DC, which is ignored
    members_of_bin_3 = int((frequency_radius(size).round() == 3).sum())
    expected = torch.zeros(size // 2)
    expected[2] = 128.0 / members_of_bin_3
    assert power[0, 0] == pytest.approx(expected, abs=1e-4)
    assert radii[0].item() == pytest.approx(1 + 4 * (math.sqrt(2) - 1) / 8)  # 4 axis points at 1, 4 diagonal


def test_spectrum_slope_of_an_exact_power_law_and_its_loss():
    radii = torch.arange(1.0, 17.0)
    power = torch.stack([5.0 * radii**-2.5, radii**-1.0]).reshape(2, 1, 16)
    assert spectrum_slope(power, radii) == pytest.approx(torch.tensor([[2.5], [1.0]]), abs=1e-5)
    with pytest.raises(ValueError, match="radii"):
        spectrum_slope(power, radii[:8])


def test_spectrum_loss_is_squared_error_to_the_target():
    field = power_law_field(3.0, 64).float()
    alpha = spectrum_slope(*reversed(radial_power_spectrum(field)))
    expected = (alpha - 2.0).square().mean()
    assert spectrum_slope_loss(field).item() == pytest.approx(expected.item(), rel=1e-5)
    assert spectrum_slope_loss(field, target_alpha=3.0).item() < 0.01


def test_total_variation_by_hand():
    # Step: one |dx| = 1 in each of 8 rows of 7 differences, dy = 0 -> (1/7 + 0) / 2.
    assert total_variation(step_image()).item() == pytest.approx(1 / 14)
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    assert total_variation((2 * cols + 3 * rows).expand(2, 3, 8, 8)).item() == pytest.approx(2.5)


def test_total_variation_is_positive_on_noise_and_falls_after_blur():
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tv_noise = total_variation(noise).item()
    assert tv_noise > 0.5
    assert total_variation(gaussian_blur(noise, sigma=0.8)).item() < 0.5 * tv_noise


def test_gaussian_blur_keeps_constants_shape_and_mass():
    constant = torch.full((2, 3, 9, 12), 1.7)
    blurred_constant = gaussian_blur(constant)
    assert blurred_constant.shape == constant.shape
    assert torch.allclose(blurred_constant, constant)
    impulse = torch.zeros(1, 1, 16, 16)
    impulse[..., 8, 8] = 1.0
    blurred = gaussian_blur(impulse, sigma=0.8)
    # radius ceil(2.4) = 3; the center keeps (w0 / sum w)^2 with w_k = exp(-k^2 / (2 * 0.64)).
    weight_sum = 1 + 2 * sum(math.exp(-k * k / 1.28) for k in (1, 2, 3))
    assert blurred.sum().item() == pytest.approx(1.0)
    assert blurred[0, 0, 8, 8].item() == pytest.approx(weight_sum**-2)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(constant, sigma=3.0)  # radius 9 does not fit a reflection of 9 rows


def test_wavelet_details_match_pywt_periodization():
    maps = torch.randn(2, 2, 13, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected_levels = []
    for level in (1, 2):
        per_map = []
        for image in maps.reshape(4, 13, 12).numpy():
            details = pywt.wavedec2(image / image.std(), "db2", mode="periodization", level=2)[3 - level]
            per_map.append(np.concatenate([np.abs(d).ravel() for d in details]))
        expected_levels.append(np.concatenate(per_map).mean())
    assert wavelet_sparsity(maps, "db2", levels=2).item() == pytest.approx(np.mean(expected_levels), rel=1e-6)


def test_wavelet_sparsity_is_scale_invariant_and_lower_for_piecewise_constant_images():
    noise = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    blocks = rectangles().reshape(1, 1, 32, 32)
    blocks = (blocks - blocks.mean()) / blocks.std() * noise.std()
    assert wavelet_sparsity(3.0 * noise).item() == pytest.approx(wavelet_sparsity(noise).item(), rel=1e-5)
    assert wavelet_sparsity(blocks).item() < 0.5 * wavelet_sparsity(noise).item()


def test_gradient_kurtosis_by_hand_and_on_noise():
    # Step: 8 ones among 56 dx and 56 dy -> Bernoulli(p = 1/14), kurtosis (1 - 3pq) / pq = 157 / 13.
    assert gradient_kurtosis(step_image()).item() == pytest.approx(157 / 13, rel=1e-5)
    noise = torch.randn(4, 2, 64, 64, generator=torch.Generator().manual_seed(3))
    assert gradient_kurtosis(noise) == pytest.approx(torch.full((2,), 3.0), abs=0.15)


def test_gradient_kurtosis_loss_is_a_hinge():
    assert gradient_kurtosis_loss(step_image(), target=4.0).item() == 0.0
    assert gradient_kurtosis_loss(step_image(), target=20.0).item() == pytest.approx(20 - 157 / 13, rel=1e-5)


def test_channel_correlation_and_decorrelation_by_hand():
    along_w, along_h = checkerboard(axis=1), checkerboard(axis=0)  # zero mean and orthogonal
    identical = torch.stack([along_w, along_w]).unsqueeze(0)
    assert channel_correlation(identical) == pytest.approx(torch.ones(2, 2), abs=1e-6)
    assert decorrelation_loss(identical).item() == pytest.approx(1.0, abs=1e-6)  # (1 + 1) / 2 channels
    opposite = torch.stack([along_w, -along_w]).unsqueeze(0)
    assert channel_correlation(opposite)[0, 1].item() == pytest.approx(-1.0, abs=1e-6)
    # corr = [[1, 1, 0], [1, 1, 0], [0, 0, 1]]: 2 of the 6 off-diagonal entries are 1.
    mixed = torch.stack([along_w, along_w, along_h]).unsqueeze(0)
    expected = torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert channel_correlation(mixed) == pytest.approx(expected, abs=1e-6)
    assert decorrelation_loss(mixed).item() == pytest.approx(2 / 3, abs=1e-6)  # 2 ones / 3 channels
    assert decorrelation_loss(identical[:, :1]).item() == 0.0


def test_target_variance_loss_by_hand():
    # Maps of variance 4 and 1 (std 2 and 1): (log 2)^2 and 0, averaged over the two maps.
    maps = torch.stack([2 * checkerboard(axis=1), checkerboard(axis=0)]).unsqueeze(0)
    assert target_variance_loss(maps, eps=0.0).item() == pytest.approx(math.log(2) ** 2 / 2)
    # Per map, not per batch: variances 4 and 0.25 average to ~2 but each is off by a factor 2 in std.
    batch = torch.stack([2 * checkerboard(axis=1), 0.5 * checkerboard(axis=0)]).unsqueeze(1)
    assert target_variance_loss(batch, eps=0.0).item() == pytest.approx(math.log(2) ** 2)
    # A flat map is penalized strongly, and its gradient does not vanish.
    flat = torch.full((1, 1, 8, 8), 3.0) + 1e-3 * checkerboard(axis=0)
    flat.requires_grad_(True)
    loss = target_variance_loss(flat)
    loss.backward()
    assert loss.item() > 10 and flat.grad.abs().max() > 1.0


def test_text_variance_and_dependence_by_hand():
    pattern = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    identical = pattern.expand(3, 2, 8, 8)
    assert text_dependence(identical).item() == pytest.approx(0.0, abs=1e-6)
    assert text_variance_loss(identical).item() == pytest.approx(0.5, abs=1e-6)
    # Constant maps 0 and 1: batch variance 0.25 everywhere, all of the total variance.
    flat = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    assert text_dependence(flat).item() == pytest.approx(1.0, abs=1e-6)
    assert text_variance_loss(flat).item() == pytest.approx(0.25, abs=1e-6)
    assert text_variance_loss(flat, min_variance=0.2).item() == 0.0
    # a and a + 2 for a = +-1: batch variance 1, total variance of {-1, 1, 1, 3} is 2.
    shifted = torch.stack([checkerboard(axis=1), checkerboard(axis=1) + 2]).unsqueeze(1)
    assert text_dependence(shifted).item() == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 sentences"):
        text_dependence(flat[:1])


def test_spatial_text_dependence_and_template_share_by_hand():
    pattern = checkerboard(axis=1)
    # Brightness levels over one fixed texture: nothing spatial varies between sentences, and the template
    # explains every map.
    brightness = torch.stack([pattern, pattern + 2]).unsqueeze(1)
    assert spatial_text_dependence(brightness).item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(template_share(brightness), torch.ones(2, 1))
    # Channel 0 flips sign between sentences (template 0, all variance spatial); channel 1 is one pattern.
    along_w, along_h = checkerboard(axis=1), checkerboard(axis=0)
    latent = torch.stack([torch.stack([along_w, along_h]), torch.stack([-along_w, along_h])])
    assert spatial_text_dependence(latent).item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(template_share(latent), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    stats = latent_statistics(latent)
    assert stats["spatial_text_dependence"] == pytest.approx(1.0) and stats["template_share"] == pytest.approx(0.5)
    # Half the across-sentence variance in the levels, half in the layout: levels +-1, patterns +-along_w.
    mixed = torch.stack([along_w + 1, -along_w - 1]).unsqueeze(1)
    assert spatial_text_dependence(mixed).item() == pytest.approx(0.5, abs=1e-6)


def test_prior_terms_are_named_finite_and_differentiable():
    for latent in (torch.randn(2, 3, 16, 16), torch.zeros(2, 3, 16, 16)):
        latent.requires_grad_(True)
        terms = image_prior_terms(latent)
        assert tuple(terms) == PRIOR_NAMES
        assert all(term.ndim == 0 and torch.isfinite(term) for term in terms.values())
        sum(terms.values()).backward()
        assert torch.isfinite(latent.grad).all()
    assert latent.grad.abs().sum() == 0.0  # a constant latent sits at a flat point of every prior


def test_priors_train_after_cached_constants_were_built_in_inference_mode():
    latent = torch.randn(2, 2, 24, 20)
    with torch.inference_mode():
        image_prior_terms(latent)
    latent.requires_grad_(True)
    sum(image_prior_terms(latent).values()).backward()
    assert latent.grad.abs().sum() > 0


def test_latent_statistics_shapes_and_values():
    along_w, along_h = checkerboard(axis=1), checkerboard(axis=0)
    latent = torch.stack([torch.stack([along_w, along_h]), torch.stack([-along_w, along_h])])
    stats = latent_statistics(latent)
    assert stats["power"].shape == (2, 4) and stats["radii"].shape == (4,)
    assert stats["alpha"].shape == stats["kurtosis"].shape == (2,)
    assert stats["correlation"].dtype == torch.float64
    assert stats["tv"] == pytest.approx(1.0)  # |dx| = 2 on one channel, |dy| = 2 on the other
    assert stats["max_offdiag_correlation"] == pytest.approx(0.0, abs=1e-9)
    # Channel 0 flips sign across sentences (all its variance), channel 1 does not: (1 + 0) / (1 + 1).
    assert stats["text_dependence"] == pytest.approx(0.5)


@pytest.mark.parametrize("shape", [(3, 16, 16), (2, 3, 7, 16)])
def test_bad_latent_shape_raises(shape):
    with pytest.raises(ValueError, match="v "):
        total_variation(torch.zeros(shape))
