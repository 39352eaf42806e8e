"""Fixed-point solvers: fixed points against closed forms, stats, failure modes."""
import math

import pytest
import torch

from leastcontrol.errors import ConfigError, SolverDivergedError, UnstableEquilibriumWarning
from leastcontrol.solvers import Anderson, Broyden, CheckMix, Euler, Status, euler_map_radius, get_solver

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
    res = solver_cls(dt=1.0, tol=1e-12, max_steps=2000, check_every=1).solve(field, s0)
    assert res.stats.converged and res.stats.converged_fraction == 1.0
    assert res.stats.residual < 1e-12 and res.stats.steps < 2000
    assert res.stats.trace[-1] == res.stats.residual
    assert torch.allclose(res.state["s"], s_star, atol=1e-10)


@pytest.mark.parametrize("solver_cls", [Anderson, Broyden])
def test_acceleration_needs_fewer_iterations_than_euler(solver_cls):
    field, s0, s_star = linear_problem(n=20, gain=0.95)
    euler = Euler(tol=1e-10, max_steps=5000, check_every=1).solve(field, s0)
    fast = solver_cls(tol=1e-10, max_steps=5000, check_every=1).solve(field, s0)
    assert fast.stats.converged and fast.stats.steps < euler.stats.steps / 2
    assert torch.allclose(fast.state["s"], s_star, atol=1e-8)


@pytest.mark.parametrize("solver_cls", [Euler, Anderson, Broyden])
def test_tuple_and_tensor_states(solver_cls):
    solver = solver_cls(dt=0.5, tol=1e-12, max_steps=1000)
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
        solver_cls(dt=1.0, tol=1e-8, max_steps=10_000, check_every=1).solve(field, s0)
    assert info.value.population == "runaway" and info.value.step >= 1


def test_unconverged_solve_is_reported_in_each_samples_status():
    field, s0, _ = linear_problem()
    res = Euler(tol=1e-12, max_steps=3, check_every=1).solve(field, s0)
    assert not res.stats.converged and res.stats.steps == 3
    assert res.stats.status.tolist() == [Status.MAX_STEPS] * 3 and res.stats.fraction(Status.MAX_STEPS) == 1.0


def test_check_every_gives_same_fixed_point():
    field, s0, s_star = linear_problem()
    res = Euler(tol=1e-12, max_steps=2000, check_every=7).solve(field, s0)
    assert res.stats.converged and res.stats.steps % 7 == 0
    assert torch.allclose(res.state["s"], s_star, atol=1e-10)


def test_anderson_survives_singular_least_squares():
    """A 1-D linear map makes every past residual collinear: the mixing system is singular."""
    target = torch.tensor([[3.0], [0.0]], dtype=F64)  # the second sample starts at its fixed point
    res = Anderson(dt=0.5, tol=1e-12, max_steps=500, memory=4, reg=0.0, check_every=1).solve(
        lambda s: target - s, torch.zeros(2, 1, dtype=F64))
    assert torch.isfinite(res.state).all()
    assert torch.allclose(res.state, target, atol=1e-9)
    assert res.stats.converged


def test_broyden_survives_degenerate_secant_updates():
    """A field that is constant for one sample gives Δg = 0: the secant update is skipped, not divided by 0."""
    target = torch.tensor([[3.0], [0.0]], dtype=F64)
    res = Broyden(dt=0.5, tol=1e-12, max_steps=200, memory=3, check_every=1).solve(
        lambda s: torch.cat([target[:1] - s[:1], torch.ones_like(s[1:])]), torch.zeros(2, 1, dtype=F64))
    assert torch.isfinite(res.state).all() and res.stats.counters["fallbacks"] > 0
    assert torch.allclose(res.state[0], target[0], atol=1e-9)


def test_bad_settings_fail_at_construction():
    with pytest.raises(ConfigError, match="dt"):
        Euler(dt=0)
    with pytest.raises(ConfigError, match="max_steps"):
        Anderson(max_steps=0)
    with pytest.raises(ConfigError, match="memory"):
        Anderson(memory=0)
    with pytest.raises(ConfigError, match="memory"):
        Broyden(memory=0)
    with pytest.raises(ValueError, match="anderson, broyden, euler"):
        get_solver("newton")
    with pytest.raises(ConfigError, match="patience"):
        Euler(patience=0)
    with pytest.raises(ConfigError, match="stall_tol"):
        Anderson(patience=5, stall_tol=-1.0)


