"""Meta-learning: meta-gradients against closed forms on a quadratic inner problem."""
import warnings

import pytest
import torch
from torch import nn

from leastcontrol.errors import ConfigError, SolverDivergedError
from leastcontrol.meta import InnerProblem, InnerSettings, LCPMeta, Sinusoid, TaskBatch, get_meta_method

F64 = torch.float64


def _quadratic(T=3, K=6, d=4, lam=0.7, seed=0):
    """A linear learner with squared error: L_train is quadratic, so φ* and the meta-gradient are closed forms."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Linear(d, 1).double()
    problem = InnerProblem(net, "mean_squared_error", lam=lam)
    x = torch.randn(T, K, d, generator=g, dtype=F64)
    y = torch.randn(T, K, 1, generator=g, dtype=F64)
    xq = torch.randn(T, K, d, generator=g, dtype=F64)
    yq = torch.randn(T, K, 1, generator=g, dtype=F64)
    omega = torch.randn(problem.n_params, generator=g, dtype=F64)
    return problem, omega, TaskBatch(x, y, xq, yq)


def _analytic(problem, omega, batch):
    """φ*_t = (H_t + λI)⁻¹(λω − c_t); meta-gradient λ (H_t + λI)⁻¹ ∇L_val(φ*_t), averaged over tasks."""
    P, lam = problem.n_params, problem.lam
    grads = []
    for t in range(batch.x.shape[0]):
        zero = torch.zeros(P, dtype=F64)
        H = torch.autograd.functional.hessian(lambda p: problem.task_loss(p, batch.x[t], batch.y[t]), zero)
        c = torch.func.grad(problem.task_loss)(zero, batch.x[t], batch.y[t])
        A = H + lam * torch.eye(P, dtype=F64)
        phi = torch.linalg.solve(A, lam * omega - c)
        gval = torch.func.grad(problem.task_loss)(phi, batch.xq[t], batch.yq[t])
        grads.append(lam * torch.linalg.solve(A, gval))
    return torch.stack(grads).mean(0)


def _top_curvatures(problem, batch):
    """Per task, the largest eigenvalue of ``H + λ`` (the quadratic's Hessian is constant)."""
    tops = []
    for t in range(batch.x.shape[0]):
        H = torch.autograd.functional.hessian(lambda p: problem.task_loss(p, batch.x[t], batch.y[t]),
                                              torch.zeros(problem.n_params, dtype=F64))
        tops.append(float(torch.linalg.eigvalsh(H).max()) + problem.lam)
    return tops


INNER = InnerSettings(solver="gd", lr=0.1, steps=5000, tol=1e-12)


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_imaml_equals_the_analytic_meta_gradient():
    problem, omega, batch = _quadratic()
    exact = _analytic(problem, omega, batch)
    out = get_meta_method("imaml", inner=INNER, cg_steps=20)(problem, omega, batch)
    assert torch.allclose(out.grad, exact, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("route", ["di", "energy"])
def test_lcp_over_beta_tends_to_the_implicit_gradient(route):
    problem, omega, batch = _quadratic()
    exact = _analytic(problem, omega, batch)
    errors = []
    for beta in (1.0, 0.1, 0.01):
        kw = {"tol": 1e-12, "max_iter": 20000} if route == "di" else {"energy_steps": 3000, "energy_lr": 1e-3}
        out = get_meta_method("lcp", inner=INNER, beta=beta, route=route, **kw)(problem, omega, batch)
        errors.append(float((out.grad - exact).norm() / exact.norm()))
    assert _cos(out.grad, exact) > 0.99
    if route == "di":
        assert errors[2] < errors[1] < errors[0]  # the error shrinks with β


def test_lcp_controlled_solve_waits_for_the_control_to_settle():
    # ψ starts at zero beside a settled φ of norm ~100·√P. Each population judged by its own
    # residual, the linear dynamics (rate ≥ λ = 0.7, step 0.1) leave a relative error of at most
    # about tol/(0.1·0.7) ≈ 1.4e-3; one residual over [φ | ψ] judges ψ's motion against ‖φ‖ and
    # stops while ψ is still further off.
    problem, omega, batch = _quadratic()
    omega = omega + 100.0
    settled = get_meta_method("lcp", inner=INNER, beta=0.01, tol=1e-13, max_iter=50000)(problem, omega, batch).grad
    errors = {}
    for rule in ("per-population", "joint"):
        out = get_meta_method("lcp", inner=INNER, beta=0.01, tol=1e-4, max_iter=5000,
                              controlled_residual=rule)(problem, omega, batch)
        errors[rule] = float((out.grad - settled).norm() / settled.norm())
    assert errors["per-population"] < 1e-4 / (0.1 * 0.7)
    assert errors["joint"] > 1e-4 / (0.1 * 0.7)
    with pytest.raises(ConfigError, match="controlled_residual"):
        get_meta_method("lcp", controlled_residual="sum")


def test_anderson_inner_solver_reaches_the_same_equilibria_in_fewer_steps():
    problem, omega, batch = _quadratic()
    gd = InnerSettings(solver="gd", lr=0.1, steps=5000, tol=1e-10)
    aa = InnerSettings(solver="anderson", lr=0.1, steps=5000, tol=1e-10)
    free_gd = problem.equilibrium(omega, batch.x, batch.y, gd)
    free_aa = problem.equilibrium(omega, batch.x, batch.y, aa)
    assert free_aa.stats.steps < free_gd.stats.steps / 2
    assert torch.allclose(free_aa.state, free_gd.state, rtol=1e-7, atol=1e-9)
    # The controlled dynamics of lcp run with the same solver and land on the same update.
    kw = {"beta": 0.1, "tol": 1e-10, "max_iter": 20000}
    out_gd = get_meta_method("lcp", inner=gd, **kw)(problem, omega, batch)
    out_aa = get_meta_method("lcp", inner=aa, **kw)(problem, omega, batch)
    assert torch.allclose(out_aa.grad, out_gd.grad, rtol=1e-6, atol=1e-8)
    assert out_aa.stats["controlled_iterations"] < out_gd.stats["controlled_iterations"]


def test_contrastive_tends_to_the_implicit_gradient():
    problem, omega, batch = _quadratic()
    exact = _analytic(problem, omega, batch)
    out = get_meta_method("contrastive", inner=INNER, beta=1e-3)(problem, omega, batch)
    assert _cos(out.grad, exact) > 0.999


def test_lcp_update_is_lambda_psi_from_the_controlled_equilibrium_alone():
    problem, omega, batch = _quadratic()
    method = LCPMeta(inner=INNER, beta=0.1, tol=1e-12, max_iter=20000)
    free = method.adapt(problem, omega, batch)
    ctrl = method.controlled_equilibrium(problem, omega, batch, free.state)
    # ψ* = −f(φ*) at the controlled equilibrium, and the update reads nothing but it.
    assert torch.allclose(ctrl.psi, -problem.field(ctrl.phi, omega.expand_as(ctrl.phi), batch.x, batch.y), atol=1e-9)
    out = method(problem, omega, batch)
    assert torch.allclose(out.grad, (-problem.lam * ctrl.psi / 0.1).mean(0), atol=1e-10)


def test_fomaml_is_the_validation_gradient_at_the_adapted_weights():
    problem, omega, batch = _quadratic()
    method = get_meta_method("fomaml", inner=INNER)
    phi = method.adapt(problem, omega, batch).state
    out = method(problem, omega, batch)
    expected = torch.stack([torch.func.grad(problem.task_loss)(phi[t], batch.xq[t], batch.yq[t]) for t in range(3)]).mean(0)
    assert torch.allclose(out.grad, expected, atol=1e-12)


def test_sinusoid_tasks_follow_the_published_distribution():
    g = torch.Generator().manual_seed(0)
    b = Sinusoid(shots=5, queries=7).sample(200, g)
    assert b.x.shape == (200, 5, 1) and b.xq.shape == (200, 7, 1)
    assert float(b.x.abs().max()) <= 5.0 and float(b.y.abs().max()) <= 5.0


def test_sinusoid_learner_is_the_published_relu_mlp_unless_told_otherwise():
    g = torch.Generator().manual_seed(0)
    relu = Sinusoid().model(g)
    shapes = [tuple(p.shape) for p in relu.parameters()]
    assert shapes == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    assert [type(m) for m in relu if not isinstance(m, nn.Linear)] == [nn.ReLU, nn.ReLU]
    smooth = Sinusoid(activation="softplus").model(torch.Generator().manual_seed(0))
    assert [type(m) for m in smooth if not isinstance(m, nn.Linear)] == [nn.Softplus, nn.Softplus]
    # The activation changes the rate function only, not the initial weights.
    assert all(torch.equal(a, b) for a, b in zip(relu.parameters(), smooth.parameters()))
    with pytest.raises(ConfigError, match="relu, softplus, tanh"):
        Sinusoid(activation="gelu")


def test_bad_meta_settings_fail_clearly():
    with pytest.raises(ValueError, match="contrastive, fomaml, imaml, lcp"):
        get_meta_method("maml")
    with pytest.raises(ConfigError, match="di, energy"):
        get_meta_method("lcp", route="newton")
    with pytest.raises(ConfigError, match="adam, anderson, gd"):
        InnerSettings(solver="lbfgs")


def test_short_lcp_sinusoid_run_lowers_held_out_mse_well_below_the_untrained_init():
    """A real meta-training run (the published ReLU learner, LCP by dynamic inversion): held-out
    post-adaptation MSE after 40 meta-steps is well below that of the untrained initialisation."""
    from leastcontrol.meta.train import MetaConfig, meta_train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the ReLU learner's inner solve chatters; expected
        result = meta_train(MetaConfig(task="sinusoid", method="lcp", meta_batch=10, meta_steps=40, meta_lr=0.01,
                                       inner_lr=0.1, inner_step_rule="curvature", inner_steps=30, lam=2.0,
                                       beta=0.1, eval_tasks=200, progress=False))
    assert result["test"]["tasks"] == 200
    assert result["test"]["mean"] < 0.4 * result["test_untrained"]["mean"]  # observed: 0.82 against 3.82


def test_meta_cli_writes_the_documented_json(tmp_path):
    import json
    from leastcontrol.cli import main
    out = tmp_path / "meta.json"
    code = main(["meta", "--method", "lcp", "--meta-steps", "2", "--meta-batch", "2", "--inner-steps", "5",
                 "--eval-tasks", "8", "--quiet", "--json-out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"config", "history", "test", "train_seconds"}
    assert set(result["test"]) == {"metric", "mean", "ci95", "tasks"}
    assert result["test"]["metric"] == "mse" and result["test"]["tasks"] == 8
    assert result["history"][-1]["step"] == 2
    # The method's own figures, averaged over the logging window: LCP's controlled solve ran.
    assert result["history"][-1]["method_stats"]["controlled_iterations"] >= 1


def test_meta_config_rejects_bad_values():
    from leastcontrol.meta.train import MetaConfig
    with pytest.raises(ConfigError, match="sinusoid"):
        MetaConfig(task="omniglot-large")
    with pytest.raises(ConfigError, match="lam"):
        MetaConfig(lam=0.0)


def test_batched_mlp_fast_path_equals_the_functional_path():
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    fast = InnerProblem(net, "cross_entropy", lam=1.0)
    generic = InnerProblem(net, "cross_entropy", lam=1.0)
    generic._layers = None
    assert fast._layers is not None
    phi = torch.randn(3, fast.n_params, generator=g, dtype=F64)
    x = torch.randn(3, 6, 2, generator=g, dtype=F64)
    y = torch.randint(0, 3, (3, 6), generator=g)
    v = torch.randn_like(phi)
    assert torch.allclose(fast.losses(phi, x, y), generic.losses(phi, x, y), atol=1e-12)
    assert torch.allclose(fast.grads(phi, x, y), generic.grads(phi, x, y), atol=1e-12)
    assert torch.allclose(fast.hvp(phi, x, y, v), generic.hvp(phi, x, y, v), atol=1e-10)
    single = torch.stack([torch.func.grad(generic.task_loss)(phi[t], x[t], y[t]) for t in range(3)])
    assert torch.allclose(fast.grads(phi, x, y), single, atol=1e-12)


def test_softplus_learner_runs_on_the_fast_path_and_settles():
    """A smooth learner: the batched fast path applies, and the inner gradient dynamics settle to a
    tight tolerance (no kinks to chatter across), where the same ReLU learner is left with a floor."""
    from leastcontrol.meta.learners import mlp_learner
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 10, 12, generator=g, dtype=F64)
    y = torch.randint(0, 5, (4, 10), generator=g)
    settings = InnerSettings(solver="gd", lr=0.2, steps=4000, tol=1e-12)
    residual = {}
    for act in ("softplus", "relu"):
        torch.manual_seed(0)
        net = mlp_learner(5, 12, hidden=(16,), activation=act).double()
        problem = InnerProblem(net, "cross_entropy", lam=1.0)
        assert problem._layers is not None
        omega = problem.initial_weights()
        res = problem.equilibrium(omega, x, y, settings)
        f = problem.field(res.state, omega.expand_as(res.state), x, y)
        residual[act] = float((f.norm(dim=1) / res.state.norm(dim=1)).max())
    assert residual["softplus"] < 1e-10
    assert residual["relu"] > 1e-4  # 4000 steps leave it chattering
    with pytest.raises(ConfigError, match="relu, softplus, tanh"):
        mlp_learner(5, activation="gelu")


def _analytic_lam_grads(problem, omega, batch):
    """Meta-gradients for ω and a per-weight λ by autograd through the closed-form φ* = (H + Λ)⁻¹(Λω − c)."""
    P = problem.n_params
    lam = problem.lam.clone().requires_grad_(True)
    om = omega.clone().requires_grad_(True)
    total = 0.0
    for t in range(batch.x.shape[0]):
        zero = torch.zeros(P, dtype=F64)
        H = torch.autograd.functional.hessian(lambda p: problem.task_loss(p, batch.x[t], batch.y[t]), zero)
        c = torch.func.grad(problem.task_loss)(zero, batch.x[t], batch.y[t])
        phi = torch.linalg.solve(H + torch.diag(lam), lam * om - c)
        total = total + problem.task_loss(phi, batch.xq[t], batch.yq[t])
    return torch.autograd.grad(total / batch.x.shape[0], (om, lam))


def _per_weight_lam_problem():
    problem, omega, batch = _quadratic()
    g = torch.Generator().manual_seed(5)
    problem.lam = 0.3 + torch.rand(problem.n_params, generator=g, dtype=F64)
    return problem, omega, batch


def test_per_weight_lambda_gradients_match_the_closed_form():
    problem, omega, batch = _per_weight_lam_problem()
    d_omega, d_lam = _analytic_lam_grads(problem, omega, batch)
    imaml = get_meta_method("imaml", inner=INNER, cg_steps=20, learn_lam=True)(problem, omega, batch)
    assert torch.allclose(imaml.grad, d_omega, rtol=1e-8, atol=1e-10)
    assert torch.allclose(imaml.grad_lam, d_lam, rtol=1e-8, atol=1e-10)
    lcp = get_meta_method("lcp", inner=INNER, beta=1e-3, tol=1e-13, max_iter=20000, learn_lam=True)(
        problem, omega, batch)
    contrastive = get_meta_method("contrastive", inner=INNER, beta=1e-3, learn_lam=True)(problem, omega, batch)
    for out in (lcp, contrastive):
        assert _cos(out.grad, d_omega) > 0.999 and _cos(out.grad_lam, d_lam) > 0.999
    # Without learn_lam no λ gradient is returned; fomaml has none to give.
    assert get_meta_method("imaml", inner=INNER)(problem, omega, batch).grad_lam is None
    with pytest.raises(ConfigError, match="no gradient for λ"):
        get_meta_method("fomaml", learn_lam=True)


def test_lcp_lambda_update_is_local():
    """∇_λ = (φ* − ω) ⊙ ψ* / β: read from the controlled equilibrium and ω alone."""
    problem, omega, batch = _per_weight_lam_problem()
    method = LCPMeta(inner=INNER, beta=0.1, tol=1e-12, max_iter=20000, learn_lam=True)
    free = method.adapt(problem, omega, batch)
    ctrl = method.controlled_equilibrium(problem, omega, batch, free.state)
    out = method(problem, omega, batch)
    assert torch.allclose(out.grad_lam, ((ctrl.phi - omega) * ctrl.psi / 0.1).mean(0), atol=1e-10)
    assert torch.allclose(out.grad, (-problem.lam * ctrl.psi / 0.1).mean(0), atol=1e-10)


def test_learned_lambda_training_moves_lambda(tmp_path):
    from leastcontrol.meta.train import MetaConfig, meta_train
    result = meta_train(MetaConfig(method="imaml", learn_lam=True, meta_steps=4, meta_batch=4, inner_steps=20,
                                   meta_lr=0.05, eval_tasks=8, log_every=2, progress=False))
    assert "lam_mean" in result["history"][-1]
    assert result["history"][-1]["lam_mean"] != pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ConfigError, match="no gradient for λ"):
        MetaConfig(method="fomaml", learn_lam=True)


def test_imaml_cg_is_safe_on_an_indefinite_system():
    """Negative curvature (non-convex inner loss) stops CG for that task instead of blowing it up."""
    problem, omega, batch = _quadratic()
    P = problem.n_params
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=F64))
    grad = torch.randn(3, P, generator=g, dtype=F64)
    problem.grads = lambda phi, x, y: grad
    method = get_meta_method("imaml", inner=InnerSettings(steps=1), cg_steps=50)
    for eigs, indefinite in (([1.0, 2.0, 3.0, 0.5, 4.0], False), ([1.0, -3.0, 3.0, 0.5, -2.0], True)):
        H = Q @ torch.diag(torch.tensor(eigs, dtype=F64)) @ Q.T
        problem.hvp = lambda phi, x, y, v, H=H: v @ H
        out = method(problem, omega, batch)
        assert torch.isfinite(out.grad).all()
        if indefinite:
            assert out.stats["cg_truncated"] == 3
            assert float(out.grad.norm()) < 10 * float(grad.mean(0).norm())
        else:  # positive definite: the exact λ (H + λI)⁻¹ g
            exact = problem.lam * torch.linalg.solve(H + problem.lam * torch.eye(P, dtype=F64), grad.T).T.mean(0)
            assert out.stats["cg_truncated"] == 0 and torch.allclose(out.grad, exact, atol=1e-10)


