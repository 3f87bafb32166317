"""Fixed-step ODE samplers for flow-matching velocity fields, and statistics of their paths.

Generation integrates ``dx/dt = v(x, t)`` from ``t = 0`` (source noise ``x0``) to ``t = 1``
(data) on the linear path ``x_t = (1 - t) x0 + t x1`` (Lipman et al., ICLR 2023, "Flow Matching
for Generative Modeling"; Liu et al., ICLR 2023, "Flow Straight and Fast"). Samplers are compared
at equal cost, so ``integrate`` takes a number of function evaluations (NFE), not of steps.

Shapes: ``x`` is ``[B, ...]``; a velocity field is called as ``velocity(x, t)`` with ``t`` a
``[B]`` tensor of the time (same device and dtype as ``x``) and returns ``[B, ...]``.
Gradient mode is the caller's: sample under ``torch.no_grad()`` unless gradients are wanted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange

VelocityField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Step = Callable[[VelocityField, torch.Tensor, float, float], torch.Tensor]

EVALUATIONS_PER_STEP: dict[str, int] = {"euler": 1, "midpoint": 2, "rk4": 4}


def _evaluate(velocity: VelocityField, x: torch.Tensor, time: float) -> torch.Tensor:
    """``velocity(x, t)`` with ``t`` broadcast to ``[B]``, checked to keep the shape of ``x``."""
    t = torch.full((x.shape[0],), time, dtype=x.dtype, device=x.device)
    v = velocity(x, t)
    if v.shape != x.shape:
        raise ValueError(f"velocity(x, t) returned shape {tuple(v.shape)} for x of shape {tuple(x.shape)}; "
                         "a velocity field must return one velocity per coordinate of x")
    return v


def euler_step(velocity: VelocityField, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
    """Explicit Euler: ``x + h v(x, t)`` (Hairer, Nørsett & Wanner, "Solving Ordinary Differential
    Equations I", Sec. II.1); first order, one evaluation."""
    return x + h * _evaluate(velocity, x, t)


def midpoint_step(velocity: VelocityField, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
    """Explicit midpoint rule: ``x + h v(x + h/2 v(x, t), t + h/2)`` (Hairer et al., Sec. II.1);
    second order, two evaluations."""
    half_step = x + (h / 2) * _evaluate(velocity, x, t)
    return x + h * _evaluate(velocity, half_step, t + h / 2)


def rk4_step(velocity: VelocityField, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
    """Classic fourth-order Runge–Kutta (Kutta 1901; Hairer et al., Sec. II.1):
    ``x + h/6 (k1 + 2 k2 + 2 k3 + k4)``; four evaluations."""
    k1 = _evaluate(velocity, x, t)
    k2 = _evaluate(velocity, x + (h / 2) * k1, t + h / 2)
    k3 = _evaluate(velocity, x + (h / 2) * k2, t + h / 2)
    k4 = _evaluate(velocity, x + h * k3, t + h)
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


STEPS: dict[str, Step] = {"euler": euler_step, "midpoint": midpoint_step, "rk4": rk4_step}


def _check_start(x0: torch.Tensor) -> None:
    if x0.dim() < 1 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating-point tensor [B, ...] with a batch axis; "
                         f"got dtype {x0.dtype} and shape {tuple(x0.shape)}")


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got steps={steps}")


def steps_for(nfe: int, solver: str) -> int:
    """Number of equal steps that spends exactly ``nfe`` function evaluations with ``solver``."""
    if solver not in EVALUATIONS_PER_STEP:
        raise ValueError(f"unknown solver {solver!r}; known solvers: {sorted(EVALUATIONS_PER_STEP)}")
    if nfe < 1:
        raise ValueError(f"nfe must be at least 1; got nfe={nfe}")
    per_step = EVALUATIONS_PER_STEP[solver]
    if nfe % per_step:
        raise ValueError(f"solver {solver!r} takes {per_step} function evaluations per step; "
                         f"nfe={nfe} is not a multiple of {per_step}")
    return nfe // per_step


def integrate(velocity: VelocityField, x0: torch.Tensor, nfe: int, solver: str = "euler") -> torch.Tensor:
    """Integrate ``dx/dt = v(x, t)`` from ``t = 0`` to ``t = 1`` starting at ``x0``; returns ``x(1)``.

    Uses ``nfe // EVALUATIONS_PER_STEP[solver]`` equal steps, so exactly ``nfe`` calls to
    ``velocity`` are made: the flow-matching sampler of Lipman et al. (ICLR 2023) with
    the Euler, explicit midpoint or classic RK4 scheme (see ``euler_step``, ``midpoint_step``,
    ``rk4_step``).
    """
    steps = steps_for(nfe, solver)
    _check_start(x0)
    step, h = STEPS[solver], 1.0 / steps
    x = x0
    for k in range(steps):
        # k / steps rather than a running sum of h keeps the last step ending at t = 1.
        x = step(velocity, x, k / steps, h)
    return x


def euler_path(velocity: VelocityField, x0: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Euler trajectory ``x_{k+1} = x_k + v(x_k, t_k) / steps`` at ``t_k = k / steps``.

    Returns the path ``[steps + 1, B, ...]`` (``x_0 = x0`` ... ``x_steps``) and the velocities
    ``[steps, B, ...]`` that were used for each step.
    """
    _check_steps(steps)
    _check_start(x0)
    path, velocities = [x0], []
    for k in range(steps):
        velocities.append(_evaluate(velocity, path[-1], k / steps))
        path.append(path[-1] + velocities[-1] / steps)
    return torch.stack(path), torch.stack(velocities)


def path_statistics(velocity: VelocityField, x0: torch.Tensor, steps: int,
                    eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """How straight the sampling paths are, measured along the Euler path of ``steps`` steps.

    * ``straightness``: Liu et al. (ICLR 2023, "Flow Straight and Fast: ... Rectified Flow"),
      ``S = int_0^1 E ||(Z_1 - Z_0) - v(Z_t, t)||^2 dt``, estimated as the mean over the
      steps ``k`` and the samples of ``||(x_end - x_0) - v_k||^2`` (squared Euclidean norm over all
      non-batch axes), with ``x_end`` the path's last point. It is 0 for a constant field, and
      with ``steps = 1`` it is 0 by construction (``x_end - x_0 = v_0``), so use several steps.
    * ``path_length_ratio``: the mean over samples of the path's length (sum of the Euclidean
      lengths of its segments) over the distance ``||x_end - x_0||`` (clamped below by ``eps``):
      1 for a straight path, above 1 for a bent one (up to rounding), 0 if a sample never moves.
    """
    path, velocities = euler_path(velocity, x0, steps)
    path = rearrange(path, "k b ... -> k b (...)")
    velocities = rearrange(velocities, "k b ... -> k b (...)")
    displacement = path[-1] - path[0]
    straightness = (displacement - velocities).square().sum(dim=-1).mean()
    length = (path[1:] - path[:-1]).norm(dim=-1).sum(dim=0)
    path_length_ratio = (length / displacement.norm(dim=-1).clamp_min(eps)).mean()
    return {"straightness": straightness, "path_length_ratio": path_length_ratio}