def chattering_problem(B=4, c=1e-3):
    """ȧ = 1 − a (settles at 1) and ḃ = −c·sign(b): a kink that forward Euler with dt = 1
    cannot settle. ``b`` ends up flipping between ±c/2, so the relative residual sits at a
    floor of about c, however many steps are taken."""
    field = lambda s: {"a": 1.0 - s["a"], "b": -c * torch.sign(s["b"])}
    start = {"a": torch.zeros(B, 1, dtype=F64),
             "b": torch.linspace(0.01, 0.02, B, dtype=F64)[:, None] + c / 3}
    context = {"index": torch.arange(B)}  # batch-aligned data: lets samples freeze one by one
    return (lambda s, ctx: field(s)), start, context


def _scalar_euler_stop(rate, tol, check_every, max_steps):
    """One sample of ``ds/dt = (1 − rate)(1 − s)`` from 0 under Euler (dt 1), by hand: the first
    check whose residual ``|g(s_{n−1})| / |s_{n−1}|`` is below ``tol`` (or max_steps): (step, residual, s)."""
    s = 0.0
    for step in range(1, max_steps + 1):
        g = (1 - rate) * (1 - s)
        res = abs(g) / max(abs(s), 1e-30)
        s = s + g
        if (step % check_every == 0 or step == max_steps) and (res < tol or step == max_steps):
            return step, res, s


def test_freezing_records_each_samples_own_stop_also_at_max_steps():
    """Samples settling at different rates stop at their own checks; one stops at the very last
    check (max_steps) and one never settles: each sample's steps, residual and state against a
    scalar transcription of the iteration."""
    rates = torch.tensor([0.5, 0.8, 0.97], dtype=F64)
    tol, every = 1e-6, 5
    max_steps = _scalar_euler_stop(0.8, tol, every, 10_000)[0]   # the second sample settles at the last check
    field = lambda s, ctx: {"s": (1 - rates[ctx["index"]])[:, None] * (1 - s["s"])}  # noqa: E731
    res = Euler(tol=tol, max_steps=max_steps, check_every=every).solve(
        field, {"s": torch.zeros(3, 1, dtype=F64)}, {"index": torch.arange(3)})
    expected = [_scalar_euler_stop(float(r), tol, every, max_steps) for r in rates]
    assert expected[1][0] == max_steps and expected[2][1] > tol and expected[0][0] < max_steps
    assert res.stats.sample_steps.tolist() == [e[0] for e in expected]
    assert torch.allclose(res.stats.sample_residual, torch.tensor([e[1] for e in expected], dtype=F64), rtol=1e-9)
    assert torch.allclose(res.state["s"][:, 0], torch.tensor([e[2] for e in expected], dtype=F64), rtol=1e-12)
    assert res.stats.converged_fraction == pytest.approx(2 / 3) and not res.stats.converged


@pytest.mark.parametrize("freeze", [True, False])
def test_stall_rule_stops_dynamics_that_chatter_at_a_floor(freeze):
    field, s0, ctx = chattering_problem()
    plain = Euler(tol=1e-8, max_steps=400, freeze=freeze, check_every=1).solve(field, s0, ctx)
    # Without the rule every step up to max_steps is paid for, at the same floor.
    assert plain.stats.steps == 400 and not plain.stats.converged
    assert 5e-4 < plain.stats.residual < 2e-3 and plain.stats.stalled_fraction == 0.0
    ruled = Euler(tol=1e-8, max_steps=400, freeze=freeze, patience=30, check_every=1).solve(field, s0, ctx)
    # b reaches its kink after ≤ 30 steps; a has settled to 1e-8 after ~20 more; then 30 steps
    # without a 10 % fall stop each sample (checks every step here).
    assert ruled.stats.steps < 150
    assert not ruled.stats.converged and ruled.stats.stalled_fraction == 1.0
    assert ruled.stats.residual < 2e-3
    assert torch.allclose(ruled.state["a"], torch.ones_like(ruled.state["a"]), atol=1e-6)
    assert ruled.state["b"].abs().max() <= 1e-3
    # A stall tolerance below the floor keeps the rule from accepting it.
    strict = Euler(tol=1e-8, max_steps=400, freeze=freeze, patience=30, stall_tol=1e-4, check_every=1).solve(field, s0, ctx)
    assert strict.stats.steps == 400 and strict.stats.stalled_fraction == 0.0


@pytest.mark.parametrize("solver_cls", [Euler, Anderson, Broyden])
def test_stall_rule_leaves_a_converging_solve_unchanged(solver_cls):
    # The residual falls by far more than 10 % every 10 steps, so no sample ever stalls.
    field, s0, s_star = linear_problem(gain=0.6)
    plain = solver_cls(tol=1e-12, max_steps=2000, check_every=1).solve(field, s0)
    ruled = solver_cls(tol=1e-12, max_steps=2000, patience=10, check_every=1).solve(field, s0)
    assert ruled.stats.converged and ruled.stats.stalled_fraction == 0.0
    assert ruled.stats.steps == plain.stats.steps
    assert torch.equal(ruled.state["s"], plain.state["s"])


