"""Convolutional equilibrium systems: the conv feedforward net and the DEQ, against independent references."""
import pytest
import torch

from leastcontrol.methods import BP, LCPDI, RBP
from leastcontrol.solvers import Euler
from leastcontrol.systems import DEQ, ConvFeedforwardEquilibrium
from leastcontrol.errors import ConfigError

from .helpers import F64, cosine, rel_err


def tiny_conv_ff(seed=1):
    return ConvFeedforwardEquilibrium((1, 12, 12), 3, channels=(2, 3, 4), fc=6, dtype=F64,
                                      generator=torch.Generator().manual_seed(seed))


def tiny_deq(seed=1):
    deq = DEQ((2, 8, 8), 3, channels=4, inner=4, groups=2, pool=4, dtype=F64,
              generator=torch.Generator().manual_seed(seed))
    return deq.eval()  # encoder batch norm on running statistics: the drive is a plain function of x


def images(shape, n_out=3, B=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, *shape, generator=g, dtype=F64), torch.randint(0, n_out, (B,), generator=g)


def autograd_grads(net, loss_fn):
    names, params = zip(*net.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss_fn(), params)))


def test_conv_feedforward_equilibrium_is_its_forward_pass():
    net = tiny_conv_ff()
    x, y = images((1, 12, 12))
    state = BP().free_equilibrium(net, x).state
    assert state["h1"].shape == (4, 2, 5, 5) and state["h3"].shape == (4, 4, 2, 2)  # natural shapes
    assert torch.allclose(net.readout(state), net(x), atol=1e-13)
    ref = autograd_grads(net, lambda: torch.nn.functional.cross_entropy(net(x), y))
    assert rel_err(BP()(net, x, y).grads, ref) < 1e-12
    assert rel_err(RBP(solver=Euler(tol=1e-14, max_steps=100))(net, x, y).grads, ref) < 1e-10


def test_deq_rbp_matches_autograd_through_a_long_unrolled_solve():
    net = tiny_deq()
    x, y = images((2, 8, 8))

    def unrolled_loss(steps=300):
        drive = net.encode(net.prepare_input(x))
        s = net.init_state(x.shape[0])
        for _ in range(steps):  # Euler with dt = 1: the fixed-point iteration z ← T(z)
            f = net.dynamics(s, drive)
            s = {k: s[k] + f[k] for k in s}
        return torch.nn.functional.cross_entropy(s["o"], y)

    ref = autograd_grads(net, unrolled_loss)
    out = RBP(solver=Euler(tol=1e-13, max_steps=5000))(net, x, y)
    assert out.stats["converged"]
    assert rel_err(out.grads, ref) < 1e-6


@pytest.mark.parametrize("make,shape", [(tiny_conv_ff, (1, 12, 12)), (tiny_deq, (2, 8, 8))], ids=["conv-ff", "deq"])
def test_weak_control_limit_approaches_rbp(make, shape):
    net = make()
    x, y = images(shape)
    rbp = RBP(solver=Euler(tol=1e-13, max_steps=20000))(net, x, y).grads
    cosines = []
    for k_i in (0.1, 0.03, 0.01):
        m = LCPDI(alpha=0.5, k_i=k_i, solver=Euler(tol=1e-12, max_steps=20000))
        out = m(net, x, y)
        assert out.stats["converged"]
        cosines.append(cosine({k: v / m.beta for k, v in out.grads.items()}, rbp))
    assert cosines[0] < cosines[1] < cosines[2] and cosines[-1] > 0.9999, cosines


