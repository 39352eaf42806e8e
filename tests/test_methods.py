"""Gradients of every method against independent references (float64)."""
import math

import pytest
import torch
import torch.nn.functional as F

from leastcontrol.errors import ConfigError, SolverDivergedError
from leastcontrol.methods import BP, LCPDI, LCPEBD, LCPKP, RBP, get_method
from leastcontrol.solvers import Adam, Anderson, Euler

from .helpers import F64, batch, cosine, rel_err, tiny_ff, tiny_hopfield, tiny_rnn


def unrolled_autograd_grads(net, x, y, steps=400, dt=1.0):
    """Reference: autograd through a long Euler solve from the zero state."""
    drive = net.encode(net.prepare_input(x))
    s = net.init_state(x.shape[0])
    for _ in range(steps):
        f = net.dynamics(s, drive)
        s = {k: s[k] + dt * f[k] for k in s}
    loss = torch.nn.functional.cross_entropy(s["o"], y)
    names, params = zip(*net.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params)))


def test_rbp_matches_unrolled_autograd_on_contractive_rnn():
    net = tiny_rnn()
    x, y = batch()
    ref = unrolled_autograd_grads(net, x, y)
    out = RBP(solver=Euler(tol=1e-13, max_steps=5000))(net, x, y)
    assert out.stats["converged"]
    assert rel_err(out.grads, ref) < 1e-4
    # also written to .grad
    assert torch.allclose(net.W.grad, ref["W"], rtol=1e-4, atol=1e-12)


def test_rbp_and_bp_agree_on_feedforward_equilibrium():
    net = tiny_ff()
    x, y = batch()
    bp = BP()(net, x, y)
    rbp = RBP(solver=Euler(tol=1e-14, max_steps=100))(net, x, y)
    assert rel_err(rbp.grads, bp.grads) < 1e-10
    ref = unrolled_autograd_grads(net, x, y, steps=net.settle_steps)
    assert rel_err(bp.grads, ref) < 1e-12


def H_beta(net, x, y, beta):
    """Independent oracle: H_β(θ) = min_s ½‖f(s)‖² + β L(s), L the batch-mean loss, by L-BFGS from s°."""
    with torch.no_grad():
        drive = net.encode(net.prepare_input(x))
        s0 = RBP(solver=Euler(tol=1e-14, max_steps=5000)).free_equilibrium(net, x).state
    s = {k: v.clone().requires_grad_(True) for k, v in s0.items()}
    opt = torch.optim.LBFGS(list(s.values()), lr=1, max_iter=2000, tolerance_grad=1e-15,
                            tolerance_change=1e-20, history_size=50, line_search_fn="strong_wolfe")

    def energy():
        f = net.dynamics(s, drive)
        e = 0.5 * sum(v.pow(2).sum() for v in f.values())
        return e + beta * torch.nn.functional.cross_entropy(s["o"], y)

    def closure():
        opt.zero_grad()
        e = energy()
        e.backward()
        return e

    for _ in range(3):
        opt.step(closure)
    with torch.no_grad():
        return float(energy())


# The Hopfield network with its linear readout: an output population nothing else reads, which
# LCP-DI's controller assumes (u controls o, e the rest); with the layer readout o feeds back to the
# layers below, and the controlled equilibrium is not H_β's stationary point.
@pytest.mark.parametrize("make,dt", [
    (lambda: tiny_rnn(n_in=3, n_hidden=4, n_out=2), 1.0), (lambda: tiny_ff(sizes=(3, 4, 3, 2)), 1.0),
    (lambda: tiny_hopfield("sigmoid", "linear", sizes=(3, 4, 3, 2)), 0.5)], ids=["rnn", "ff", "hopfield-readout"])
