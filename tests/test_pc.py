"""Predictive coding (pc) and incremental predictive coding (ipc) against independent references (float64).

The references write PC's energy out layer by layer for the 5-6-4-3 tanh network and differentiate
it with autograd: nothing of the library's energy, fields or VJPs is used by them.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leastcontrol.errors import ConfigError
from leastcontrol.methods import BP, IPC, LCPEBD, PC, get_method, method_from_dict
from leastcontrol.solvers import Adam, Euler
from leastcontrol.train import TrainConfig, train

from .helpers import F64, batch, cosine, rel_err, tiny_ff, tiny_rnn

SIZES = (5, 6, 4, 3)
# Far past convergence on this net (the energy's curvature is O(1)): the minimum to float64 precision.
CONVERGED = Euler(dt=0.5, tol=0.0, max_steps=800)


def net_and_batch(seed=1):
    return tiny_ff(sizes=SIZES, seed=seed), *batch(n_in=5, n_out=3, B=4)


def grads_of(method, net, x, y):
    return method.gradients(net, *method._inputs(net, x, y))


# --- the oracle: PC's energy written out ----------------------------------------------------------------
def energy(P, x, y, hidden, o, beta, output="nudged", loss="cross_entropy"):
    """``Σ_l ½‖h_l − μ_l‖² + (½‖o − μ_o‖² + β L(o)  |  β L(μ_o))``, summed over the batch, L its mean."""
    mus = [x @ P["U"].T + P["b"], torch.tanh(hidden[0]) @ P["W.0"].T + P["b_W.0"]]
    mu_o = torch.tanh(hidden[1]) @ P["D"].T + P["c"]
    F_ = 0.5 * sum(((h - m) ** 2).sum() for h, m in zip(hidden, mus))

    def L(out):
        return F.cross_entropy(out, y) if loss == "cross_entropy" else 0.5 * ((out - y) ** 2).sum(1).mean()
    if output == "nudged":
        return F_ + 0.5 * ((o - mu_o) ** 2).sum() + beta * L(o)
    return F_ + beta * L(mu_o)


def feedforward(P, x):
    h1 = x @ P["U"].T + P["b"]
    h2 = torch.tanh(h1) @ P["W.0"].T + P["b_W.0"]
    return [h1, h2], torch.tanh(h2) @ P["D"].T + P["c"]


def params_of(net):
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def oracle_update(net, x, y, beta, output="nudged", loss="cross_entropy"):
    """``(1/β) ∇_θ F`` at the minimum of ``F`` in the states (L-BFGS from the feedforward pass)."""
    P = {n: p.requires_grad_(True) for n, p in params_of(net).items()}
    with torch.no_grad():
        hidden, o = feedforward(P, x)
    states = [s.clone().requires_grad_(True) for s in hidden + ([o] if output == "nudged" else [])]
    opt = torch.optim.LBFGS(states, lr=1, max_iter=2000, tolerance_grad=1e-15, tolerance_change=1e-20,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        e = energy(P, x, y, states[:2], states[2] if output == "nudged" else None, beta, output, loss)
        e.backward()
        return e
    for _ in range(3):
        opt.step(closure)
    e = energy(P, x, y, [s.detach() for s in states[:2]], states[2].detach() if output == "nudged" else None,
               beta, output, loss)
    names = list(P)
    return {n: g / beta for n, g in zip(names, torch.autograd.grad(e, [P[n] for n in names]))}


# --- 1. at the minimum: LCP-EBD's update, and the energy's gradient -----------------------------------
@pytest.mark.parametrize("beta", [0.1, 10.0])
def test_at_the_minimum_pc_is_lcp_ebd_over_beta_and_the_gradient_of_the_energy(beta):
    net, x, y = net_and_batch()
    pc = grads_of(PC(beta=beta, inference=CONVERGED), net, x, y)
    ebd = grads_of(LCPEBD(alpha=1.0 / beta, ff_init=True, controlled=CONVERGED), net, x, y)
    assert rel_err({k: beta * g for k, g in pc.grads.items()}, ebd.grads) < 1e-12
    assert rel_err(pc.grads, oracle_update(net, x, y, beta)) < 1e-6    # L-BFGS's minimum: ~1e-8 off
    assert pc.stats["iterations_inference"] == 800 and "energy" in pc.stats


def test_the_update_is_minus_error_times_presynaptic_rate_over_beta():
    """``∇W_l = −(1/β) Σ_batch ε_l φ(v_{l−1})ᵀ`` with ``ε = v − μ`` read off the state inference reached."""
    net, x, y = net_and_batch()
    beta = 0.5
    method = PC(beta=beta, inference=Euler(dt=0.2, tol=0.0, max_steps=7))   # anywhere, not only at the minimum
    out = grads_of(method, net, x, y)
    s = method.infer(net, x, y).state
    h1, h2 = net.blocks(s["v"])
    e1 = h1 - (x @ net.U.T + net.b)
    e2 = h2 - (torch.tanh(h1) @ net.W[0].T + net.b_W[0])
    eo = s["o"] - (torch.tanh(h2) @ net.D.T + net.c)
    expected = {"U": -e1.T @ x, "b": -e1.sum(0), "W.0": -e2.T @ torch.tanh(h1), "b_W.0": -e2.sum(0),
                "D": -eo.T @ torch.tanh(h2), "c": -eo.sum(0)}
    assert rel_err(out.grads, {k: v.detach() / beta for k, v in expected.items()}) < 1e-12


# --- 2. the weak-nudge limit is backprop; a strong nudge is not ----------------------------------------
@pytest.mark.parametrize("output", ["nudged", "clamped"])
def test_weak_nudge_gives_backprop_and_a_strong_one_does_not(output):
    net, x, y = net_and_batch()
    bp = grads_of(BP(), net, x, y).grads
    betas = [10.0, 1.0, 1e-1, 1e-2, 1e-3]
    res = [grads_of(PC(beta=b, output=output, inference=CONVERGED), net, x, y).grads for b in betas]
    cos = [cosine(g, bp) for g in res]
    err = [rel_err(g, bp) for g in res]
    # Measured on this net: cosine 0.924 (nudged) / 0.758 (clamped) at β = 10, 1 − 2.5e-9 at β = 1e-3
    # (relative error 1.1e-4 / 7.2e-5); the error falls tenfold per tenfold in β (O(β)).
    assert cos[-1] > 1 - 1e-7 and err[-1] < 5e-4
    assert cos[0] < 0.97
    assert all(a > 5 * b for a, b in zip(err[1:], err[2:])), err


def test_clamped_squared_error_with_beta_the_batch_size_is_the_output_clamped_to_the_target():
    """Supervised PC of the literature: ``v_L = y``, energy ``Σ_l ½‖ε_l‖² + ½‖y − μ_L‖²`` per sample."""
    net, x, _ = net_and_batch()
    y = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    B = x.shape[0]
    out = grads_of(PC(beta=float(B), output="clamped", loss="mse", inference=CONVERGED), net, x, y)
    P = {n: p.requires_grad_(True) for n, p in params_of(net).items()}
    with torch.no_grad():
        hidden, _ = feedforward(P, x)
    hidden = [h.clone().requires_grad_(True) for h in hidden]

    def literal(hs):   # the output clamped: its prediction error is y − μ_L
        mus = [x @ P["U"].T + P["b"], torch.tanh(hs[0]) @ P["W.0"].T + P["b_W.0"]]
        mu_o = torch.tanh(hs[1]) @ P["D"].T + P["c"]
        return 0.5 * sum(((h - m) ** 2).sum() for h, m in zip(hs, mus)) + 0.5 * ((y - mu_o) ** 2).sum()
    opt = torch.optim.LBFGS(hidden, lr=1, max_iter=2000, tolerance_grad=1e-15, tolerance_change=1e-20,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        e = literal(hidden)
        e.backward()
        return e
    for _ in range(3):
        opt.step(closure)
    e = literal([h.detach() for h in hidden])
    ref = dict(zip(P, (g / B for g in torch.autograd.grad(e, list(P.values())))))
    assert rel_err(out.grads, ref) < 1e-8


def test_the_inference_rule_is_a_solver_setting():
    """Adam on the energy reaches the same minimum (a strong nudge, where Adam's floor does not matter)."""
    net, x, y = net_and_batch()
    euler = grads_of(PC(beta=10.0, inference=CONVERGED), net, x, y).grads
    adam = grads_of(PC(beta=10.0, inference=Adam(lr=1e-3, tol=0.0, max_steps=4000)), net, x, y).grads
    assert cosine(adam, euler) > 0.999
    table = method_from_dict({"name": "pc", "inference": {"dt": 0.05, "max_steps": 7}})
    assert table.inference == PC().inference.replace(dt=0.05, max_steps=7)
    assert table.settling_phases() == {"free": table.free}   # a fixed budget is no solve that must settle


def test_pc_runs_on_the_conv_feedforward_net_and_through_the_reference_path():
    from leastcontrol.systems import ConvFeedforwardEquilibrium
    net = ConvFeedforwardEquilibrium((1, 8, 8), 3, channels=(2, 3, 4), fc=6, dtype=F64,
                                     generator=torch.Generator().manual_seed(0))
    x, y = batch(n_in=64, n_out=3, B=4)
    bp = grads_of(BP(), net, x, y).grads
    pc = grads_of(PC(beta=1e-3, inference=Euler(dt=0.3, tol=0.0, max_steps=1500)), net, x, y).grads
    assert cosine(pc, bp) > 1 - 1e-7                      # measured: 1 − 1.3e-9
    ff, x, y = net_and_batch()
    fast = grads_of(PC(beta=0.5), ff, x, y).grads
    assert rel_err(grads_of(PC(beta=0.5, impl="autograd"), ff, x, y).grads, fast) < 1e-12


# --- 3. incremental PC -----------------------------------------------------------------------------------
def ipc_reference(net, x, y, beta, dt, T, eta):
    """iPC written out: a state step of ``−dt ∇_s F``, then a weight step of ``−η ∇_θ F / B`` at the new state.
    Returns ``(Σ_t (1/β) ∇_θ F_t, θ_T)``."""
    P = params_of(net)
    with torch.no_grad():
        hidden, o = feedforward(P, x)
    states = hidden + [o]
    total = {n: torch.zeros_like(p) for n, p in P.items()}
    for _ in range(T):
        s = [t.clone().requires_grad_(True) for t in states]
        gs = torch.autograd.grad(energy(P, x, y, s[:2], s[2], beta), s)
        states = [t - dt * g for t, g in zip(states, gs)]
        W = {n: p.clone().requires_grad_(True) for n, p in P.items()}
        gw = dict(zip(W, torch.autograd.grad(energy(W, x, y, states[:2], states[2], beta), list(W.values()))))
        for n in P:
            total[n] += gw[n] / beta
            P[n] = P[n] - eta * gw[n] / x.shape[0]
    return total, P


def test_ipc_follows_its_equations_and_an_sgd_step_of_inner_lr_beta_over_b_lands_on_its_weights():
    net, x, y = net_and_batch()
    beta, dt, T, eta = 2.0, 0.3, 6, 0.4
    before = params_of(net)
    out = IPC(beta=beta, inner_lr=eta, inference=Euler(dt=dt, tol=0.0, max_steps=T))(net, x, y)
    total, theta_T = ipc_reference(net, x, y, beta, dt, T, eta)
    assert rel_err(out.grads, total) < 1e-12
    # The weight steps were undone: the model is where it was, bit for bit; the update is in .grad.
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    torch.optim.SGD(net.parameters(), lr=eta * beta / x.shape[0]).step()
    assert rel_err(params_of(net), theta_T) < 1e-12
    assert out.stats["iterations_inference"] == T
    # And the weights moved enough during inference for that to matter.
    frozen = grads_of(IPC(beta=beta, inner_lr=0.0, inference=Euler(dt=dt, tol=0.0, max_steps=T)), net, x, y)
    assert rel_err(frozen.grads, out.grads) > 1e-3


def test_ipc_with_one_step_is_pc_with_one_step():
    net, x, y = net_and_batch()
    one = Euler(dt=0.3, tol=0.0, max_steps=1)
    pc = grads_of(PC(beta=0.5, inference=one), net, x, y)
    for eta in (1e-6, 0.3):
        ipc = grads_of(IPC(beta=0.5, inner_lr=eta, inference=one), net, x, y)
        assert rel_err(ipc.grads, pc.grads) < 1e-14


@pytest.mark.parametrize("output", ["nudged", "clamped"])
def test_ipc_with_frozen_weights_sums_pc_along_its_inference(output):
    net, x, y = net_and_batch()
    T = 5
    ipc = grads_of(IPC(beta=0.5, output=output, inner_lr=0.0, inference=Euler(dt=0.3, tol=0.0, max_steps=T)),
                   net, x, y)
    pcs = [grads_of(PC(beta=0.5, output=output, inference=Euler(dt=0.3, tol=0.0, max_steps=t)), net, x, y).grads
           for t in range(1, T + 1)]
    assert rel_err(ipc.grads, {k: sum(g[k] for g in pcs) for k in pcs[0]}) < 1e-12
    solver = Euler(dt=0.3, tol=0.0, max_steps=T)
    a = IPC(beta=0.5, output=output, inner_lr=0.0, inference=solver).infer(net, x, y).state
    b = PC(beta=0.5, output=output, inference=solver).infer(net, x, y).state
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-14) for k in b)