def test_inner_gradient_dynamics_settle_only_below_the_step_bound():
    """Euler on ``φ̇ = −(H + λ)φ + …`` settles iff ``lr < 2 / λ_max(H + λ)``: just below, every task
    settles; just above, none does, and ``converged_fraction`` says so rather than hiding it."""
    problem, omega, batch = _quadratic(lam=0.7)
    top = _top_curvatures(problem, batch)
    bound = 2 / max(top)
    below = problem.equilibrium(omega, batch.x, batch.y, InnerSettings("gd", 0.9 * bound, 20000, 1e-10))
    above = problem.equilibrium(omega, batch.x, batch.y, InnerSettings("gd", 2 / min(top) * 1.05, 300, 1e-10))
    assert below.stats.converged_fraction == 1.0
    assert above.stats.converged_fraction == 0.0


def test_meta_training_warns_when_the_inner_solve_does_not_settle(tmp_path):
    import json
    from leastcontrol.meta.train import MetaConfig, meta_train
    settings = dict(task="sinusoid", method="imaml", meta_batch=4, meta_steps=3, eval_tasks=8, progress=False,
                    inner_lr=0.01)
    with pytest.warns(RuntimeWarning, match="lower --inner-lr"):
        unsettled = meta_train(MetaConfig(inner_steps=2, json_out=str(tmp_path / "m.json"), **settings))
    assert unsettled["inner_converged_fraction"]["train"] == 0.0
    assert json.loads((tmp_path / "m.json").read_text())["history"][-1]["inner_converged_fraction"] == 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settled = meta_train(MetaConfig(inner_steps=300, inner_tol=0.1, **settings))
    assert not [w for w in caught if "--inner-tol" in str(w.message)]
    assert settled["inner_converged_fraction"]["train"] == 1.0
    assert settled["inner_converged_fraction"]["test"] == 1.0