def test_lcp_di_is_gradient_of_relaxed_least_control_objective(make, dt):
    """Central finite differences of H_β along random directions in θ equal ⟨LCP update, d⟩."""
    net = make()
    x, y = batch(n_in=3, n_out=2, B=2)
    method = LCPDI(alpha=0.5, k_i=1.0, solver=Euler(dt=dt, tol=1e-13, max_steps=40000))
    out = method(net, x, y)
    assert out.stats["converged"]
    eps = 1e-5
    params = dict(net.named_parameters())
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        d = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in params.items()}
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for n, p in params.items():
                    p += sign * eps * d[n]
            values.append(H_beta(net, x, y, method.beta))
            with torch.no_grad():
                for n, p in params.items():
                    p -= sign * eps * d[n]
        fd = (values[0] - values[1]) / (2 * eps)
        analytic = float(sum((out.grads[n] * d[n]).sum() for n in params))
        assert abs(fd - analytic) < 1e-6 * max(1.0, abs(analytic)), (fd, analytic)


def _weak_limit_cosines(net, x, y, settings):
    rbp = RBP(solver=Euler(tol=1e-13, max_steps=20000)).gradients(net, *RBP()._inputs(net, x, y))
    out = []
    for kw in settings:
        kw = dict(kw)
        m = LCPDI(solver=Euler(tol=1e-13, max_steps=200000, dt=kw.pop("dt", 1.0)), **kw)
        lcp = m.gradients(net, *m._inputs(net, x, y))
        assert lcp.stats["converged"]
        scaled = {k: v / m.beta for k, v in lcp.grads.items()}
        out.append((cosine(scaled, rbp.grads), rel_err(scaled, rbp.grads)))
    return out


@pytest.mark.parametrize("make", [tiny_rnn, tiny_ff], ids=["rnn", "ff"])
def test_weak_control_limit_approaches_rbp_lowering_k_i(make):
    net = make()
    x, y = batch()
    res = _weak_limit_cosines(net, x, y, [dict(alpha=0.5, k_i=k) for k in (2.0, 0.2, 0.02, 0.002)])
    cos = [c for c, _ in res]
    errs = [e for _, e in res]
    assert all(b >= a - 1e-9 for a, b in zip(cos, cos[1:])), cos
    assert cos[-1] > 0.99
    assert errs[-1] < errs[0] and errs[-1] < 0.05, errs


@pytest.mark.parametrize("make", [tiny_rnn, tiny_ff], ids=["rnn", "ff"])
def test_weak_control_limit_approaches_rbp_raising_alpha(make):
    net = make()
    x, y = batch()
    # dt small enough that the Euler-stepped controller with a large leak stays stable.
    res = _weak_limit_cosines(net, x, y, [dict(alpha=a, k_i=0.05, dt=0.05) for a in (0.5, 4.0, 19.0)])
    cos = [c for c, _ in res]
    assert cos[0] < cos[1] < cos[2] and cos[-1] > 0.99, cos


@pytest.mark.parametrize("make", [tiny_rnn, tiny_ff], ids=["rnn", "ff"])
def test_controlled_equilibrium_is_stationary_point_of_H_beta(make):
    net = make()
    x, y = batch()
    m = LCPDI(alpha=0.5, k_i=0.7, k_p=0.3, solver=Euler(tol=1e-13, max_steps=50000))
    xs = net.prepare_input(x)
    ctrl = m.controlled_equilibrium(net, xs, y)
    assert ctrl.stats.converged
    drive = net.encode(xs).detach()
    f = net.dynamics(ctrl.state, drive)
    for k in f:  # f(s*) + ψ* = 0
        assert torch.allclose(f[k] + ctrl.control[k], torch.zeros_like(f[k]), atol=1e-10)
    # (∂_s f)ᵀ ψ* = β ∇_s L, with an autograd VJP independent of the closed form
    s = {k: v.clone().requires_grad_(True) for k, v in ctrl.state.items()}
    fs = net.dynamics(s, drive)
    back = torch.autograd.grad(list(fs.values()), list(s.values()), [ctrl.control[k] for k in fs])
    back = dict(zip(s, back))
    o = ctrl.state["o"].clone().requires_grad_(True)
    dL = torch.autograd.grad(torch.nn.functional.cross_entropy(o, y), o)[0]
    assert torch.allclose(back["v"], torch.zeros_like(back["v"]), atol=1e-10)
    assert torch.allclose(back["o"], m.beta * dL, atol=1e-10)
    assert m.beta == pytest.approx(0.7 / 0.5 + 0.3)


