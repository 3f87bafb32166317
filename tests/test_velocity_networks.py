"""Velocity networks: shapes, time dependence, the U-Net's zero start, and clear shape errors."""

import pytest
import torch

from modules.networks.velocity import VelocityMLP, VelocityUNet, build_velocity_network


@pytest.mark.parametrize("shape", [[1, 8, 8], [1, 28, 28], [3, 16, 16]])
def test_unet_keeps_the_image_shape_and_starts_at_zero(shape):
    net = VelocityUNet(shape, channels=[16, 32, 64], time_dim=32)
    x, t = torch.randn(3, *shape), torch.rand(3)
    out = net(x, t)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialized output layer
    out.sum().backward()
    assert net.out[-1].weight.grad.abs().sum() > 0  # and it can leave zero


def test_unet_depends_on_time_and_input_once_its_output_layer_is_nonzero():
    torch.manual_seed(0)
    net = VelocityUNet([1, 8, 8], channels=[8, 16], time_dim=16)
    torch.nn.init.normal_(net.out[-1].weight)
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(net(x, torch.zeros(2)), net(x, torch.ones(2)))
    assert not torch.allclose(net(x, torch.zeros(2)), net(x + 1, torch.zeros(2)))


def test_mlp_flattens_images_and_restores_their_shape():
    net = VelocityMLP([1, 8, 8], hidden_dim=32, depth=2, time_dim=16)
    x = torch.randn(5, 1, 8, 8)
    assert net(x, torch.rand(5)).shape == (5, 1, 8, 8)
    assert not torch.allclose(net(x, torch.zeros(5)), net(x, torch.ones(5)))


def test_shape_errors_name_what_was_expected():
    with pytest.raises(ValueError, match=r"images of 28x28 cannot be halved 3 times"):
        VelocityUNet([1, 28, 28], channels=[8, 16, 32, 64])
    with pytest.raises(ValueError, match=r"the U-Net takes images \[C, H, W\]; samples have shape \[2\]"):
        build_velocity_network("unet", [2], 64, 2, [8], 16)
    with pytest.raises(ValueError, match=r"expected x \[B, 2\] and t \[B\], got x \(4, 3\)"):
        VelocityMLP([2])(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="network must be 'mlp' or 'unet'"):
        build_velocity_network("transformer", [2], 64, 2, [8], 16)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_bf16_weights_take_bf16_inputs_and_times_keep_fp32_angles(kind):
    """Under ``bf16-true`` the module, its inputs and the times are bf16: no dtype error, and the time
    features are computed in fp32 (a bf16 frequency table would move the angles by radians)."""
    torch.manual_seed(0)
    net = build_velocity_network(kind, [1, 8, 8], hidden_dim=16, depth=1, channels=[8, 16], time_dim=8)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    reference = net.time(t)
    net = net.to(torch.bfloat16)
    out = net(x.bfloat16(), t.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.isfinite(out.float()).all()
    assert net.time(t).dtype == torch.bfloat16
    assert torch.allclose(net.time(t).float(), reference, atol=0.05)


def test_checkpoints_with_the_old_frequency_table_still_load():
    net = VelocityMLP([2], hidden_dim=8, depth=1, time_dim=4)
    state = net.state_dict() | {"time.frequencies": torch.ones(2)}
    net.load_state_dict(state)  # strict: the constant table is dropped, nothing else is unexpected
