"""The layered Hopfield network and equilibrium propagation: the energy is the dynamics' potential, EP's
update tends to recurrent backprop's gradient as β → 0 (error O(β) one-sided, O(β²) centered), the other
methods train the system, bad settings name the fix, and EP learns the bundled digits (float64 but the last)."""
import math

import pytest
import torch
import torch.nn.functional as F

from leastcontrol.cli import main
from leastcontrol.errors import ConfigError
from leastcontrol.methods import EP, RBP, EPCentered, get_method, method_from_dict
from leastcontrol.methods.ep import energy_param_grad
from leastcontrol.solvers import Euler
from leastcontrol.systems import HopfieldEquilibrium, get_system
from leastcontrol.train import TrainConfig, train

from .helpers import F64, batch, cosine, rel_err, tiny_hopfield, tiny_rnn

TIGHT = Euler(dt=0.5, tol=1e-13, max_steps=100000)
READOUTS = [("layer", "mse"), ("linear", "cross_entropy")]


def targets(y, loss, n_out=3):
    """What rbp reads: one-hot float targets for the squared error, class indices for cross-entropy."""
    return F.one_hot(y, n_out).to(F64) if loss == "mse" else y


def rbp_grads(net, x, y, loss):
    m = RBP(loss=loss, solver=Euler(dt=0.5, tol=1e-14, max_steps=100000))
    out = m.gradients(net, *m._inputs(net, x, targets(y, loss)))
    assert out.stats["converged"]
    return out.grads


def ep_grads(cls, net, x, y, loss, beta):
    m = cls(loss=loss, beta=beta, solver=TIGHT)
    out = m.gradients(net, *m._inputs(net, x, y))
    assert out.stats["converged"], out.stats
    return out.grads


# --- the system ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("readout", ["layer", "linear"])
@pytest.mark.parametrize("rate", ["sigmoid", "tanh"])
def test_dynamics_are_minus_the_energy_gradient(rate, readout):
    net = tiny_hopfield(rate, readout)
    x, _ = batch()
    g = torch.Generator().manual_seed(5)
    s = {"v": torch.randn(4, 10, generator=g, dtype=F64), "o": torch.randn(4, 3, generator=g, dtype=F64)}
    s = {k: v.requires_grad_(True) for k, v in s.items()}
    energy = net.energy(s, x)
    assert energy.shape == (4,)
    dE = dict(zip(s, torch.autograd.grad(energy.sum(), list(s.values()), allow_unused=True)))
    f = net.dynamics({k: v.detach() for k, v in s.items()}, net.encode(x).detach())
    assert torch.allclose(f["v"], -dE["v"], atol=1e-10, rtol=0)
    if readout == "layer":
        assert torch.allclose(f["o"], -dE["o"], atol=1e-10, rtol=0)
    else:   # the readout is outside the energy: o follows W_L ρ(s_{L−1}) + b_L
        assert dE["o"] is None
        r = net.rho(net.blocks(s["v"])[-1]) @ net.W[-1].T + net.b[-1]
        assert torch.allclose(f["o"], r - s["o"], atol=1e-12, rtol=0)


@pytest.mark.parametrize("readout", ["layer", "linear"])
def test_hard_sigmoid_equilibrium_is_a_stationary_point_of_the_energy_in_the_box(readout):
    """The projected-step field settles where −∂E/∂s vanishes inside (0, 1) and points out of the box at
    the units clamped to 0 or 1: the equilibria of the papers' clipped dynamics."""
    net = tiny_hopfield("hard_sigmoid", readout, scale=3.0)
    x, _ = batch(B=8)
    free = EP(solver=TIGHT).free_equilibrium(net, x)
    assert free.stats.converged
    s = {k: v.clone().requires_grad_(True) for k, v in free.state.items()}
    grads = torch.autograd.grad(net.energy(s, x).sum(), list(s.values()), allow_unused=True)
    names = ["v", "o"] if readout == "layer" else ["v"]
    inside = outside = 0
    for name, dE in zip(s, grads):
        if name not in names:
            continue
        v = free.state[name]
        low, high = v < 1e-9, v > 1 - 1e-9
        mid = ~(low | high)
        assert bool(((v > -1e-12) & (v < 1 + 1e-12)).all())
        assert torch.allclose(dE[mid], torch.zeros_like(dE[mid]), atol=1e-9)
        assert bool((dE[low] >= -1e-9).all()) and bool((dE[high] <= 1e-9).all())
        inside, outside = inside + int(mid.sum()), outside + int((low | high).sum())
    assert inside > 0 and outside > 0     # both kinds of unit are exercised


