"""Equilibrium systems: layered equilibrium = forward pass, VJPs, input validation, user systems."""
import math

import pytest
import torch

from leastcontrol.errors import ConfigError
from leastcontrol.methods import LCPDI, RBP
from leastcontrol.solvers import Euler
from leastcontrol.systems import EquilibriumSystem, FeedforwardEquilibrium, RecurrentEquilibrium, get_system
from leastcontrol.systems.networks import ACTIVATIONS, STATE_FORMS, activation_and_slope

from .helpers import F64, batch, rel_err, tiny_ff, tiny_rnn


def test_feedforward_equilibrium_is_the_forward_pass():
    net = FeedforwardEquilibrium([784, 256, 256, 10])
    x = torch.rand(32, 1, 28, 28)
    expected = net.explicit_forward(x)
    drive = net.encode(net.prepare_input(x)).detach()
    with torch.no_grad():
        res = Euler(dt=1.0, tol=1e-7, max_steps=50).solve(lambda s: net.dynamics(s, drive), net.init_state(32))
    assert res.stats.converged
    assert torch.allclose(res.state["o"], expected, atol=1e-6)
    # exactly depth + 1 = 3 steps reach it from the zero state
    with torch.no_grad():
        short = Euler(dt=1.0, tol=0.0, max_steps=net.settle_steps).solve(
            lambda s: net.dynamics(s, drive), net.init_state(32))
        shorter = Euler(dt=1.0, tol=0.0, max_steps=net.settle_steps - 1).solve(
            lambda s: net.dynamics(s, drive), net.init_state(32))
    assert torch.allclose(short.state["o"], expected, atol=1e-6)
    assert not torch.allclose(shorter.state["o"], expected, atol=1e-3)


@pytest.mark.parametrize("make", [tiny_rnn, lambda: tiny_rnn(recurrent_bias=True), tiny_ff,
                                  lambda: tiny_ff(sizes=(5, 4, 6, 3, 2))],
                         ids=["rnn", "rnn-recurrent-bias", "ff", "ff-deep"])
def test_closed_form_vjps_equal_autograd(make):
    net = make()
    x, _ = batch(n_in=5, n_out=net.n_out)
    drive = net.encode(net.prepare_input(x)).detach()
    g = torch.Generator().manual_seed(5)
    state = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in net.init_state(4).items()}
    cot = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in state.items()}
    f_fast, vjp_fast = net.dynamics_and_state_vjp(state, drive, cot)
    f_ref, vjp_ref = EquilibriumSystem.dynamics_and_state_vjp(net, state, drive, cot)
    for k in state:
        assert torch.allclose(f_fast[k], f_ref[k], atol=1e-12, rtol=0)
        assert torch.allclose(vjp_fast[k], vjp_ref[k], atol=1e-10, rtol=0)


@pytest.mark.parametrize("make", [tiny_rnn, lambda: tiny_rnn(recurrent_bias=True), tiny_ff,
                                  lambda: tiny_ff(sizes=(5, 4, 6, 3, 2))],
                         ids=["rnn", "rnn-recurrent-bias", "ff", "ff-deep"])
def test_local_param_vjp_equals_autograd_of_inner_product(make):
    """The built-ins' outer-product (∂θ f)ᵀ c equals autograd of ⟨f(s, θ), c⟩."""
    net = make()
    x, _ = batch()
    xs = net.prepare_input(x)
    g = torch.Generator().manual_seed(5)
    state = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in net.init_state(4).items()}
    cot = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in state.items()}
    got = net.param_vjp(state, xs, cot)
    f = net.dynamics(state, net.encode(xs))
    inner = sum((f[k] * cot[k]).sum() for k in f)
    names, params = zip(*net.named_parameters())
    ref = dict(zip(names, torch.autograd.grad(inner, params)))
    assert set(got) == set(ref)
    assert rel_err(got, ref) < 1e-13
    generic = EquilibriumSystem.param_vjp(net, state, xs, cot)
    assert rel_err(got, generic) < 1e-13