def test_ipc_settings_are_checked_and_a_weight_step_too_large_names_inner_lr():
    with pytest.raises(ConfigError, match="inference.name"):
        IPC(inference=Adam(tol=0.0, max_steps=10))
    with pytest.raises(ConfigError, match="inference.tol = 0"):
        IPC(inference={"tol": 1e-6})
    with pytest.raises(ConfigError, match="inner_lr"):
        IPC(inner_lr=-1.0)
    from leastcontrol.errors import SolverDivergedError
    net, x, y = net_and_batch()
    with pytest.raises(SolverDivergedError, match="ipc inference.*inner_lr"):
        IPC(inner_lr=1e6, inference=Euler(dt=0.1, tol=0.0, max_steps=60))(net, x, y)
    assert all(p.grad is None for p in net.parameters())


# --- 4. bad input, the command line, and learning ------------------------------------------------------
def test_bad_settings_and_systems_are_refused_naming_the_fix():
    for name in ("pc", "ipc"):
        with pytest.raises(ConfigError, match="beta must be a finite number > 0, got 0"):
            get_method(name, beta=0)
        with pytest.raises(ConfigError, match="unknown output 'soft'; valid: nudged, clamped"):
            get_method(name, output="soft")
        with pytest.raises(ConfigError, match=f"{name} needs a layered system: --model ff"):
            get_method(name)(tiny_rnn(), *batch())
    with pytest.raises(ConfigError, match="alpha is a setting of .*not of pc"):
        method_from_dict({"name": "pc", "alpha": 0.1})
    with pytest.raises(ConfigError, match="pc needs a layered system: --model ff"):
        train(TrainConfig.from_tree({"model": {"name": "rnn"}, "method": {"name": "pc"},
                                     "loop": {"epochs": 1}, "output": {"progress": False}}))