@pytest.mark.parametrize("readout", ["layer", "linear"])
def test_energy_param_grad_is_autograd_of_the_total_energy(readout):
    """The local rule ∂E/∂W_l = −Σ ρ(s_l)ρ(s_{l−1})ᵀ (and, with a force −β ∂C/∂o on a linear readout,
    β ∂C/∂W_L) equals autograd of E + β C(r(s)) in θ."""
    net = tiny_hopfield("tanh", readout)
    x, y = batch()
    g = torch.Generator().manual_seed(7)
    s = {"v": torch.rand(4, 10, generator=g, dtype=F64), "o": torch.rand(4, 3, generator=g, dtype=F64)}
    beta = 0.3
    names, params = zip(*net.named_parameters())
    total = net.energy(s, x).sum()
    if readout == "linear":
        r = net.rho(net.blocks(s["v"])[-1]) @ net.W[-1].T + net.b[-1]
        total = total + beta * F.cross_entropy(r, y, reduction="sum")
        s = {"v": s["v"], "o": r.detach()}    # at an equilibrium o = r
        force = {"o": -beta * (torch.softmax(s["o"], -1) - F.one_hot(y, 3))}
    else:   # the cost reads the state only: nothing in θ
        force = {"o": -beta * (s["o"] - F.one_hot(y, 3))}
    auto = dict(zip(names, torch.autograd.grad(total, params)))
    closed = energy_param_grad(net, s, x, force)
    assert set(closed) == set(auto)
    for n in auto:
        assert torch.allclose(closed[n], auto[n], atol=1e-12), n


def test_shapes_defaults_and_registry():
    net = get_system("hopfield", 64, 10, hidden=16)
    assert [tuple(w.shape) for w in net.W] == [(16, 64), (16, 16), (10, 16)]
    assert net.population_sizes() == {"v": 32, "o": 10} and not net.is_feedforward and net.rate == "hard_sigmoid"
    assert get_system("hopfield-readout", 64, 10, hidden=16).readout_kind == "linear"
    with pytest.raises(ConfigError, match="rate 'relu'.*hard_sigmoid, sigmoid, tanh"):
        HopfieldEquilibrium([4, 5, 3], rate="relu")
    with pytest.raises(ConfigError, match="readout 'softmax'.*layer, linear"):
        HopfieldEquilibrium([4, 5, 3], readout="softmax")


# --- equilibrium propagation tends to recurrent backprop ------------------------------------------------
def _slope(betas, errors):
    return math.log(errors[0] / errors[-1]) / math.log(betas[0] / betas[-1])


@pytest.mark.parametrize("readout,loss", READOUTS)
def test_ep_tends_to_rbp_with_error_linear_in_beta_and_centered_quadratic(readout, loss):
    net = tiny_hopfield("sigmoid", readout)
    x, y = batch()
    ref = rbp_grads(net, x, y, loss)
    betas = [1e-1, 3e-2, 1e-2]
    one = [ep_grads(EP, net, x, y, loss, b) for b in betas]
    two = [ep_grads(EPCentered, net, x, y, loss, b) for b in betas]
    err_one, err_two = [rel_err(g, ref) for g in one], [rel_err(g, ref) for g in two]
    assert 0.8 < _slope(betas, err_one) < 1.2, err_one
    assert 1.7 < _slope(betas, err_two) < 2.3, err_two
    assert all(b < a for a, b in zip(err_one, err_one[1:])) and all(b < a for a, b in zip(err_two, err_two[1:]))
    assert err_two[-1] < err_one[-1]
    small = ep_grads(EP, net, x, y, loss, 1e-3)
    assert cosine(small, ref) > 0.999 and cosine(two[-1], ref) > 0.999


@pytest.mark.parametrize("readout,loss", READOUTS)
def test_ep_on_the_hard_sigmoid_tends_to_rbp(readout, loss):
    """With the force inside the clamp a saturated unit stays saturated under a weak nudge, as its
    gradient says; added outside, a saturated output would move by O(β) and bias the update."""
    net = tiny_hopfield("hard_sigmoid", readout)
    x, y = batch()
    ref = rbp_grads(net, x, y, loss)
    for cls in (EP, EPCentered):
        assert cosine(ep_grads(cls, net, x, y, loss, 1e-3), ref) > 0.999


def test_update_is_the_batch_mean_and_reaches_grad():
    """The update is on the scale of rbp's gradient of the batch-mean loss (the mean of per-sample
    estimates), accumulated into .grad like backward()."""
    net = tiny_hopfield("sigmoid")
    x, y = batch()
    m = EP(loss="mse", beta=1e-3, solver=TIGHT)
    single = [m.gradients(net, *m._inputs(net, x[i:i + 1], y[i:i + 1])).grads for i in range(4)]
    out = m(net, x, y)
    for n, g in out.grads.items():
        assert torch.allclose(g, sum(s[n] for s in single) / 4, atol=1e-9)
    assert torch.allclose(net.W[1].grad, out.grads["W.1"])
    assert out.loss == pytest.approx(float(0.5 * (m.predict(net, x) - F.one_hot(y, 3)).pow(2).sum(-1).mean()))
    assert out.accuracy == pytest.approx(float((m.predict(net, x).argmax(-1) == y).double().mean()))
    assert {"iterations_free", "iterations_nudged", "converged_nudged"} <= set(out.stats)
    centered = EPCentered(loss="mse", beta=1e-3, solver=TIGHT)(net, x, y)
    assert "converged_nudged_neg" in centered.stats
    assert not EPCentered(loss="mse").settled({**centered.stats, "converged_nudged_neg": False})