def test_lcp_update_is_local_outer_product():
    """ΔW = −Σ_b ψ_v φ(v*)ᵀ: postsynaptic control times presynaptic rate."""
    net = tiny_rnn()
    x, y = batch()
    m = LCPDI(alpha=0.5, solver=Euler(tol=1e-12, max_steps=20000))
    xs = net.prepare_input(x)
    ctrl = m.controlled_equilibrium(net, xs, y)
    out = m.gradients(net, xs, y)
    r = torch.tanh(ctrl.state["v"])
    assert torch.allclose(out.grads["W"], -(ctrl.control["v"].T @ r), atol=1e-13)
    assert torch.allclose(out.grads["D"], -(ctrl.control["o"].T @ r), atol=1e-13)
    assert torch.allclose(out.grads["U"], -(ctrl.control["v"].T @ xs), atol=1e-13)
    assert torch.allclose(out.grads["c"], -ctrl.control["o"].sum(0), atol=1e-13)


@pytest.mark.parametrize("name", ["rbp", "lcp-di"])
def test_small_sgd_step_lowers_loss(name):
    net = tiny_rnn()
    x, y = batch(B=16)
    method = get_method(name)
    before = method(net, x, y).loss
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.05 * p.grad
            p.grad = None
    after = method(net, x, y).loss
    assert after < before


def test_grads_accumulate_like_backward():
    net = tiny_rnn()
    x, y = batch()
    m = RBP(solver=Euler(tol=1e-12, max_steps=2000))
    g1 = m(net, x, y).grads["W"].clone()
    m(net, x, y)
    assert torch.allclose(net.W.grad, 2 * g1)


def test_bp_on_recurrent_system_is_a_clear_error():
    with pytest.raises(ValueError, match="feedforward.*rbp or lcp-di"):
        BP()(tiny_rnn(), *batch())


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match=r"bp, bptt, .*lcp-di, lcp-ebd, lcp-kp, lcp-lf, .*rbp"):
        get_method("backprop")


def test_bad_method_settings_fail_at_construction():
    with pytest.raises(ConfigError, match="lowering k_i"):
        LCPDI(alpha=1000.0)
    with pytest.raises(ConfigError, match="dt"):
        RBP(solver=Euler(dt=-1.0))
    with pytest.raises(ConfigError, match="max_steps"):
        LCPDI(solver=Euler(max_steps=0))
    with pytest.raises(ValueError, match="adam, anderson, broyden, euler"):
        RBP(solver="newton")
    with pytest.raises(ConfigError, match="controlled: unknown setting.*memory"):
        LCPDI(controlled={"name": "euler", "memory": 3})
    with pytest.raises(ConfigError, match="lowering k_i"):
        LCPDI(alpha=0.5, controlled=Euler(dt=4.0))


@pytest.mark.parametrize("name", ["rbp", "lcp-di"])
def test_huge_dt_diverges_with_a_clear_error(name):
    net = tiny_rnn(w_scale=3.0)
    x, y = batch()
    kwargs = {"solver": Euler(dt=50.0)}
    if name == "lcp-di":
        kwargs["alpha"] = 0.01
    with pytest.raises(SolverDivergedError, match=r"population 'v'.*smaller dt"):
        get_method(name, **kwargs)(net, x, y)


