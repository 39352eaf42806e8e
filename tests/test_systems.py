"""Equilibrium systems: layered equilibrium = forward pass, VJPs, input validation, user systems."""
import pytest
import torch

from leastcontrol.methods import LCPDI, RBP
from leastcontrol.solvers import Euler
from leastcontrol.systems import EquilibriumSystem, FeedforwardEquilibrium, RecurrentEquilibrium, get_system

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
