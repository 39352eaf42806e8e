"""Fixed-point solvers: fixed points against closed forms, stats, failure modes."""
import pytest
import torch

from leastcontrol.errors import ConfigError, LeastControlError, SolverDivergedError
from leastcontrol.solvers import Anderson, Broyden, Euler, get_solver

F64 = torch.float64


def linear_problem(B=3, n=6, seed=0, gain=0.6):
    """ds/dt = A s + b with A = −I + gain·M/‖M‖: contractive, fixed point −A⁻¹ b."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=F64)
    M = M + M.T  # symmetric: the Euler contraction rate is exactly `gain`
    A = -torch.eye(n, dtype=F64) + gain * M / torch.linalg.matrix_norm(M, 2)
    b = torch.randn(B, n, generator=g, dtype=F64)
    s_star = -torch.linalg.solve(A, b.T).T
    return (lambda s: {"s": s["s"] @ A.T + b}), {"s": torch.zeros(B, n, dtype=F64)}, s_star


@pytest.mark.parametrize("solver_cls", [Euler, Anderson, Broyden])
def test_reaches_closed_form_fixed_point(solver_cls):
    field, s0, s_star = linear_problem()
    res = solver_cls(dt=1.0, tol=1e-12, max_iter=2000).solve(field, s0)
    assert res.stats.converged and res.stats.converged_fraction == 1.0
    assert res.stats.residual < 1e-12 and res.stats.iterations < 2000
    assert res.stats.trace[-1] == res.stats.residual
    assert torch.allclose(res.state["s"], s_star, atol=1e-10)


@pytest.mark.parametrize("solver_cls", [Anderson, Broyden])
def test_acceleration_needs_fewer_iterations_than_euler(solver_cls):
    field, s0, s_star = linear_problem(n=20, gain=0.95)
    euler = Euler(tol=1e-10, max_iter=5000).solve(field, s0)
    fast = solver_cls(tol=1e-10, max_iter=5000).solve(field, s0)
    assert fast.stats.converged and fast.stats.iterations < euler.stats.iterations / 2
    assert torch.allclose(fast.state["s"], s_star, atol=1e-8)


@pytest.mark.parametrize("solver_cls", [Euler, Anderson, Broyden])
def test_tuple_and_tensor_states(solver_cls):
    solver = solver_cls(dt=0.5, tol=1e-12, max_iter=1000)
    target = torch.tensor([[1.0], [2.0]], dtype=F64)
    res = solver.solve(lambda s: target - s, torch.zeros(2, 1, dtype=F64))
    assert torch.allclose(res.state, target, atol=1e-10)
    res = solver.solve(lambda s: (target - s[0], 2 * s[0] - s[1]),
                       (torch.zeros(2, 1, dtype=F64), torch.zeros(2, 3, dtype=F64)))
    assert isinstance(res.state, tuple)
    assert torch.allclose(res.state[1], 2 * target.expand(2, 3), atol=1e-9)


@pytest.mark.parametrize("solver_cls,runaway", [
    (Euler, lambda r: 3.0 * r),            # grows ×4 per step until it overflows
    (Anderson, lambda r: torch.sqrt(r - 5.0)),  # NaN (Anderson would solve a linear runaway exactly)
    (Broyden, lambda r: torch.sqrt(r - 5.0)),
], ids=["euler", "anderson", "broyden"])
def test_divergence_names_the_population(solver_cls, runaway):
    def field(s):
        return {"stable": -s["stable"], "runaway": runaway(s["runaway"])}

    s0 = {"stable": torch.ones(2, 3), "runaway": torch.ones(2, 2)}
    with pytest.raises(SolverDivergedError, match=r"population 'runaway' became NaN/Inf at step \d+.*smaller dt") as info:
        solver_cls(dt=1.0, tol=1e-8, max_iter=10_000).solve(field, s0)
    assert info.value.population == "runaway" and info.value.step >= 1


def test_unconverged_solve_is_reported_or_raised():
    field, s0, _ = linear_problem()
    res = Euler(tol=1e-12, max_iter=3).solve(field, s0)
    assert not res.stats.converged and res.stats.iterations == 3
    with pytest.raises(LeastControlError, match="did not converge.*max_iter"):
        Euler(tol=1e-12, max_iter=3, require_convergence=True).solve(field, s0)


def test_check_every_gives_same_fixed_point():
    field, s0, s_star = linear_problem()
    res = Euler(tol=1e-12, max_iter=2000, check_every=7).solve(field, s0)
    assert res.stats.converged and res.stats.iterations % 7 == 0
    assert torch.allclose(res.state["s"], s_star, atol=1e-10)


def test_anderson_survives_singular_least_squares():
    """A 1-D linear map makes every past residual collinear: the mixing system is singular."""
    target = torch.tensor([[3.0], [0.0]], dtype=F64)  # the second sample starts at its fixed point
    res = Anderson(dt=0.5, tol=1e-12, max_iter=500, memory=4, reg=0.0).solve(
        lambda s: target - s, torch.zeros(2, 1, dtype=F64))
    assert torch.isfinite(res.state).all()
    assert torch.allclose(res.state, target, atol=1e-9)
    assert res.stats.converged


def test_broyden_survives_degenerate_secant_updates():
    """A field that is constant for one sample gives Δg = 0: the secant update is skipped, not divided by 0."""
    target = torch.tensor([[3.0], [0.0]], dtype=F64)
    res = Broyden(dt=0.5, tol=1e-12, max_iter=200, memory=3).solve(
        lambda s: torch.cat([target[:1] - s[:1], torch.ones_like(s[1:])]), torch.zeros(2, 1, dtype=F64))
    assert torch.isfinite(res.state).all() and res.stats.fallbacks > 0
    assert torch.allclose(res.state[0], target[0], atol=1e-9)


def test_bad_settings_fail_at_construction():
    with pytest.raises(ConfigError, match="dt"):
        Euler(dt=0)
    with pytest.raises(ConfigError, match="max_iter"):
        Anderson(max_iter=0)
    with pytest.raises(ConfigError, match="memory"):
        Anderson(memory=0)
    with pytest.raises(ConfigError, match="memory"):
        Broyden(memory=0)
    with pytest.raises(ValueError, match="anderson, broyden, euler"):
        get_solver("newton")