class LinearSystem(EquilibriumSystem):
    """A user-defined system written only as f: v̇ = −v + A tanh(v) + x,  ȯ = −o + C v."""

    def __init__(self):
        super().__init__()
        self.n_in, self.n_out = 5, 3
        g = torch.Generator().manual_seed(0)
        self.A = torch.nn.Parameter(0.3 * torch.randn(5, 5, generator=g, dtype=F64))
        self.C = torch.nn.Parameter(torch.randn(3, 5, generator=g, dtype=F64))

    def population_sizes(self):
        return {"v": 5, "o": 3}

    def encode(self, x):
        return x

    def dynamics(self, state, drive):
        return {"v": -state["v"] + torch.tanh(state["v"]) @ self.A.T + drive, "o": -state["o"] + state["v"] @ self.C.T}


def test_user_system_needs_only_f():
    net = LinearSystem()
    x, y = batch()
    rbp = RBP(solver=Euler(tol=1e-13, max_steps=5000))(net, x, y)
    # reference: autograd through a long unrolled solve
    s = net.init_state(4)
    for _ in range(300):
        f = net.dynamics(s, x)
        s = {k: s[k] + f[k] for k in s}
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(s["o"], y), [net.A, net.C])
    assert rel_err(rbp.grads, {"A": ref[0], "C": ref[1]}) < 1e-8
    lcp = LCPDI(alpha=0.5, k_i=0.001, solver=Euler(tol=1e-13, max_steps=100000)).gradients(net, x, y)
    assert rel_err({k: v / 0.002 for k, v in lcp.grads.items()}, rbp.grads) < 0.02


@pytest.mark.parametrize("make", [lambda: RecurrentEquilibrium(64, 16, 10), lambda: FeedforwardEquilibrium([64, 8, 8, 10])])
def test_input_validation(make):
    net = make()
    assert net.prepare_input(torch.rand(3, 1, 8, 8)).shape == (3, 64)
    assert net.prepare_input(torch.rand(3, 64, dtype=F64)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"expected \(batch, 64\)"):
        net.prepare_input(torch.rand(3, 63))
    with pytest.raises(ValueError, match=r"expected \(batch, 64\)"):
        net.prepare_input(torch.rand(64))
    with pytest.raises(ValueError, match="floating point"):
        net.prepare_input(torch.zeros(3, 64, dtype=torch.uint8))
    bad = torch.rand(3, 64)
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        net.prepare_input(bad)
    with pytest.raises(ValueError, match="NaN"):
        RBP()(net, bad, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="torch.Tensor"):
        net.prepare_input([[0.0] * 64])


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match=r"ff, .*rnn"):
        get_system("lstm", 4, 2)
    with pytest.raises(ValueError, match="hidden layer"):
        FeedforwardEquilibrium([4, 2])


# --- the layered network's options: activation and what the state holds --------------------------------
FF_OPTIONS = [(a, s) for a in ACTIVATIONS for s in STATE_FORMS]


def test_activation_slopes_equal_autograd():
    # The grid holds the kinks (0 for relu, ±1 for hard_tanh), where the slope takes autograd's value.
    v = torch.linspace(-5, 5, 2001, dtype=F64).requires_grad_(True)
    for name in ACTIVATIONS:
        r, slope = activation_and_slope(name, v)
        ref, = torch.autograd.grad(r.sum(), v)
        assert torch.allclose(slope, ref, atol=1e-14, rtol=0), name
    # GELU is the tanh approximation (JAX's default), written out:
    x = v.detach()
    gelu = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert torch.allclose(activation_and_slope("gelu", x)[0], gelu, atol=1e-15, rtol=0)


def _random_point(net, B=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in net.init_state(B).items()}
    cot = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in state.items()}
    return state, cot