def test_bad_targets_are_rejected():
    net = tiny_rnn()
    x, _ = batch()
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        RBP()(net, x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        RBP()(net, x, torch.full((4,), 7))
    with pytest.raises(ValueError, match="integer class indices"):
        RBP()(net, x, torch.zeros(4))


@pytest.mark.parametrize("make", [tiny_rnn, tiny_ff], ids=["rnn", "ff"])
@pytest.mark.parametrize("settings", [dict(controlled=Euler(dt=0.2, tol=0.0, max_steps=3000), ff_init=True),
                                      dict(controlled=Adam(lr=0.01, tol=0.0, max_steps=800), ff_init=False)],
                         ids=["sgd-ff-init", "adam-zero-init"])
def test_energy_route_matches_dynamic_inversion(make, settings):
    net = make()
    x, y = batch()
    xs = net.prepare_input(x)
    di = LCPDI(alpha=0.5, k_i=1.0, solver=Euler(tol=1e-12, max_steps=20000))
    ebd = LCPEBD(alpha=0.5, **settings)
    assert ebd.beta == di.beta
    psi_di = di.controlled_equilibrium(net, xs, y).control
    psi_ebd = ebd.controlled_equilibrium(net, xs, y).control
    assert cosine(psi_ebd, psi_di) > 0.99
    assert cosine(ebd.gradients(net, xs, y).grads, di.gradients(net, xs, y).grads) > 0.99


@pytest.mark.parametrize("make", [tiny_rnn, lambda: tiny_ff(sizes=(5, 4, 6, 3, 3))], ids=["rnn", "ff-deep"])
def test_kolen_pollack_with_exact_transposes_is_dynamic_inversion(make):
    net = make()
    x, y = batch()
    xs = net.prepare_input(x)
    kp = LCPKP(alpha=0.5, solver=Euler(tol=1e-12, max_steps=20000))
    kp.prepare(net)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for key, name in net.feedback_pathways().items():
            net.feedback[key].copy_(params[name].t())
    assert all(c > 1 - 1e-12 for c in kp.alignment(net).values())
    di = LCPDI(alpha=0.5, solver=Euler(tol=1e-12, max_steps=20000))
    assert rel_err(kp.controlled_equilibrium(net, xs, y).control, di.controlled_equilibrium(net, xs, y).control) < 1e-10
    g_kp, g_di = kp.gradients(net, xs, y).grads, di.gradients(net, xs, y).grads
    for name, g in g_di.items():
        assert torch.allclose(g_kp[name], g, atol=1e-12)
    for key, name in net.feedback_pathways().items():  # ΔB = ΔWᵀ
        assert torch.equal(g_kp[f"feedback.{key}"], g_kp[name].t())


def test_kolen_pollack_feedback_aligns_with_forward_transposes():
    from leastcontrol.train import train

    from .helpers import flat_config
    result = train(flat_config(model="rnn", method="lcp-kp", hidden=32, lr=5e-3, kappa=0.01, epochs=8,
                               batch_size=32, limit_train=640, limit_test=100, eval_every=0, progress=False))
    net = result["system"]
    alignment = LCPKP().alignment(net)
    assert alignment["W"] > 0.9 and alignment["D"] > 0.9, alignment
    assert "feedback.W" in net.state_dict()


def test_kolen_pollack_decay_shrinks_every_weight_matrix():
    net = tiny_rnn()
    kp = LCPKP(kappa=0.1)
    kp.prepare(net)
    before = {n: p.clone() for n, p in net.named_parameters()}
    kp.after_step(net)
    for n, p in net.named_parameters():
        factor = 0.9 if p.dim() == 2 else 1.0
        assert torch.allclose(p, factor * before[n]), n


def test_linear_feedback_learning_aligns_with_dynamic_inversion():
    """Repeated noisy phases on one batch turn Q u* towards the dynamic-inversion control e*."""
    from leastcontrol.methods import LCPLF
    from leastcontrol.systems import RecurrentEquilibrium

    g = torch.Generator().manual_seed(0)
    net = RecurrentEquilibrium(6, 24, 4, dtype=F64, generator=g)
    x = torch.rand(32, 6, generator=g, dtype=F64)
    y = torch.randint(0, 4, (32,), generator=g)
    e_star = LCPDI(solver=Euler(tol=1e-10, max_steps=5000)).controlled_equilibrium(net, x, y).control["v"]
    lf = LCPLF(tau_q=1e3, solver=Euler(tol=1e-10, max_steps=5000))
    lf.prepare(net, generator=g)
    assert net.lf_Q.shape == (24, 4) and "lf_Q" in net.state_dict()

    def alignment():
        ctrl = lf.controlled_equilibrium(net, x, y)
        return cosine({"v": ctrl.control["o"] @ net.lf_Q.t()}, {"v": e_star}), ctrl

    cosines = []
    for _ in range(6):
        c, ctrl = alignment()
        cosines.append(c)
        lf.learn_feedback(net, x, y, ctrl)
    assert all(b > a for a, b in zip(cosines, cosines[1:])), cosines
    assert cosines[-1] - cosines[0] > 0.05


def test_linear_feedback_noisy_phase_follows_its_equations():
    """The fused noisy phase equals a plain transcription of its equations, step by step, in float64:

    ``v̇ = f_v + Q u + σε``, ``ȯ = f_o + u``, ``u̇_int = −∇_o L − α u_int`` from ``(s*, u*)``, OU noise
    ``ε ← a ε + √(1−a²) ξ``, and ``C = −(1/σ²T B) Σ_t σε_t (u_{t+1} − u*)ᵀ``.
    """
    from leastcontrol.methods import LCPLF

    net = tiny_rnn()
    x, y = batch()
    xs = net.prepare_input(x)
    lf = LCPLF(alpha=0.5, k_i=2.0, k_p=0.3, noise_steps=30, sigma=0.05, tau_noise=4.0, solver=Euler(tol=1e-12, max_steps=20000))
    ctrl = lf.controlled_equilibrium(net, xs, y)
    C = lf.feedback_covariance(net, xs, y, ctrl, generator=torch.Generator().manual_seed(3))

    g = torch.Generator().manual_seed(3)
    B, Q, drive = xs.shape[0], net.lf_Q, net.encode(xs).detach()

    def control(o, u_int):
        return lf.k_i * u_int - lf.k_p * (torch.softmax(o, -1) - F.one_hot(y, o.shape[1])) / B

    v, o, u_star = ctrl.state["v"].clone(), ctrl.state["o"].clone(), ctrl.control["o"]
    u_int = (u_star + lf.k_p * (torch.softmax(o, -1) - F.one_hot(y, o.shape[1])) / B) / lf.k_i
    a = math.exp(-lf.controlled.dt / lf.tau_noise)
    eps = torch.randn(v.shape, generator=g, dtype=F64)
    acc = torch.zeros_like(Q)
    for _ in range(lf.noise_steps):
        u = control(o, u_int)
        f = net.dynamics({"v": v, "o": o}, drive)
        grad_o = (torch.softmax(o, -1) - F.one_hot(y, o.shape[1])) / B
        v, o, u_int = (v + lf.controlled.dt * (f["v"] + u @ Q.T + lf.sigma * eps), o + lf.controlled.dt * (f["o"] + u),
                       u_int + lf.controlled.dt * (-grad_o - lf.alpha * u_int))
        acc += (lf.sigma * eps).T @ (control(o, u_int) - u_star)
        eps = a * eps + math.sqrt(1 - a * a) * torch.randn(eps.shape, generator=g, dtype=F64)
    expected = -acc / (lf.sigma ** 2 * lf.noise_steps * B)
    assert expected.abs().max() > 1e-3          # the phase moved the control
    assert torch.allclose(C, expected, rtol=1e-10, atol=1e-14)


def test_linear_feedback_update_is_slope_modulated_feedback():
    from leastcontrol.methods import LCPLF

    net = tiny_rnn()
    x, y = batch()
    xs = net.prepare_input(x)
    lf = LCPLF(alpha=0.5, noise_steps=0, solver=Euler(tol=1e-12, max_steps=20000))
    ctrl = lf.controlled_equilibrium(net, xs, y)
    f = net.dynamics(ctrl.state, net.encode(xs).detach())
    u = ctrl.control["o"]
    assert torch.allclose(f["o"] + u, torch.zeros_like(u), atol=1e-10)             # ψ_o = −f_o
    assert torch.allclose(f["v"] + u @ net.lf_Q.t(), torch.zeros_like(f["v"]), atol=1e-10)  # Q u* = −f_v
    slope = 1 - torch.tanh(ctrl.state["v"]) ** 2
    assert torch.allclose(ctrl.control["v"], slope * (u @ net.lf_Q.t()))
    out = lf.gradients(net, xs, y)
    assert torch.allclose(out.grads["W"], -ctrl.control["v"].T @ torch.tanh(ctrl.state["v"]), atol=1e-12)


def test_linear_feedback_on_rates_applies_the_activation_slope_once():
    """On a net that holds rates, Q u* is the hidden control itself, and the update multiplies it by the
    slope of each unit's activation at its potential once: ``ΔW_l = −(φ'(p_l) ⊙ (Q u*)_l) h_{l−1}ᵀ``."""
    from leastcontrol.methods import LCPLF

    net = tiny_ff(activation="gelu", state="rate")
    x, y = batch()
    xs = net.prepare_input(x)
    lf = LCPLF(alpha=0.5, noise_steps=0, solver=Euler(tol=1e-12, max_steps=20000))
    ctrl = lf.controlled_equilibrium(net, xs, y)
    u = ctrl.control["o"]
    f = net.dynamics(ctrl.state, net.encode(xs).detach())
    assert torch.allclose(f["v"] + u @ net.lf_Q.t(), torch.zeros_like(f["v"]), atol=1e-10)   # Q u* = −f_v
    assert torch.equal(ctrl.control["v"], u @ net.lf_Q.t())
    h1, h2 = net.blocks(ctrl.state["v"])
    psi1, psi2 = net.blocks(ctrl.control["v"])
    p2 = h1 @ net.W[0].T + net.b_W[0]
    slope2 = 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (p2 + 0.044715 * p2 ** 3)))
    slope2 = slope2 + 0.5 * p2 * (1 - torch.tanh(math.sqrt(2 / math.pi) * (p2 + 0.044715 * p2 ** 3)) ** 2) \
        * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * p2 ** 2)
    out = lf.gradients(net, xs, y)
    assert torch.allclose(out.grads["W.0"], -(slope2 * psi2).T @ h1, atol=1e-12)
    assert torch.allclose(out.grads["D"], -u.T @ h2, atol=1e-12)