def test_deq_readout_statistics_follow_the_free_equilibria():
    net = DEQ((1, 8, 8), 3, channels=4, inner=4, groups=2, pool=4, dtype=F64)
    x, _ = images((1, 8, 8))
    before = net.readout_norm.running_mean.clone()
    net.train()
    state = RBP().free_equilibrium(net, x).state
    assert not torch.allclose(net.readout_norm.running_mean, before)
    net.eval()
    frozen = net.readout_norm.running_mean.clone()
    RBP().free_equilibrium(net, x)
    assert torch.equal(net.readout_norm.running_mean, frozen)  # evaluation leaves them alone
    # Every sample's dynamics are its own: one sample alone settles where it settled in the batch.
    alone = RBP(solver=Euler(tol=1e-12, max_steps=2000)).free_equilibrium(net, x[:1]).state["o"]
    batch = RBP(solver=Euler(tol=1e-12, max_steps=2000)).free_equilibrium(net, x).state["o"][:1]
    assert torch.allclose(alone, batch, atol=1e-8)
    assert state["z"].shape == (4, 4, 8, 8)


def test_conv_systems_need_image_shapes():
    with pytest.raises(ConfigError, match="image input shape"):
        ConvFeedforwardEquilibrium((784,), 10)
    with pytest.raises(ConfigError, match="divisible"):
        DEQ((1, 28, 28), 10, channels=6, groups=4)


def test_anderson_and_broyden_reach_eulers_fixed_point_on_the_deq_in_fewer_iterations():
    from leastcontrol.solvers import get_solver
    net = tiny_deq()
    x, _ = images((2, 8, 8))
    rbp = RBP()
    results = {name: rbp.free_equilibrium(net, x, solver=get_solver(name, tol=1e-10, max_steps=3000))
               for name in ("euler", "anderson", "broyden")}
    for name, res in results.items():
        assert res.stats.converged, name
    for name in ("anderson", "broyden"):
        assert torch.allclose(results[name].state["z"], results["euler"].state["z"], atol=1e-7)
        assert results[name].stats.steps < results["euler"].stats.steps


def test_train_cli_runs_conv_systems_on_a_cifar_format_directory(tmp_path):
    """A CIFAR-format directory, normalised and augmented, through `leastcontrol train` for both conv systems."""
    import json
    import numpy as np
    from leastcontrol.cli import main
    from leastcontrol.data import cifar
    g = np.random.default_rng(0)
    for name in cifar.TRAIN_BATCHES + (cifar.TEST_BATCH,):
        cifar.write_cifar_batch(tmp_path / name, g.integers(0, 256, (4, 3072), dtype=np.uint8), g.integers(0, 10, 4))
    for model, method in (("conv-ff", "bp"), ("deq", "rbp")):
        out = tmp_path / f"{model}.json"
        budget = ["--set", "method.solver.max_steps=5"] if method == "rbp" else []   # bp has no solver
        code = main(["train", "--model", model, "--method", method, "--dataset", "cifar10", "--data-dir", str(tmp_path),
                     "--epochs", "1", "--batch-size", "10", *budget, "--set", "data.augment=true", "--quiet",
                     "--json-out", str(out)])
        assert code == 0
        result = json.loads(out.read_text())
        record = result["history"][-1]
        assert 0.0 <= result["test_accuracy"] <= 1.0
        assert len(record["batch_solver_stats"]) == 2  # 20 images, batches of 10
        iterations, residual, fraction, stalled = record["batch_solver_stats"][0]
        assert iterations > 0
        if method == "rbp":  # two solves, each with its final residual and converged fraction
            assert residual > 0 and 0.0 <= fraction <= 1.0
            assert stalled == 0.0  # no stall rule unless --patience is given


def test_conv_ff_closed_form_vjp_equals_autograd():
    from leastcontrol.systems.base import autograd_dynamics_and_state_vjp
    net = tiny_conv_ff()
    x, _ = images((1, 12, 12))
    drive = net.encode(net.prepare_input(x)).detach()
    g = torch.Generator().manual_seed(4)
    state = {k: torch.randn(4, *s, generator=g, dtype=F64) for k, s in net.population_shapes().items()}
    cot = {k: torch.randn(4, *s, generator=g, dtype=F64) for k, s in net.population_shapes().items()}
    f, back = net.dynamics_and_state_vjp(state, drive, cot)
    f_ref, back_ref = autograd_dynamics_and_state_vjp(net, state, drive, cot)
    for k in back:
        assert torch.allclose(f[k], f_ref[k], atol=1e-12) and torch.allclose(back[k], back_ref[k], atol=1e-10), k