def test_group_residual_waits_for_a_small_group_that_is_still_moving():
    # z = [a | b]: `a` is large and already at its fixed point, `b` starts at 0 and relaxes to 1
    # as b_t = 1 − (1 − dt)^t. One residual over the whole buffer is ~‖ḃ‖/‖a‖ and passes tol at
    # once; each group's own residual only passes once b itself has settled.
    target = torch.tensor([[1000.0, 1.0]], dtype=torch.float64)
    z0 = torch.tensor([[1000.0, 0.0]], dtype=torch.float64)
    joint = Euler(dt=0.5, tol=1e-2, max_steps=200, check_every=1).solve(lambda z: target - z, z0)
    grouped = Euler(dt=0.5, tol=1e-2, max_steps=200, check_every=1).solve(lambda z: target - z, z0, groups=(1, 1))
    assert joint.stats.steps == 1 and joint.state[0, 1] == pytest.approx(0.5)
    # Per-group residual at step t (before the step): dt·(1−dt)^(t−1) / (1 − (1−dt)^(t−1)) < 1e-2.
    t = next(t for t in range(2, 200) if 0.5 * 0.5 ** (t - 1) / (1 - 0.5 ** (t - 1)) < 1e-2)
    assert grouped.stats.steps == t
    assert grouped.state[0, 1] == pytest.approx(1 - 0.5 ** t)


@pytest.mark.parametrize("solver_cls", [Euler, Anderson, Broyden])
def test_entry_groups_judge_each_population_of_a_dict_state_alone(solver_cls):
    # The problem above as a dict state {a, b}: groups="populations" must give each entry its own
    # residual, i.e. the same solve as widths (1, 1) over the packed buffer, and not the joint one.
    target = torch.tensor([[1000.0, 1.0]], dtype=torch.float64)
    flat = solver_cls(dt=0.5, tol=1e-2, max_steps=200, check_every=1).solve(lambda z: target - z,
                                                             torch.tensor([[1000.0, 0.0]], dtype=torch.float64), groups=(1, 1))
    joint_field = lambda s: {"a": target[:, :1] - s["a"], "b": target[:, 1:] - s["b"]}
    s0 = {"a": torch.full((1, 1), 1000.0, dtype=torch.float64), "b": torch.zeros(1, 1, dtype=torch.float64)}
    entries = solver_cls(dt=0.5, tol=1e-2, max_steps=200, check_every=1).solve(joint_field, s0, groups="populations")
    joint = solver_cls(dt=0.5, tol=1e-2, max_steps=200, check_every=1).solve(joint_field, s0)
    assert entries.stats.steps == flat.stats.steps
    assert float(entries.state["b"]) == pytest.approx(float(flat.state[0, 1]), rel=1e-12)
    # Joint: ‖ḃ‖/‖[a | b]‖ ≈ 1e-3 passes tol at the first check, with b far from 1.
    assert joint.stats.steps == 1 and abs(float(joint.state["b"]) - 1.0) >= 0.5
    assert abs(float(entries.state["b"]) - 1.0) < 2e-2


def test_groups_are_validated():
    z0 = torch.zeros(2, 4)
    for bad in ((3, 0), "keys"):
        with pytest.raises(ConfigError, match="groups"):
            Euler(check_every=1).solve(lambda z: -z, z0, groups=bad)
    for solver in (Euler(), Anderson()):
        with pytest.raises(ConfigError, match=r"groups \(1, 2\) must split the state's 4 columns"):
            solver.solve(lambda z: -z, z0, groups=(1, 2))
    # Widths over the packed entries of a dict state: (2, 2) splits {a, b} of width 4 each? No: 8 columns.
    with pytest.raises(ConfigError, match="8 columns"):
        Euler(check_every=1).solve(lambda s: {k: -v for k, v in s.items()}, {"a": z0, "b": z0}, groups=(2, 2))