@pytest.mark.parametrize("name", ["lcp-di", "lcp-kp", "lcp-lf", "lcp-ebd"])
@pytest.mark.parametrize("make", [tiny_rnn, lambda: tiny_ff(sizes=(5, 4, 6, 3, 3)),
                                  lambda: tiny_ff(sizes=(5, 4, 6, 3, 3), activation="gelu", state="rate")],
                         ids=["rnn", "ff-deep", "ff-deep-rate-gelu"])
def test_explicit_outer_product_update_equals_autograd_vjp(name, make):
    """Every LCP route's update equals the generic autograd VJP −(∂θ f(s*))ᵀ ψ* at its own (s*, ψ*)."""
    from leastcontrol.methods import local_update
    from leastcontrol.systems import EquilibriumSystem

    net = make()
    x, y = batch()
    xs = net.prepare_input(x)
    method = get_method(name, alpha=0.5, **({} if name == "lcp-ebd" else {"solver": Euler(tol=1e-12, max_steps=20000)}))
    method.prepare(net)
    ctrl = method.controlled_equilibrium(net, xs, y)
    explicit = local_update(net, xs, ctrl)
    generic = EquilibriumSystem.param_vjp(net, ctrl.state, xs, ctrl.control)
    forward = [n for n, _ in net.named_parameters() if not n.startswith("feedback.")]
    for n in forward:
        assert torch.allclose(explicit[n], -generic[n], atol=1e-8, rtol=0), n
    out = method.gradients(net, xs, y)
    for n in forward:
        assert torch.allclose(out.grads[n], explicit[n], atol=1e-8, rtol=0), n


