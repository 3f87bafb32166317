"""ODE samplers: hand values on linear and time-dependent fields, order of accuracy, exact NFE,
and the straightness statistics of Euler paths."""

from __future__ import annotations

import math

import pytest
import torch

from modules.ode import EVALUATIONS_PER_STEP, euler_path, integrate, path_statistics

SOLVERS = sorted(EVALUATIONS_PER_STEP)


def start() -> torch.Tensor:
    # Powers of two keep the hand values exact in float64.
    return torch.tensor([[1.0, -2.0], [0.5, 4.0], [-0.25, 8.0]], dtype=torch.float64)


def identity_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x.clone()


def time_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *[1] * (x.dim() - 1)).expand_as(x).clone()


def rotation_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.stack([-x[:, 1], x[:, 0]], dim=1)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("nfe", [4, 12])
def test_a_constant_field_lands_on_x0_plus_c(solver, nfe):
    c = torch.tensor([0.75, -3.0], dtype=torch.float64)
    x0 = start()
    end = integrate(lambda x, t: c.expand_as(x), x0, nfe=nfe, solver=solver)
    torch.testing.assert_close(end, x0 + c, rtol=0, atol=1e-12)


def test_one_step_on_dx_dt_equals_x_by_hand():
    x0 = start()
    # Euler, h = 1: x0 + x0.
    assert torch.equal(integrate(identity_field, x0, nfe=1, solver="euler"), 2 * x0)
    # Midpoint, h = 1: x0 + (x0 + x0 / 2) = 2.5 x0.
    assert torch.equal(integrate(identity_field, x0, nfe=2, solver="midpoint"), 2.5 * x0)
    # RK4, h = 1: k = x0, 1.5 x0, 1.75 x0, 2.75 x0; x0 (1 + (1 + 3 + 3.5 + 2.75) / 6), the Taylor
    # series of e to fourth order: 1 + 1 + 1/2 + 1/6 + 1/24.
    torch.testing.assert_close(integrate(identity_field, x0, nfe=4, solver="rk4"),
                               x0 * (1 + 1 + 1 / 2 + 1 / 6 + 1 / 24), rtol=1e-15, atol=0)


def test_error_falls_with_the_order_at_equal_nfe():
    x0 = start()
    errors = {solver: (integrate(identity_field, x0, nfe=8, solver=solver) - x0 * math.e).abs().max().item()
              for solver in SOLVERS}
    # (1 + 1/8)^8, (1 + 1/4 + 1/32)^4 and (1 + 1/2 + 1/8 + 1/48 + 1/384)^2 against e, times |x0| <= 8.
    assert errors["rk4"] < errors["midpoint"] < errors["euler"]
    assert errors["euler"] == pytest.approx(8 * (math.e - (9 / 8) ** 8), rel=1e-9)
    assert errors["rk4"] < 1e-2 < errors["midpoint"]


@pytest.mark.parametrize("solver", ["midpoint", "rk4"])
def test_dx_dt_equals_t_is_exact_for_midpoint_and_rk4(solver):
    x0 = start()
    torch.testing.assert_close(integrate(time_field, x0, nfe=8, solver=solver), x0 + 0.5, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_euler_on_dx_dt_equals_t_misses_by_a_riemann_sum(steps):
    # Left Riemann sum of t over n steps: sum_k (k / n) / n = (n - 1) / (2 n).
    x0 = start()
    torch.testing.assert_close(integrate(time_field, x0, nfe=steps, solver="euler"),
                               x0 + (steps - 1) / (2 * steps), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_the_number_of_evaluations_is_exactly_nfe(solver):
    calls, times = [], []

    def counting_field(x, t):
        calls.append(1)
        times.append(t)
        return -x

    x0 = start().float()
    integrate(counting_field, x0, nfe=12, solver=solver)
    assert len(calls) == 12
    assert all(t.shape == (3,) and t.dtype == x0.dtype for t in times)
    assert min(t.min().item() for t in times) == 0.0 and max(t.max().item() for t in times) <= 1.0


def test_bad_solver_and_nfe_are_explained():
    x0 = start()
    with pytest.raises(ValueError, match="unknown solver 'heun'.*euler.*midpoint.*rk4"):
        integrate(identity_field, x0, nfe=4, solver="heun")
    with pytest.raises(ValueError, match="nfe must be at least 1; got nfe=0"):
        integrate(identity_field, x0, nfe=0)
    with pytest.raises(ValueError, match="solver 'rk4' takes 4 function evaluations per step; "
                                         "nfe=6 is not a multiple of 4"):
        integrate(identity_field, x0, nfe=6, solver="rk4")
    with pytest.raises(ValueError, match=r"returned shape \(3,\) for x of shape \(3, 2\)"):
        integrate(lambda x, t: t, x0, nfe=1)


def test_euler_path_shapes_and_times():
    x0 = torch.zeros(4, 2, 3)
    path, velocities = euler_path(time_field, x0, steps=4)
    assert path.shape == (5, 4, 2, 3) and velocities.shape == (4, 4, 2, 3)
    assert torch.equal(path[0], x0)
    torch.testing.assert_close(velocities[:, 0, 0, 0], torch.tensor([0.0, 0.25, 0.5, 0.75]))
    torch.testing.assert_close(path[-1], integrate(time_field, x0, nfe=4))


def test_a_constant_field_is_straight():
    x0 = torch.randn(16, 3, 2, generator=torch.Generator().manual_seed(0))
    stats = path_statistics(lambda x, t: torch.full_like(x, 0.3), x0, steps=10)
    assert stats["straightness"].abs().item() < 1e-6
    assert stats["path_length_ratio"].item() == pytest.approx(1.0, abs=1e-5)


def test_a_rotating_field_is_bent():
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    stats = path_statistics(rotation_field, x0, steps=20)
    assert stats["straightness"].item() > 0.1
    # One radian of turning: the arc is ~4% longer than its chord (1 / (2 sin(1/2)) = 1.043).
    assert 1.02 < stats["path_length_ratio"].item() < 1.1


def test_two_euler_steps_of_a_turning_field_by_hand():
    # v(x, t) = (1 - 2t, 2t): v = (1, 0) at t = 0 and (0, 1) at t = 1/2. From the origin with h = 1/2:
    # x_1 = (0.5, 0), x_2 = (0.5, 0.5), so x_end - x_0 = (0.5, 0.5).
    # Straightness: ||(0.5, 0.5) - (1, 0)||^2 = 0.5 and ||(0.5, 0.5) - (0, 1)||^2 = 0.5; mean 0.5.
    # Path length 0.5 + 0.5 = 1 over the chord sqrt(0.5): ratio sqrt(2).
    def turning_field(x, t):
        return torch.stack([1 - 2 * t, 2 * t], dim=1)

    stats = path_statistics(turning_field, torch.zeros(2, 2, dtype=torch.float64), steps=2)
    assert stats["straightness"].item() == pytest.approx(0.5, abs=1e-12)
    assert stats["path_length_ratio"].item() == pytest.approx(math.sqrt(2), abs=1e-12)


def test_one_step_is_straight_by_construction():
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stats = path_statistics(rotation_field, x0, steps=1)
    assert stats["straightness"].item() == pytest.approx(0.0, abs=1e-12)
    assert stats["path_length_ratio"].item() == pytest.approx(1.0, abs=1e-12)


def test_path_statistics_rejects_zero_steps():
    with pytest.raises(ValueError, match="steps must be at least 1; got steps=0"):
        path_statistics(rotation_field, torch.zeros(2, 2), steps=0)