def circling_problem(B=2, modulus=1.005, seed=0):
    """ds/dt = A s + b whose Euler map I + A has the eigenvalues ``modulus·e^{±0.13i}`` (just outside
    the unit circle) and three decaying ones: stable in continuous time, yet Euler iterates spiral
    away from the fixed point −A⁻¹b instead of reaching it (the LCP-DI controlled dynamics of an
    oscillating sample). Two groups of very different scale: widths (3, 2), magnitudes 1e3 and 1e-3.
    """
    g = torch.Generator().manual_seed(seed)
    th = 0.13
    T = torch.zeros(5, 5, dtype=F64)
    T[:2, :2] = modulus * torch.tensor([[torch.cos(torch.tensor(th)), -torch.sin(torch.tensor(th))],
                                        [torch.sin(torch.tensor(th)), torch.cos(torch.tensor(th))]], dtype=F64)
    T[2:, 2:] = torch.diag(torch.tensor([0.5, 0.3, 0.7], dtype=F64))
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=F64))
    scale = torch.diag(torch.tensor([1e3, 1e3, 1e3, 1e-3, 1e-3], dtype=F64))
    A = scale @ Q @ (T - torch.eye(5, dtype=F64)) @ Q.T @ torch.linalg.inv(scale)
    b = torch.randn(B, 5, generator=g, dtype=F64) @ scale
    s_star = -torch.linalg.solve(A, b.T).T
    return (lambda z: z @ A.T + b), torch.zeros(B, 5, dtype=F64), s_star


def test_anderson_after_an_euler_warmup_finds_the_fixed_point_euler_circles():
    field, z0, s_star = circling_problem()
    euler = Euler(tol=1e-8, max_steps=3000, check_every=1).solve(field, z0, groups=(3, 2))
    assert not euler.stats.converged
    for warmup in (0, 50):
        res = Anderson(tol=1e-10, max_steps=400, warmup=warmup, start_below=float("inf"),
                       memory=6, check_every=1).solve(field, z0, groups=(3, 2))
        assert res.stats.converged, warmup
        # Each group to its own scale: the 1e-3 group is not lost beside the 1e3 one.
        for part, ref in zip(res.state.split([3, 2], 1), s_star.split([3, 2], 1)):
            assert float((part - ref).norm() / ref.norm()) < 1e-8
        assert res.stats.steps < warmup + 100


def test_anderson_warmup_takes_plain_euler_steps():
    field, s0, _ = linear_problem(gain=0.9)
    for k in (1, 7, 20):
        euler = Euler(tol=0.0, max_steps=k, freeze=False, check_every=1).solve(field, s0)
        # The returned (best) iterate is the last one whose residual was measured: the state before step k.
        aa = Anderson(tol=0.0, max_steps=k + 1, warmup=k + 1, check_every=1).solve(field, s0)
        assert torch.allclose(aa.state["s"], euler.state["s"], atol=1e-13, rtol=0), k
    with pytest.raises(ConfigError, match="warmup"):
        Anderson(warmup=-1)
    with pytest.raises(ConfigError, match="start_below"):
        Anderson(start_below=0.0)


def test_per_sample_steps_and_residuals_are_those_of_each_samples_own_decay():
    """ẋ = −a(x − 1) from 0: Euler gives x_t = 1 − (1 − a)^t, so the residual read after step t is
    a(1 − a)^(t−1) / (1 − (1 − a)^(t−1)); a sample stops at the first check (every 10 steps) below
    tol, and one too slow for max_steps stops there, above tol."""
    rates = torch.tensor([0.5, 0.2, 0.05, 0.001], dtype=F64)
    tol, max_steps, every = 1e-6, 400, 10

    def expected(a):
        for t in range(every, max_steps + 1, every):
            r = a * (1 - a) ** (t - 1) / (1 - (1 - a) ** (t - 1))
            if r < tol:
                break
        return t, r
    res = Euler(tol=tol, max_steps=max_steps, check_every=every).solve(
        lambda s, c: {"x": -c["a"] * (s["x"] - 1)}, {"x": torch.zeros(4, 1, dtype=F64)}, {"a": rates[:, None]})
    steps, residuals = zip(*(expected(float(a)) for a in rates))
    assert res.stats.sample_steps.tolist() == list(steps)
    assert steps[-1] == max_steps and residuals[-1] > tol   # the slow sample ran to the cap
    assert torch.allclose(res.stats.sample_residual, torch.tensor(residuals, dtype=F64), rtol=1e-9)
    assert res.stats.steps == max_steps and res.stats.converged_fraction == 0.75