@pytest.mark.parametrize("name", ["lcp-di", "lcp-lf"])
def test_per_population_residual_settles_the_control_that_a_joint_residual_cuts_short(name):
    # From the free equilibrium the control starts at zero beside a settled state, so one
    # residual over [s | e | u_int] ([v | o | u_int] for lcp-lf) passes a loose tol while the
    # control is still growing.
    net = tiny_rnn()
    x, y = batch()
    extra = {"noise_steps": 0} if name == "lcp-lf" else {}  # Q fixed, so every call sees the same system

    def update(tol, **kw):
        net.zero_grad()
        return get_method(name, alpha=0.5, k_i=0.2, **extra, **kw,
                          solver=Euler(tol=tol, max_steps=5000, check_every=1)).gradients(net, x, y).grads

    settled = update(1e-12)
    assert LCPDI().controlled_residual == "per-population"
    per_population = update(1e-2)
    joint = update(1e-2, controlled_residual="joint")
    assert rel_err(per_population, settled) < 1e-2
    assert rel_err(joint, settled) > 3 * rel_err(per_population, settled)
    with pytest.raises(ConfigError, match="controlled_residual"):
        LCPDI(controlled_residual="sum")


@pytest.mark.parametrize("make", [tiny_rnn, tiny_ff], ids=["rnn", "ff"])
def test_controller_gains_with_the_same_beta_give_the_same_update(make):
    """The controlled equilibrium depends on the gains only through β = k_i/α + k_p.

    The gains change only the path there (how many steps it takes); a different β gives a
    different update.
    """
    net = make()
    x, y = batch()
    outs = {}
    for gains in ((0.1, 1.0, 0.0), (1.0, 10.0, 0.0), (1.0, 5.0, 5.0), (1.0, 1.0, 0.0)):
        alpha, k_i, k_p = gains
        m = LCPDI(alpha=alpha, k_i=k_i, k_p=k_p, solver=Euler(tol=1e-12, max_steps=50000))
        outs[gains] = m.gradients(net, *m._inputs(net, x, y))
        assert outs[gains].stats["converged"], gains
    published = outs[(0.1, 1.0, 0.0)]
    for gains in ((1.0, 10.0, 0.0), (1.0, 5.0, 5.0)):
        assert rel_err(outs[gains].grads, published.grads) < 1e-8, gains
    assert rel_err(outs[(1.0, 1.0, 0.0)].grads, published.grads) > 1e-2   # β = 1, not 10


