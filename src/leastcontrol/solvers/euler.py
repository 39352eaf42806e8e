"""Forward Euler: ``s_{t+1} = s_t + dt·g(s_t)``, the dynamics themselves."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Solver, register_solver
from .field import relative_residual


def euler_steps(fn, z, context, dt: float, n: int, groups):
    """``n`` Euler steps from ``z``; ``(z_n, residual of the last step dt·‖g‖/‖z_{n−1}‖)``.

    A pure function of its arguments, so a backend can compile it: the ``check_every`` steps
    between two checks and the residual read at the check become one graph.
    """
    for _ in range(n - 1):
        z = z.add(fn(z, context), alpha=dt)
    g = fn(z, context)
    return z.add(g, alpha=dt), dt * relative_residual(g, z, groups)


@register_solver("euler")
@dataclass(repr=False)
class Euler(Solver):
    """Forward-Euler iteration ``s_{t+1} = s_t + dt·g(s_t)``: the system's own dynamics, so it settles
    where the system settles. Every backend runs it (its steps are what a C kernel implements).

    >>> import torch
    >>> res = Euler(dt=0.5, tol=1e-10, max_steps=200).solve(lambda s: {"x": 1 - s["x"]}, {"x": torch.zeros(2, 1)})
    >>> res.stats.converged, round(float(res.state["x"][0]), 6)
    (True, 1.0)
    """

    plain_euler_steps = True
    compilable = True

    def step(self, fn, z, context, carry, t, groups):
        z, res = euler_steps(fn, z, context, self.dt, 1, groups)
        return z, res, carry

    def advance(self, fn, z, context, carry, n, step, groups, run):
        z, res = run(euler_steps, fn, z, context, self.dt, n, groups)
        return z, res, carry