def test_check_level_anderson_settles_what_plain_euler_circles_and_shortens_slow_solves():
    """Euler with a check-level mix (CheckMix) mixes the runs of check_every steps between checks. On the circling
    field (Euler map modulus 1.005) plain Euler never converges; with the mixing it reaches the
    closed-form fixed point, each group to its own scale. On a slow contractive field (rate 0.97) it
    takes far fewer steps to the same fixed point."""
    field, z0, s_star = circling_problem()
    assert not Euler(tol=1e-8, max_steps=3000, check_every=1).solve(field, z0, groups=(3, 2)).stats.converged
    res = Euler(tol=1e-10, max_steps=1000, check_every=10, mix=CheckMix(memory=4, after=50)).solve(field, z0, groups=(3, 2))
    assert res.stats.converged
    for part, ref in zip(res.state.split([3, 2], 1), s_star.split([3, 2], 1)):
        assert float((part - ref).norm() / ref.norm()) < 1e-8
    field, s0, s_star = linear_problem(n=20, gain=0.97)
    plain = Euler(tol=1e-10, max_steps=5000, check_every=10).solve(field, s0)
    mixed = Euler(tol=1e-10, max_steps=5000, check_every=10, mix=CheckMix(memory=4, after=20)).solve(field, s0)
    assert plain.stats.converged and mixed.stats.converged
    assert mixed.stats.steps < plain.stats.steps / 3
    assert torch.allclose(mixed.state["s"], s_star, atol=1e-8)


def _reference_mixes(runs, widths, memory, reg, restart, restarts):
    """Check-level Anderson, one sample at a time, straight from its definition: the stored runs
    (start x_j, end F_j) since the last restart, the newest ``memory``; α minimises
    ``‖Σ α_j W (F_j − x_j)‖² + reg·scale·‖α‖²`` with ``Σ α_j = 1``, ``W`` weighing each group by
    ``1/‖end_g‖`` and ``scale`` the mean of the stored ``‖W G_j‖²``; the next start is ``Σ α_j F_j``.
    When the residual rises above ``restart`` times the best so far, the next start is the best end
    and the store empties, ``restarts`` times (``None``: always); after that, the next such rise
    makes every later start the plain end."""
    outs = []
    B = runs[0][0].shape[0]
    stored = [dict() for _ in range(B)]
    best = [float("inf")] * B
    best_end = [None] * B
    left = [math.inf if restarts is None else restarts] * B
    for count, (start, end, res) in enumerate(runs):
        out = torch.empty_like(end)
        for b in range(B):
            r = float(res[b])
            blown = left[b] >= 0 and r > restart * best[b]
            if r < best[b]:
                best[b], best_end[b] = r, end[b].clone()
            if blown:
                left[b] -= 1
                out[b], stored[b] = (best_end[b] if left[b] >= 0 else end[b]), {}
                continue
            if left[b] < 0:
                out[b] = end[b]
                continue
            stored[b][count % memory] = (end[b] - start[b], end[b].clone())
            parts = end[b].split(widths)
            w = torch.cat([torch.full((len(p),), 1.0 / float(p.norm()), dtype=F64) for p in parts])
            slots = sorted(stored[b])
            Gw = torch.stack([stored[b][j][0] * w for j in slots])
            gram = Gw @ Gw.T
            gram = gram + reg * float(gram.diagonal().mean()) * torch.eye(len(slots), dtype=F64)
            a = torch.linalg.solve(gram, torch.ones(len(slots), dtype=F64))
            a = a / a.sum()
            out[b] = sum(a_j * stored[b][j][1] for a_j, j in zip(a, slots))
        outs.append(out)
    return outs


@pytest.mark.parametrize("restarts", [None, 0, 1])
def test_check_level_anderson_mix_matches_its_definition(restarts):
    """The mixer's next starts against a per-sample transcription of the method: groups weighed by
    their own norms, a ring of ``memory`` runs, and one sample whose residual jumps twice: back to
    its best point while it has returns left, plain Euler for good after that."""
    from leastcontrol.solvers.mixing import MixMemory, check_mix, group_members
    g = torch.Generator().manual_seed(3)
    B, widths, memory, reg, restart = 3, (4, 3, 2), 2, 1e-8, 10.0
    runs = []
    for step in range(8):
        start = torch.randn(B, sum(widths), generator=g, dtype=F64)
        end = start + 0.1 * torch.randn(B, sum(widths), generator=g, dtype=F64)
        res = torch.rand(B, generator=g, dtype=F64) * 0.1
        res[1] = {3: 50.0, 5: 5e3}.get(step, float(res[1]))   # far above its best, twice
        runs.append((start, end, res))
    for groups in (widths, None):
        member = group_members(groups, sum(widths), "cpu")
        stored = MixMemory.empty(runs[0][0], CheckMix(memory=memory, restarts=restarts), member.shape[1])
        reference = _reference_mixes(runs, widths if groups else (sum(widths),), memory, reg, restart, restarts)
        for step, ((start, end, res), expected) in enumerate(zip(runs, reference)):
            mixed, stored = check_mix(stored, start, end, res, member, reg, restart)
            assert torch.allclose(mixed, expected, rtol=1e-10, atol=1e-12)
            if step >= 1:   # two runs stored: the other samples are mixed
                assert not torch.allclose(mixed[[0, 2]], end[[0, 2]])
            # Sample 1 stops mixing at its first jump with no returns, at its second with one;
            # with no limit it mixes again once two runs are stored after its last return.
            stop = {0: 3, 1: 5}.get(restarts)
            if stop is not None and step >= stop:
                assert torch.equal(mixed[1], end[1])
            if restarts is None and step == 7:
                assert not torch.allclose(mixed[1], end[1])