def test_each_phase_runs_its_own_solver_and_settings_are_checked_at_construction():
    net = tiny_rnn()
    x, y = batch()
    euler = LCPDI(solver=Euler(tol=1e-12, max_steps=20000))
    hybrid = LCPDI(solver=Euler(tol=1e-12, max_steps=20000),
                   controlled=Anderson(tol=1e-12, max_steps=20000, warmup=30, memory=6, start_below=float("inf")))
    a, b = (m.gradients(net, *m._inputs(net, x, y)) for m in (euler, hybrid))
    assert a.stats["converged"] and b.stats["converged"]
    assert rel_err(b.grads, a.grads) < 1e-8
    assert b.stats["iterations_controlled"] < a.stats["iterations_controlled"]
    assert b.stats["iterations_free"] == a.stats["iterations_free"]   # the free phase kept Euler
    # A table of settings (as a config file gives it) is the same solver.
    table = LCPDI(solver={"name": "euler", "tol": 1e-12, "max_steps": 20000})
    assert table.controlled == euler.controlled and table.config()["controlled"]["tol"] == 1e-12
    with pytest.raises(ConfigError, match="unknown setting.*warmup.*'euler' solver"):
        LCPDI(solver={"name": "euler", "warmup": 3})
    with pytest.raises(ConfigError, match="a solver is a table of settings"):
        LCPDI(solver=[("memory", 3)])
    with pytest.raises(ConfigError, match="patience must be a positive integer"):
        LCPDI(controlled=Anderson(patience=0))


def test_rbp_anderson_solves_the_adjoint_where_the_euler_dynamics_are_unstable():
    """At a state whose linearised dynamics have an eigenvalue with positive real part (a fixed
    point Anderson can settle on and Euler cannot), the adjoint dynamics grow without end; RBP's
    Anderson adjoint still solves ``(∂_s f)ᵀ λ = −∇_s L``, checked per sample against a dense
    solve with the Jacobian from autograd."""
    net = tiny_rnn(w_scale=3.0)
    x, y = batch(B=3)
    state = {k: torch.zeros_like(v) for k, v in net.init_state(x.shape[0]).items()}
    op = RBP()._flat_operator(net)
    s, drive = op.pack(state), op.drive(x)
    jac = [torch.autograd.functional.jacobian(lambda v, b=b: op.f(v[None], drive[b:b + 1])[0], s[b])
           for b in range(x.shape[0])]
    assert max(float(torch.linalg.eigvals(J).real.max()) for J in jac) > 0.05   # unstable here
    dL = torch.autograd.functional.jacobian(
        lambda v: F.cross_entropy(net.readout(op.unpack(v)), y), s)              # ∇_s of the batch mean
    expected = torch.stack([torch.linalg.solve(J.T, -g) for J, g in zip(jac, dL)])
    euler = RBP(solver=Euler(tol=1e-10, max_steps=300)).adjoint_equilibrium(net, x, state, y)
    assert not euler.stats.converged
    anderson = RBP(solver=Anderson(tol=1e-10, max_steps=300)).adjoint_equilibrium(net, x, state, y)
    assert anderson.stats.converged
    got = op.pack(anderson.state)
    assert torch.allclose(got, expected, rtol=1e-7, atol=1e-9 * float(expected.abs().max()))