def test_meta_training_warns_when_imaml_cg_leaves_a_large_residual():
    from leastcontrol.meta.train import CG_RESIDUAL_WARN, MetaConfig, meta_train, unsolved_cg_message
    settings = dict(task="sinusoid", method="imaml", meta_batch=4, meta_steps=3, eval_tasks=8, progress=False,
                    inner_lr=0.01, inner_steps=300, inner_tol=0.1)
    with pytest.warns(RuntimeWarning, match="raise --cg-steps"):
        one_step = meta_train(MetaConfig(cg_steps=1, **settings))
    assert one_step["history"][-1]["method_stats"]["cg_residual"] > CG_RESIDUAL_WARN
    assert unsolved_cg_message(0.5 * CG_RESIDUAL_WARN, 10) is None
    # The other methods report no CG residual, so they never warn about it.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        meta_train(MetaConfig(**{**settings, "method": "fomaml"}))


def test_a_diverging_inner_solve_names_the_inner_step():
    problem, omega, batch = _quadratic()
    with pytest.raises(SolverDivergedError, match="Lower --inner-lr"):
        problem.equilibrium(omega, batch.x, batch.y, InnerSettings("gd", 1e3, 1000, 1e-10))
    with pytest.raises(SolverDivergedError, match="Lower --inner-lr"):
        get_meta_method("lcp", inner=InnerSettings("gd", 1e3, 1000, 1e-10))(problem, omega, batch)