def _cli(*args):
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "leastcontrol", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_command_line_trains_pc_and_refuses_it_on_the_rnn():
    tiny = ["--limit-train", "64", "--limit-test", "32", "--epochs", "1", "--hidden", "16", "--quiet"]
    ok = _cli("train", "--model", "ff", "--method", "pc", *tiny)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "test accuracy" in ok.stdout
    refused = _cli("train", "--model", "rnn", "--method", "pc", *tiny)
    assert refused.returncode == 2 and "pc needs a layered system: --model ff" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("name", ["pc", "ipc"])
def test_pc_learns_the_bundled_digits(name):
    # Measured: 0.939 (pc) and 0.947 (ipc) after 4 epochs (bp: 0.947), about 1.5 s and 3 s on one core.
    result = train(TrainConfig.from_tree({"model": {"name": "ff", "hidden": 32}, "method": {"name": name},
                                          "loop": {"epochs": 4, "lr": 1e-2}, "output": {"progress": False}}))
    assert result["test_accuracy"] > 0.85, result["history"]


# --- 5. the rate form of the layered net: pcx's energy ---------------------------------------------------
def gelu(v):
    return 0.5 * v * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (v + 0.044715 * v ** 3)))


def rate_net(seed=1):
    """The 5-6-4-3 net holding rates, with GELU (tanh approximation): pcx's MLP in miniature."""
    return tiny_ff(sizes=SIZES, seed=seed, activation="gelu", state="rate")