def test_check_level_anderson_before_its_start_is_plain_euler_and_is_validated():
    field, s0, _ = linear_problem(gain=0.9)
    plain = Euler(tol=0.0, max_steps=60, check_every=10).solve(field, s0)
    late = Euler(tol=0.0, max_steps=60, check_every=10, mix=CheckMix(memory=3, after=60)).solve(field, s0)
    assert torch.equal(plain.state["s"], late.state["s"])
    with pytest.raises(ConfigError, match="mix.memory"):
        CheckMix(memory=-1)
    with pytest.raises(ConfigError, match="mix.after"):
        Euler(mix={"memory": 2, "after": 1.5})
    with pytest.raises(ConfigError, match="mix.restart "):
        CheckMix(restart=1.0)
    with pytest.raises(ConfigError, match="mix.restarts"):
        CheckMix(memory=2, restarts=-1)


@pytest.mark.parametrize("compile", [False, True])
def test_check_level_anderson_on_a_dict_state_weighs_each_entry(compile):
    """The same circling field as a dict of two populations (groups='populations'): packed for the mixing,
    unpacked for the field, each population to its own scale; compiled, packed inside the graph."""
    field, z0, s_star = circling_problem()

    def dict_field(s):
        g = field(torch.cat([s["big"], s["small"]], 1))
        return {"big": g[:, :3], "small": g[:, 3:]}
    res = Euler(tol=1e-10, max_steps=1000, mix=CheckMix(memory=4, after=50),
                backend="compile" if compile else "eager", check_every=1).solve(
        dict_field, {"big": z0[:, :3].clone(), "small": z0[:, 3:].clone()}, groups="populations")
    assert res.stats.converged
    for key, ref in (("big", s_star[:, :3]), ("small", s_star[:, 3:])):
        assert float((res.state[key] - ref).norm() / ref.norm()) < 1e-8