# --- the other methods train the system ------------------------------------------------------------------
@pytest.mark.parametrize("readout", ["layer", "linear"])
@pytest.mark.parametrize("name,settings", [
    ("rbp", {}), ("bptt", {"steps": 200}), ("lcp-di", {"k_i": 0.05}), ("lcp-ebd", {"ff_init": True}),
    ("ep", {}), ("ep-centered", {})], ids=["rbp", "bptt", "lcp-di", "lcp-ebd", "ep", "ep-centered"])
def test_a_small_step_of_each_method_lowers_the_loss(name, settings, readout):
    net = tiny_hopfield("tanh", readout)
    x, y = batch(B=16)
    # The tanh network's dynamics chatter under full Euler steps: every settling phase takes dt 0.5.
    phase = "free" if name == "lcp-ebd" else "solver"   # lcp-ebd's controlled phase is its own descent
    method = get_method(name, **settings, **{phase: Euler(dt=0.5, max_steps=4000)})
    before = method(net, x, y)
    assert method.settled(before.stats), before.stats
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.05 * p.grad / max(1.0, float(p.grad.norm()))
    assert method(net, x, y).loss < before.loss


# --- bad input names the fix ----------------------------------------------------------------------------
def test_bad_settings_and_systems_name_the_fix():
    for beta in (0, 0.0, -0.5):
        with pytest.raises(ConfigError, match=r"beta must be > 0.*method\.beta"):
            EP(beta=beta)
    with pytest.raises(ConfigError, match="beta"):
        EPCentered(beta=float("nan"))
    with pytest.raises(ConfigError, match="energy-based system.*--model hopfield"):
        EP()(tiny_rnn(), *batch())
    with pytest.raises(ConfigError, match="energy-based system.*--model hopfield"):
        train(TrainConfig.from_tree({"model": {"name": "rnn", "hidden": 8}, "method": {"name": "ep"},
                                     "data": {"limit_train": 16}, "output": {"progress": False}}))
    # Scellier & Bengio's squared error is the default on their network; cross-entropy elsewhere.
    assert method_from_dict({"name": "ep"}, model="hopfield").loss == "mse"
    assert method_from_dict({"name": "ep-centered"}, model="hopfield-readout").loss == "cross_entropy"
    assert get_method("ep-centered", beta=0.2).beta == 0.2


def test_command_line_trains_hopfield_with_ep(capsys):
    code = main(["train", "--model", "hopfield", "--method", "ep", "--set", 'method.loss="mse"', "--limit-train", "64",
                 "--limit-test", "32", "--epochs", "1", "--hidden", "16", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert main(["train", "--model", "rnn", "--method", "ep", "--limit-train", "64", "--epochs", "1", "--quiet"]) == 2
    assert "--model hopfield" in capsys.readouterr().err


# --- it learns ------------------------------------------------------------------------------------------
def test_ep_learns_digits():
    """Three epochs on 1024 bundled digits, hidden 32, squared error on the output layer (float32)."""
    result = train(TrainConfig.from_tree({
        "model": {"name": "hopfield", "hidden": 32}, "method": {"name": "ep"},
        "loop": {"epochs": 3, "lr": 1e-2}, "data": {"limit_train": 1024}, "output": {"progress": False, "log": False}}))
    assert result["test_accuracy"] > 0.8, result["history"]
    assert result["converged_fraction"] > 0.9


def test_random_sign_nudges_either_way_and_the_two_average_to_the_centered_update():
    net, (x, y) = tiny_hopfield("sigmoid", "layer"), batch()
    one_sided = EP(loss="mse", beta=0.05, solver=TIGHT)
    plus = one_sided.gradients(net, *one_sided._inputs(net, x, y)).grads
    method = EP(loss="mse", beta=0.05, random_sign=True, solver=TIGHT)
    signs, minus = [], None
    for seed in range(8):
        torch.manual_seed(seed)
        g = method.gradients(net, *method._inputs(net, x, y)).grads
        signs.append(all(torch.equal(g[k], plus[k]) for k in g))
        minus = g if not signs[-1] else minus
    assert True in signs and False in signs   # both signs drawn in 8 batches
    centered = EPCentered(loss="mse", beta=0.05, solver=TIGHT)
    both = centered.gradients(net, *centered._inputs(net, x, y)).grads
    for k in both:   # (g(+β) + g(−β)) / 2 = (∂E(s^+β) − ∂E(s^−β)) / 2β, the centered estimate
        assert torch.allclose((plus[k] + minus[k]) / 2, both[k], rtol=1e-8, atol=1e-12), k
    with pytest.raises(ConfigError, match="random_sign is a setting of ep"):
        EPCentered(random_sign=True)