def pcx_energy(P, x, hidden, y):
    """``Σ_l ½‖h_l − φ(W_l h_{l−1} + b_l)‖² + ½‖D h_{L−1} + c − y‖²``, summed over the batch (``h_0 = x``)."""
    mus = [gelu(x @ P["U"].T + P["b"]), gelu(hidden[0] @ P["W.0"].T + P["b_W.0"])]
    out = hidden[1] @ P["D"].T + P["c"]
    return 0.5 * sum(((h - m) ** 2).sum() for h, m in zip(hidden, mus)) + 0.5 * ((out - y) ** 2).sum()


@pytest.mark.parametrize("output", ["nudged", "clamped"])
def test_pc_on_the_rate_form_gelu_net_tends_to_backprop(output):
    """As β → 0 the update tends to the gradient of the hand-written forward pass's mean cross-entropy."""
    net, (x, y) = rate_net(), batch(n_in=5, n_out=3, B=4)
    P = {n: p.requires_grad_(True) for n, p in params_of(net).items()}
    logits = gelu(gelu(x @ P["U"].T + P["b"]) @ P["W.0"].T + P["b_W.0"]) @ P["D"].T + P["c"]
    ref = dict(zip(P, torch.autograd.grad(F.cross_entropy(logits, y), list(P.values()))))
    assert rel_err(grads_of(BP(), net, x, y).grads, ref) < 1e-12
    betas = [1.0, 1e-1, 1e-2, 1e-3]
    res = [grads_of(PC(beta=b, output=output, inference=CONVERGED), net, x, y).grads for b in betas]
    err = [rel_err(g, ref) for g in res]
    # Measured: relative error 0.14 / 0.10 (nudged / clamped) at β = 1, 1.5e-4 / 1.1e-4 at β = 1e-3,
    # where the cosine is 1 − 4.6e-9.
    assert cosine(res[-1], ref) > 1 - 1e-7 and err[-1] < 5e-4, err
    assert all(a > 5 * b for a, b in zip(err, err[1:])), err      # O(β)