@pytest.mark.parametrize("activation,state_form", FF_OPTIONS)
def test_ff_options_vjps_equal_autograd(activation, state_form):
    """``dynamics_and_state_vjp`` and ``param_vjp`` are autograd's vector-Jacobian products of ``dynamics``."""
    net = tiny_ff(sizes=(5, 4, 6, 3, 2), activation=activation, state=state_form)
    x, _ = batch()
    xs = net.prepare_input(x)
    state, cot = _random_point(net)
    primal = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    f = net.dynamics(primal, net.encode(xs))
    inner = sum((f[k] * cot[k]).sum() for k in f)
    names, params = zip(*net.named_parameters())
    grads = torch.autograd.grad(inner, [primal["v"], primal["o"], *params])
    ref_state, ref_params = dict(zip(("v", "o"), grads[:2])), dict(zip(names, grads[2:]))

    f_fast, vjp = net.dynamics_and_state_vjp(state, net.encode(xs).detach(), cot)
    assert all(torch.equal(f_fast[k], f[k].detach()) for k in f)
    assert all(torch.allclose(vjp[k], ref_state[k], atol=1e-13, rtol=0) for k in state)
    got = net.param_vjp(state, xs, cot)
    assert set(got) == set(ref_params) and rel_err(got, ref_params) < 1e-13
    # Feedback weights equal to the forward transposes give the same VJP; random ones replace W_l, D in it.
    net.add_feedback(torch.Generator().manual_seed(3))
    mirror = {key: net.mirror(key, dict(net.named_parameters())[name]).detach()
              for key, name in net.feedback_pathways().items()}
    _, same = net.dynamics_and_state_vjp(state, net.encode(xs).detach(), cot, feedback=mirror)
    assert all(torch.allclose(same[k], ref_state[k], atol=1e-13, rtol=0) for k in state)
    _, fb = net.dynamics_and_state_vjp(state, net.encode(xs).detach(), cot, feedback=net.feedback)
    blocks, a = net.blocks(state["v"]), net.blocks(cot["v"])
    B = [net.feedback[f"W_{i}"].detach() for i in range(len(net.W))] + [net.feedback["D"].detach()]
    upper = list(a[1:]) + [cot["o"]]
    if state_form == "rate":    # a_{l+1} times φ'(p_{l+1}) before the pathway; the output reads the rate
        pre = [xs @ net.U.T + net.b] + [h @ W.T + b for h, W, b in zip(blocks[:-1], net.W, net.b_W)]
        upper = [activation_and_slope(activation, p)[1] * u for p, u in zip(pre[1:], upper[:-1])] + [cot["o"]]
        expected = [u @ Bm.T for u, Bm in zip(upper, B)]
    else:                       # φ'(h_l) times the pathway's product
        expected = [activation_and_slope(activation, h)[1] * (u @ Bm.T) for h, u, Bm in zip(blocks, upper, B)]
    assert torch.allclose(fb["v"], torch.cat(expected, -1) - cot["v"], atol=1e-13, rtol=0)
    assert torch.equal(fb["o"], -cot["o"])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_rate_form_settles_to_the_potential_forms_output_in_depth_steps(activation):
    x, _ = batch()
    # seed 2: no layer of the relu net is dead on this batch, so its output varies with the input
    nets = {s: tiny_ff(sizes=(5, 4, 6, 3, 2), seed=2, activation=activation, state=s) for s in STATE_FORMS}
    ends = {}
    for form, net in nets.items():
        xs = net.prepare_input(x)
        drive = net.encode(xs).detach()
        s = net.init_state(4)
        assert net.settle_steps == 4
        with torch.no_grad():
            for step in range(net.settle_steps):
                f = net.dynamics(s, drive)
                s = {k: s[k] + f[k] for k in s}
                if step == net.settle_steps - 2:   # one step short: the output is not there yet
                    assert not torch.allclose(s["o"], net.explicit_forward(x), atol=1e-3)
            assert all(net.dynamics(s, drive)[k].abs().max() < 1e-14 for k in s)   # an equilibrium
            assert torch.allclose(s["o"], net.explicit_forward(x), atol=1e-14, rtol=0)
        ends[form] = s
    assert torch.allclose(ends["rate"]["o"], ends["potential"]["o"], atol=1e-14, rtol=0)
    assert ends["rate"]["o"].std(0).min() > 1e-4   # not a dead net: the output varies with the input
    phi = nets["rate"].phi(ends["potential"]["v"])
    assert torch.allclose(ends["rate"]["v"], phi, atol=1e-14, rtol=0)   # the rates of the potentials