def test_conv_kolen_pollack_with_exact_transposes_is_dynamic_inversion():
    from leastcontrol.methods import LCPKP
    net = tiny_conv_ff()
    x, y = images((1, 12, 12))
    kp = LCPKP(solver=Euler(tol=1e-12, max_steps=5000))
    kp.prepare(net)
    params = dict(net.named_parameters())
    assert net.feedback["conv2"].shape == net.conv2.weight.shape  # a transposed-convolution kernel
    assert net.feedback["fc4"].shape == net.fc4.weight.t().shape
    assert all(kp.alignment(net)[k] < 0.5 for k in net.feedback_pathways())  # random at first
    with torch.no_grad():
        for key, name in net.feedback_pathways().items():
            net.feedback[key].copy_(net.mirror(key, params[name]))
    assert all(abs(v - 1.0) < 1e-12 for v in kp.alignment(net).values())
    out = kp(net, x, y)
    ref = LCPDI(solver=Euler(tol=1e-12, max_steps=5000))(net, x, y)
    for name in params:
        if not name.startswith("feedback."):
            assert torch.allclose(out.grads[name], ref.grads[name], atol=1e-10), name
    # The feedback kernels get the forward kernels' own update (transposed for the dense layers).
    assert torch.equal(out.grads["feedback.conv3"], out.grads["conv3.weight"])
    assert torch.equal(out.grads["feedback.D"], out.grads["readout_layer.weight"].t())


@pytest.mark.parametrize("make,shape,name", [(tiny_conv_ff, (1, 12, 12), "lcp-di"), (tiny_conv_ff, (1, 12, 12), "lcp-kp"),
                                             (tiny_deq, (2, 8, 8), "lcp-di"), (tiny_deq, (2, 8, 8), "rbp")],
                         ids=["conv-ff-lcp-di", "conv-ff-lcp-kp", "deq-lcp-di", "deq-rbp"])
def test_a_small_step_along_the_update_lowers_the_loss(make, shape, name):
    from leastcontrol.methods import get_method
    net = make()
    x, y = images(shape, B=16)
    method = get_method(name)
    method.prepare(net)
    before = method(net, x, y).loss
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
                p.grad = None
    assert method(net, x, y).loss < before


@pytest.mark.parametrize("make,shape", [(tiny_conv_ff, (1, 12, 12)), (tiny_deq, (2, 8, 8))], ids=["conv-ff", "deq"])
def test_amp_keeps_state_control_and_updates_in_fp32(make, shape):
    from leastcontrol.methods.lcp import local_update
    from leastcontrol.train import mixed_precision
    net = make().float()
    x, y = images(shape, B=8)
    x = x.float()
    reference = LCPDI(alpha=1.0, k_i=0.3, solver=Euler(tol=1e-6, max_steps=400, check_every=1))
    ref = reference.controlled_equilibrium(net, x, y)
    ref_update = local_update(net, net.prepare_input(x), ref)
    # bf16 products put a floor near 1e-3 under the residual: the stall rule ends the solve there.
    amp = LCPDI(alpha=1.0, k_i=0.3, solver=Euler(tol=1e-6, max_steps=400, check_every=1, patience=20))
    with mixed_precision(True, torch.device("cpu")):
        ctrl = amp.controlled_equilibrium(net, x, y)
        update = local_update(net, net.prepare_input(x), ctrl)
    assert all(t.dtype == torch.float32 for t in (*ctrl.state.values(), *ctrl.control.values()))
    assert any(not torch.equal(update[k], ref_update[k]) for k in update)  # bf16 did run
    assert cosine({k: v.double() for k, v in update.items()}, {k: v.double() for k, v in ref_update.items()}) > 0.99
    assert ctrl.stats.steps < 400
    net.zero_grad()
    from leastcontrol.methods.base import accumulate_grads
    accumulate_grads(net, {k: v.bfloat16() for k, v in update.items()})
    assert all(p.grad.dtype == torch.float32 for p in net.parameters() if p.grad is not None)