def test_clamped_pc_with_squared_error_and_beta_the_batch_size_is_pcx_energy():
    """Inference descends pcx's energy ``E`` in the hidden rates; the update is ``∇_θ E / B`` where it stopped,
    and the reported energy is ``E`` there."""
    from leastcontrol.methods.pc import clamped_energy

    net, (x, labels) = rate_net(), batch(n_in=5, n_out=3, B=4)
    B = x.shape[0]
    y = F.one_hot(labels, 3).to(F64)
    P = params_of(net)
    method = PC(beta=float(B), output="clamped", loss="mse", inference=Euler(dt=0.2, tol=0.0, max_steps=7))

    def grad_E(v):
        v = v.clone().requires_grad_(True)
        return torch.autograd.grad(pcx_energy(P, x, list(net.blocks(v)), y), v)[0]
    # The field at any hidden state is −∇_h E.
    op = net.flat_operator()
    z0 = op.pack(net.init_state(B))
    field, context = clamped_energy(op, method._loss, x, y, float(B), z0)
    v = torch.randn(B, 10, generator=torch.Generator().manual_seed(7), dtype=F64)
    assert torch.allclose(field(v, context), -grad_E(v), atol=1e-13, rtol=0)
    # One step from the feedforward rates is one gradient step on E.
    with torch.no_grad():
        h1 = gelu(x @ P["U"].T + P["b"])
        start = torch.cat([h1, gelu(h1 @ P["W.0"].T + P["b_W.0"])], 1)
    one = PC(beta=float(B), output="clamped", loss="mse", inference=Euler(dt=0.2, tol=0.0, max_steps=1))
    assert torch.allclose(one.infer(net, x, y).state["v"], start - 0.2 * grad_E(start), atol=1e-13, rtol=0)
    # The update where seven steps stopped: ∇_θ E / B by autograd.
    out = grads_of(method, net, x, labels)
    h = method.infer(net, x, y).state["v"]
    W = {n: p.clone().requires_grad_(True) for n, p in P.items()}
    E = pcx_energy(W, x, list(net.blocks(h)), y)
    ref = dict(zip(W, (g / B for g in torch.autograd.grad(E, list(W.values())))))
    assert rel_err(out.grads, ref) < 1e-12
    assert abs(out.stats["energy"] - float(E.detach())) < 1e-12 * float(E.detach())
    assert rel_err({"v": h}, {"v": start}) > 1e-3     # inference moved the state


def test_infer_reads_class_indices_as_training_does():
    """``infer`` validates its targets as ``gradients`` does: class indices are the one-hot rows."""
    from leastcontrol.systems import FeedforwardEquilibrium
    net = FeedforwardEquilibrium([4, 5, 5, 3], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.rand(2, 4, dtype=torch.float64)
    by_index = PC(loss="mse").infer(net, x, torch.tensor([0, 2]))
    by_row = PC(loss="mse").infer(net, x, torch.tensor([[1.0, 0, 0], [0, 0, 1.0]], dtype=torch.float64))
    for k in by_row.state:
        assert torch.equal(by_index.state[k], by_row.state[k])