def _euler_map_radius_by_full_jacobian(net, x, state):
    """Per sample, the largest |eigenvalue| of I + ∂f from the dense Jacobian (autograd)."""
    drive, names = net.encode(x), list(state)
    radii = []
    for i in range(x.shape[0]):
        widths = [state[k].shape[1] for k in names]

        def f(z):
            out = net.dynamics(dict(zip(names, z.split(widths, 1))), drive[i:i + 1])
            return torch.cat([out[k] for k in names], 1)

        z = torch.cat([state[k][i:i + 1] for k in names], 1)
        J = torch.autograd.functional.jacobian(f, z)[0, :, 0, :]
        radii.append(torch.linalg.eigvals(torch.eye(J.shape[0], dtype=F64) + J).abs().max())
    return torch.stack(radii)


def test_check_stability_reports_the_free_equilibria_that_anderson_settles_on_but_euler_leaves():
    # Strong recurrence (W × 12): Anderson, accelerating from the first step, settles every sample
    # on a fixed point whose Euler map expands; the solver's Krylov estimate matches the
    # dense Jacobian's eigenvalues, and the method's stats carry the unstable fraction.
    import warnings

    from leastcontrol.errors import UnstableEquilibriumWarning
    net, (x, y) = tiny_rnn(n_hidden=8, w_scale=12.0), batch(B=6)
    options = {"check_stability": True, "start_below": math.inf}
    method = RBP(solver=Anderson(tol=1e-10, max_steps=400, **options))
    with pytest.warns(UnstableEquilibriumWarning, match="6 of 6 samples"):
        free = method.free_equilibrium(net, x)
    oracle = _euler_map_radius_by_full_jacobian(net, x, free.state)
    assert bool((oracle > 1.5).all())
    assert torch.allclose(free.stats.sample_radius, oracle, rtol=1e-8)
    with pytest.warns(UnstableEquilibriumWarning):
        out = method.gradients(net, x, y)
    assert out.stats["unstable_fraction_free"] == 1.0
    # A contractive network: every free equilibrium is stable, nothing is flagged.
    net = tiny_rnn(n_hidden=8, w_scale=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableEquilibriumWarning)
        out = RBP(solver=Anderson(tol=1e-10, max_steps=400, **options)).gradients(net, x, y)
    assert out.stats["unstable_fraction_free"] == 0.0 and out.stats["unstable_fraction_adjoint"] == 0.0
    assert "unstable_fraction_free" not in RBP(solver=Euler(tol=1e-10, max_steps=400)).gradients(net, x, y).stats


@pytest.mark.parametrize("name", ["rbp", "lcp-di"])
def test_squared_error_reads_class_indices_as_one_hot_rows_and_reports_accuracy(name):
    net = tiny_rnn()
    x, labels = batch()
    onehot = F.one_hot(labels, net.n_out).to(net.dtype)
    by_labels = get_method(name, loss="mse").gradients(net, *get_method(name, loss="mse")._inputs(net, x, labels))
    by_rows = get_method(name, loss="mse").gradients(net, *get_method(name, loss="mse")._inputs(net, x, onehot))
    assert by_labels.accuracy is not None and by_labels.accuracy == by_rows.accuracy
    for key in by_rows.grads:
        assert torch.equal(by_labels.grads[key], by_rows.grads[key]), key
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, "):
        get_method(name, loss="mse")(net, x, labels + 100)