@pytest.mark.parametrize("solver", ["gd", "anderson"])
def test_curvature_step_rule_settles_where_the_fixed_step_cannot(solver):
    """Above the stability bound the fixed step never settles; the curvature rule caps each task's
    step at 1/λ_max(H + λ) and reaches the closed-form equilibrium, so iMAML's meta-gradient is exact."""
    problem, omega, batch = _quadratic(lam=0.7)
    tops = _top_curvatures(problem, batch)
    estimate = problem.top_curvature(omega.expand(batch.x.shape[0], -1), batch.x, batch.y, iters=50)
    assert torch.allclose(estimate, torch.tensor(tops, dtype=F64), rtol=1e-6)
    lr = 3 / min(tops)  # above 2/λ_max for every task
    fixed = InnerSettings(solver, lr, 2000, 1e-10)
    capped = InnerSettings(solver, lr, 2000, 1e-10, step_rule="curvature", power_iters=50)
    try:
        assert problem.equilibrium(omega, batch.x, batch.y, fixed).stats.converged_fraction < 1.0
    except SolverDivergedError:
        pass  # the fixed step blew up: also a failure to settle
    settled = problem.equilibrium(omega, batch.x, batch.y, capped)
    assert settled.stats.converged_fraction == 1.0
    # tol bounds the unscaled step lr·‖f‖/‖φ‖ of every task, not the smaller step the rule takes
    loose = problem.equilibrium(omega, batch.x, batch.y, InnerSettings(solver, lr, 2000, 1e-4, "curvature", 50))
    f = problem.field(loose.state, omega.expand_as(loose.state), batch.x, batch.y)
    assert float((lr * f.norm(dim=1) / loose.state.norm(dim=1)).max()) <= 1e-4
    exact = _analytic(problem, omega, batch)
    out = get_meta_method("imaml", inner=capped, cg_steps=20)(problem, omega, batch)
    assert torch.allclose(out.grad, exact, rtol=1e-6, atol=1e-9)
    lcp = get_meta_method("lcp", inner=capped, beta=0.01, tol=1e-12, max_iter=20000)(problem, omega, batch)
    assert _cos(lcp.grad, exact) > 0.999