def _matrix_with_eigenvalues(eigenvalues, seed=0):
    """A non-normal real matrix ``V diag(λ) V⁻¹`` (V random), and a real 2×2 block per complex pair."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for lam in eigenvalues:
        if isinstance(lam, complex):
            blocks.append(torch.tensor([[lam.real, -lam.imag], [lam.imag, lam.real]], dtype=F64))
        else:
            blocks.append(torch.tensor([[lam]], dtype=F64))
    D = torch.block_diag(*blocks)
    V = torch.eye(D.shape[0], dtype=F64) + 0.3 * torch.randn(D.shape, generator=g, dtype=F64)
    return V @ D @ torch.linalg.inv(V)


@pytest.mark.parametrize("dt", [1.0, 0.5])
def test_euler_map_radius_is_exact_when_the_krylov_space_is_the_whole_state(dt):
    # g(s) = s Aᵀ: the Euler map's Jacobian is I + dt·A; the oracle is its eigendecomposition.
    A = _matrix_with_eigenvalues([-3.6, -0.1, complex(-0.9, 0.4), 0.15, -1.5])
    oracle = float(torch.linalg.eigvals(torch.eye(6, dtype=F64) + dt * A).abs().max())
    radius = euler_map_radius(lambda s: s @ A.T, torch.randn(3, 6, dtype=F64), dt=dt)
    assert radius.dtype == F64 and radius.shape == (3,)
    assert torch.allclose(radius, torch.full((3,), oracle, dtype=F64), rtol=1e-9)


def test_euler_map_radius_finds_an_unstable_rotation_in_a_large_state():
    # The Euler map of a non-normal 100-dimensional linear field: a lightly growing rotation
    # (modulus 1.05, an unstable spiral) among 98 real eigenvalues of modulus up to 0.9, seen
    # through 30 Jacobian-vector products.
    g = torch.Generator().manual_seed(3)
    rest = (torch.rand(98, generator=g, dtype=F64) * 1.8 - 0.9).tolist()
    J = _matrix_with_eigenvalues([complex(1.05 * 0.8, 1.05 * 0.6)] + rest)
    A = J - torch.eye(100, dtype=F64)
    oracle = float(torch.linalg.eigvals(J).abs().max())
    assert oracle == pytest.approx(1.05, rel=1e-9)
    radius = euler_map_radius(lambda s: s @ A.T, torch.randn(2, 100, dtype=F64))
    assert torch.all((radius - oracle).abs() < 1e-3)


def test_euler_map_radius_is_per_sample():
    # Sample i's field is c_i·A: its Euler map I + c_i·A has its own radius max_j |1 + c_i λ_j|.
    lam = torch.tensor([-0.5, -1.8, -0.05], dtype=F64)
    A = torch.diag(lam)
    c = torch.tensor([0.5, 1.0, 1.5], dtype=F64)
    radius = euler_map_radius(lambda s, ctx: ctx["c"][:, None] * (s @ A.T), torch.randn(3, 3, dtype=F64),
                              {"c": c})
    expected = (1 + c[:, None] * lam[None, :]).abs().amax(1)
    assert torch.allclose(radius, expected, rtol=1e-9)


def test_stability_settings_are_validated():
    with pytest.raises(ConfigError, match="krylov"):
        euler_map_radius(lambda s: -s, torch.ones(1, 2), krylov=0)
    with pytest.raises(ConfigError, match="check_stability"):
        Euler(check_stability="yes")


def test_check_stability_flags_the_unstable_root_that_anderson_finds():
    # g(s) = (s − 2) − (s − 2)³: roots 2 (unstable, Euler map 1 + dt) and 1, 3 (stable, 1 − 2·dt).
    # From 2.05 Anderson's secant steps land on the root at 2; Euler's plain steps leave it for 3.
    field = lambda s: (s - 2) - (s - 2) ** 3
    s0 = torch.tensor([[2.05], [2.8]], dtype=F64)
    accelerated = Anderson(dt=0.5, tol=1e-12, max_steps=200, start_below=float("inf"), check_stability=True)
    with pytest.warns(UnstableEquilibriumWarning, match="1 of 2 samples.*the euler solver"):
        res = accelerated.solve(field, s0)
    assert torch.allclose(res.state[:, 0], torch.tensor([2.0, 3.0], dtype=F64), atol=1e-10)
    assert res.stats.sample_radius[0] == pytest.approx(1.5, rel=1e-9)
    assert res.stats.sample_radius[1] < 1e-6 and res.stats.unstable_fraction == 0.5
    plain = Euler(dt=0.5, tol=1e-12, max_steps=200, check_stability=True, check_every=1).solve(field, s0)
    assert torch.allclose(plain.state[:, 0], torch.tensor([3.0, 3.0], dtype=F64), atol=1e-10)
    assert plain.stats.unstable_fraction == 0.0
    assert Euler(dt=0.5, tol=1e-12, check_every=1).solve(field, s0).stats.sample_radius is None   # off by default


def test_euler_map_radius_of_a_float32_adjoint_field():
    # RBP's adjoint map of a float32 RNN: its output rows are zero, so the Krylov space is
    # exhausted before the state's width and what is left is float32 rounding, which must not be
    # taken for new directions (in a float32 basis: spurious Ritz values several times the radius).
    from leastcontrol.systems import RecurrentEquilibrium
    g = torch.Generator().manual_seed(0)
    net = RecurrentEquilibrium(64, 16, 10, generator=g)
    x = torch.rand(32, 64, generator=g)
    op = net.flat_operator()
    drive = op.drive(x)
    s = Euler(tol=1e-6, max_steps=400, check_every=1).solve(lambda z, c: op.f(z, c["drive"]), torch.zeros(32, 26),
                                            {"drive": drive}).state
    oracle = torch.stack([
        torch.linalg.eigvals(torch.eye(26, dtype=F64) + torch.func.jacfwd(
            lambda z: op.f(z[None], drive[i:i + 1])[0])(s[i]).double()).abs().max() for i in range(32)])
    slope = op.linearize(s, drive)
    radius = euler_map_radius(lambda lam: op.vjp_at(slope, drive, lam), torch.zeros(32, 26))
    assert radius.dtype == F64 and torch.all((radius - oracle).abs() < 1e-5)


def test_each_sample_gets_its_own_status_code():
    """Four samples, four endings: one settles, one chatters at a floor (stall rule), one is too slow
    for max_steps, one blows up; with throw=False the solve reports them instead of raising."""
    from leastcontrol.solvers import Field

    def fn(z, ctx):
        kind = ctx["kind"]
        settle = 1.0 - z
        chatter = -1e-3 * torch.sign(z - 0.5)
        slow = 4e-3 * (1.0 - z)      # falls 18 % every 50 steps: never stalls, still above tol at 3000
        blow = 2.0 * z + 1.0
        return torch.where(kind == 0, settle, torch.where(kind == 1, chatter, torch.where(kind == 2, slow, blow)))
    ctx = {"kind": torch.arange(4)[:, None]}
    field = Field(fn, {"x": 1})
    z0 = torch.full((4, 1), 0.3, dtype=F64)
    solver = Euler(tol=1e-9, max_steps=3000, check_every=5, patience=50, stall_tol=1e-2)
    res = solver.solve(field, z0, ctx, throw=False)
    assert res.stats.status.tolist() == [Status.CONVERGED, Status.STALLED, Status.MAX_STEPS, Status.DIVERGED]
    assert res.stats.diverged[0] == "x" and res.stats.sample_steps[2] == 3000
    assert [res.stats.fraction(s) for s in Status] == [0.25] * 4
    assert res.stats.summary()["diverged_fraction"] == 0.25
    with pytest.raises(SolverDivergedError, match="population 'x'"):
        solver.solve(field, z0, ctx)
    with pytest.raises(SolverDivergedError, match="euler diverged: population 'x'"):
        res.raise_if_diverged("euler")


def test_adam_rule_is_torch_adam_on_the_negative_field():
    """The adam step rule moves each sample as torch.optim.Adam moves a parameter with gradient −g."""
    from leastcontrol.solvers import Adam
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=F64)
    b = torch.randn(3, 5, generator=g, dtype=F64)
    grad = lambda z: torch.tanh(z @ A.T) - b          # noqa: E731  (any field: −grad is what Adam descends)
    z0 = torch.randn(3, 5, generator=g, dtype=F64)
    res = Adam(lr=0.05, tol=0.0, max_steps=37, check_every=4).solve(lambda z: -grad(z), z0)
    p = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.05)
    for _ in range(37):
        p.grad = grad(p.detach())
        opt.step()
    assert torch.equal(res.state, p.detach())
    assert res.stats.status.tolist() == [Status.MAX_STEPS] * 3


def test_backends_are_validated_against_the_rule_and_the_field():
    from leastcontrol.solvers import Field
    with pytest.raises(ConfigError, match="backend 'compile' runs rules whose steps are one traceable function"):
        Anderson(backend="compile")
    with pytest.raises(ConfigError, match="backend 'native' runs plain Euler steps"):
        Broyden(backend=("native", "eager"))
    with pytest.raises(ConfigError, match="unknown backend 'gpu'; valid backends: compile, eager, native"):
        Euler(backend="gpu")
    with pytest.raises(ConfigError, match="backend 'native' has no steps for this field"):
        Euler(backend="native").solve(Field(lambda z, c: -z, {"x": 2}), torch.ones(3, 2))


def test_a_user_step_rule_registers_and_runs_in_the_driver():
    """A new rule writes one step; the driver gives it checks, freezing, the stall rule and status codes."""
    from dataclasses import dataclass
    from leastcontrol.solvers import SOLVERS, Solver, register_solver, relative_residual, solver_from_dict

    @register_solver("test-relaxed", overwrite=True)
    @dataclass(repr=False)
    class Relaxed(Solver):
        omega: float = 0.5

        def step(self, fn, z, context, carry, t, groups):
            g = self.dt * fn(z, context)
            return z + self.omega * g, relative_residual(self.omega * g, z, groups), carry

    field, s0, s_star = linear_problem()
    res = solver_from_dict({"name": "test-relaxed", "omega": 0.8, "tol": 1e-12, "max_steps": 3000}).solve(field, s0)
    assert res.stats.converged and torch.allclose(res.state["s"], s_star, atol=1e-10)
    assert res.stats.steps % 10 == 0 and "test-relaxed" in SOLVERS


def test_momentum_rule_is_torch_sgd_with_momentum_on_the_negative_field():
    """The momentum step rule moves each sample as torch.optim.SGD(momentum=μ) moves a parameter with
    gradient −g (pcx's state optimiser, optax.sgd with momentum, takes the same steps)."""
    from leastcontrol.solvers import Momentum
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=F64)
    b = torch.randn(3, 5, generator=g, dtype=F64)
    grad = lambda z: torch.tanh(z @ A.T) - b          # noqa: E731
    z0 = torch.randn(3, 5, generator=g, dtype=F64)
    res = Momentum(lr=0.05, momentum=0.65, tol=0.0, max_steps=23, check_every=4).solve(lambda z: -grad(z), z0)
    p = z0.clone().requires_grad_(True)
    opt = torch.optim.SGD([p], lr=0.05, momentum=0.65)
    for _ in range(23):
        p.grad = grad(p.detach())
        opt.step()
    torch.testing.assert_close(res.state, p.detach(), rtol=0, atol=1e-15)
    assert res.stats.status.tolist() == [Status.MAX_STEPS] * 3
    with pytest.raises(ConfigError, match=r"momentum must be in \[0, 1\)"):
        Momentum(momentum=1.0)
    with pytest.raises(ConfigError, match="lr"):
        Momentum(lr=0.0)