def test_default_ff_is_the_tanh_network_on_potentials():
    net = tiny_ff(sizes=(5, 4, 6, 3))
    assert (net.activation, net.state_form) == ("tanh", "potential")
    x, _ = batch()
    xs = net.prepare_input(x)
    state, _ = _random_point(net)
    h1, h2 = net.blocks(state["v"])
    U, b, W, bW, D, c = (p.detach() for p in (net.U, net.b, net.W[0], net.b_W[0], net.D, net.c))
    expected = {"v": torch.cat([xs @ U.T + b - h1, torch.tanh(h1) @ W.T + bW - h2], -1),
                "o": torch.tanh(h2) @ D.T + c - state["o"]}
    got = net.dynamics(state, net.encode(xs))
    assert all(torch.allclose(got[k], expected[k], atol=1e-14, rtol=0) for k in got)
    forward = torch.tanh(torch.tanh(xs @ U.T + b) @ W.T + bW) @ D.T + c
    assert torch.allclose(net.explicit_forward(x), forward, atol=1e-14, rtol=0)
    assert torch.allclose(net.rate_slope(state)["v"], 1 - torch.tanh(state["v"]) ** 2, atol=1e-15, rtol=0)


def test_rate_slope_is_one_on_rates_and_phi_prime_on_potentials():
    for activation in ACTIVATIONS:
        state, _ = _random_point(tiny_ff(activation=activation))
        pot = tiny_ff(activation=activation).rate_slope(state)["v"]
        assert torch.equal(pot, activation_and_slope(activation, state["v"])[1])
        assert torch.equal(tiny_ff(activation=activation, state="rate").rate_slope(state)["v"],
                           torch.ones_like(state["v"]))


def test_bad_activation_or_state_names_the_valid_choices():
    with pytest.raises(ConfigError, match="unknown activation 'swish' of the ff system; "
                                          "valid: tanh, gelu, relu, sigmoid, hard_tanh"):
        FeedforwardEquilibrium([4, 3, 2], activation="swish")
    with pytest.raises(ConfigError, match="unknown state 'rates' of the ff system; valid: potential, rate"):
        get_system("ff", 4, 2, hidden=3, state="rates")


def test_layered_factories_take_one_width_or_a_list_of_widths():
    net = get_system("ff", 784, 10, hidden=[128, 128, 128], activation="gelu", state="rate")
    assert (net.sizes, net.activation, net.state_form, net.settle_steps) == ([784, 128, 128, 128, 10], "gelu", "rate", 4)
    assert get_system("ff", 784, 10, hidden=(500,)).sizes == [784, 500, 10]
    assert get_system("ff", 784, 10, hidden=16).sizes == [784, 16, 16, 10]    # an int: two layers, as before
    assert get_system("hopfield", 6, 3, hidden=[5, 4, 7]).sizes == [6, 5, 4, 7, 3]
    readout = get_system("hopfield-readout", 6, 3, hidden=[5])
    assert readout.sizes == [6, 5, 3] and readout.readout_kind == "linear"
    assert get_system("hopfield", 6, 3, hidden=4).sizes == [6, 4, 4, 3]
    for bad in ([], [4, 0], 2.5, True, "64"):
        with pytest.raises(ConfigError, match="hidden of the ff model must be a positive integer"):
            get_system("ff", 6, 3, hidden=bad)