def test_curvature_step_rule_rejects_adam_and_unknown_rules():
    with pytest.raises(ConfigError, match="step rule"):
        InnerSettings(step_rule="newton")
    with pytest.raises(ConfigError, match="adam"):
        InnerSettings(solver="adam", step_rule="curvature")


class _Interrupted(Exception):
    pass


def test_interrupted_meta_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from leastcontrol.checkpoint import load_checkpoint, META_FORMAT
    from leastcontrol.errors import CheckpointError
    from leastcontrol.meta.train import MetaConfig, meta_train
    base = dict(task="sinusoid", method="lcp", meta_batch=3, meta_steps=6, inner_steps=10, eval_tasks=8,
                log_every=2, meta_lr=0.01, progress=False)
    reference = meta_train(MetaConfig(**base))
    ckpt = tmp_path / "meta.pt"
    build = MetaConfig.build_method

    def failing_on_the_fifth_step(self):
        method, calls = build(self), []

        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) == 5:
                raise _Interrupted
            return method(*args, **kwargs)
        return call
    with monkeypatch.context() as m:
        m.setattr(MetaConfig, "build_method", failing_on_the_fifth_step)
        with pytest.raises(_Interrupted):
            meta_train(MetaConfig(**base, checkpoint=str(ckpt), checkpoint_every=2))
    assert load_checkpoint(ckpt, META_FORMAT)["step"] == 4
    with pytest.raises(CheckpointError, match="--resume"):
        meta_train(MetaConfig(**base, checkpoint=str(ckpt)))
    with pytest.raises(CheckpointError, match="other settings.*meta_lr"):
        meta_train(MetaConfig(**dict(base, meta_lr=0.02), checkpoint=str(ckpt), resume=True))
    resumed = meta_train(MetaConfig(**base, checkpoint=str(ckpt), checkpoint_every=2, resume=True))
    # Steps 5 and 6 ran in the resumed process only; the same streams give the same meta-gradients.
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in reference["history"]]
    assert [h["step"] for h in resumed["history"]] == [2, 4, 6]
    assert resumed["test"] == reference["test"]
    assert resumed["test_untrained"] == reference["test_untrained"]
    assert resumed["inner_converged_fraction"] == reference["inner_converged_fraction"]
    assert load_checkpoint(ckpt, META_FORMAT)["step"] == 6


def test_meta_checkpoint_errors_name_the_fix(tmp_path, capsys):
    from leastcontrol.cli import main
    from leastcontrol.errors import ConfigError
    from leastcontrol.meta.train import MetaConfig
    with pytest.raises(ConfigError, match="--checkpoint"):
        MetaConfig(resume=True)
    torch.save({"format": "leastcontrol-checkpoint-1", "config": {}}, tmp_path / "train.pt")
    (tmp_path / "bad.pt").write_bytes(b"\x00 not a checkpoint")
    args = ["meta", "--meta-steps", "2", "--meta-batch", "2", "--inner-steps", "5", "--eval-tasks", "8", "--quiet",
            "--resume", "--checkpoint"]
    assert main(args + [str(tmp_path / "train.pt")]) == 2
    assert "not a leastcontrol meta-training checkpoint" in capsys.readouterr().err
    assert main(args + [str(tmp_path / "bad.pt")]) == 2
    assert "corrupt" in capsys.readouterr().err
