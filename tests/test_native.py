"""The Euler steps in C (native=True) against the fields written from their equations."""
import shutil

import pytest
import torch

from leastcontrol import native
from leastcontrol.cli import build_parser
from leastcontrol.errors import ConfigError, SolverDivergedError
from leastcontrol.methods import get_method
from leastcontrol.train import TrainConfig

from .helpers import F64, batch, rel_err, tiny_ff, tiny_rnn

pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
                                reason="native=True needs a C compiler")


@pytest.fixture(autouse=True, scope="module")
def _private_build_cache(tmp_path_factory):
    """Build the kernels into a cache of this test module's own, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        native.library.cache_clear()
        yield
    native.library.cache_clear()


def controlled_field(net, z, drive, target, alpha, k_i, k_p, inv_B, loss, feedback=None):
    """ż of LCP's controlled dynamics on z = [v | o | e | u_int], from docs/LCP.md §3 (no library code)."""
    H, K = net.n_hidden, net.n_out
    N = H + K
    v, o, e, u_int = z[:, :H], z[:, H:N], z[:, N:N + H], z[:, N + H:]
    r = torch.tanh(v)
    grad_o = ((torch.softmax(o, 1) if loss == "cross_entropy" else o) - target) * inv_B
    u = k_i * u_int - k_p * grad_o
    f_v = r @ net.W.T + drive[:, :H] - v
    f_o = r @ net.D.T + drive[:, H:] - o
    W_back, D_back = (net.W, net.D) if feedback is None else feedback
    e_dot = (1 - r ** 2) * (e @ W_back + u @ D_back) - e
    return torch.cat([f_v + e, f_o + u, e_dot, -(grad_o + alpha * u_int)], 1)


def euler_reference(net, z, drive, target, n, settings, groups):
    """n Euler steps (dt 1) of :func:`controlled_field` and the relative residual of the last one."""
    for _ in range(n):
        g = controlled_field(net, z, drive, target, **settings)
        z_prev, z = z, z + g
    if groups is None:
        res = g.norm(dim=1) / z_prev.norm(dim=1)
    else:
        res = torch.stack([gp.norm(dim=1) / zp.norm(dim=1)
                           for gp, zp in zip(g.split(groups, 1), z_prev.split(groups, 1))]).amax(0)
    return z, res


@pytest.mark.parametrize("B", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_native_steps_follow_the_controlled_field(B, loss):
    """Every tile shape of the C loop (1, 2, 4 samples and remainders; widths that are no multiple of
    a vector) gives the field's Euler iterates and residual to 1e-12 in float64."""
    net = tiny_rnn(n_hidden=21, n_out=4)
    x, y = batch(n_in=5, n_out=4, B=B, seed=B)
    op = net.flat_operator()
    g = torch.Generator().manual_seed(B)
    target = torch.nn.functional.one_hot(y, 4).to(F64) if loss == "cross_entropy" else torch.rand(B, 4, generator=g, dtype=F64)
    settings = dict(alpha=0.7, k_i=3.0, k_p=0.5, inv_B=1 / 7, loss=loss)
    steps = native.ControlledSteps(op, **settings)
    with torch.no_grad():
        drive = op.drive(net.prepare_input(x))
        z0 = torch.randn(B, 2 * op.n_state, generator=g, dtype=F64)
        for groups in (None, steps.groups):
            z, res = steps(z0, {"drive": drive, "target": target}, 1.0, 7, groups)
            z_ref, res_ref = euler_reference(net, z0, drive, target, 7, settings, None if groups is None else list(groups))
            assert (z - z_ref).abs().max() / z_ref.abs().max() < 1e-12
            assert (res - res_ref).abs().max() / res_ref.abs().max() < 1e-12
    assert torch.equal(z0, z0.clone())   # the start is not modified


@pytest.mark.parametrize("B", [1, 3, 6])
def test_native_free_and_adjoint_steps_follow_their_fields(B):
    """The free dynamics ṡ = f(s) and RBP's adjoint λ̇ = −λ + [φ'(v°) ⊙ (λ_v W + λ_o D) | 0] + ∇_s L."""
    net = tiny_rnn(n_hidden=19, n_out=3)
    x, _ = batch(B=B, seed=B)
    op = net.flat_operator()
    H = net.n_hidden
    g = torch.Generator().manual_seed(B)
    with torch.no_grad():
        drive = op.drive(net.prepare_input(x))
        s0 = torch.randn(B, op.n_state, generator=g, dtype=F64)
        s, res = native.FreeSteps(op)(s0, {"drive": drive}, 0.5, 6, None)
        s_ref = s0
        for _ in range(6):
            r = torch.tanh(s_ref[:, :H])
            f = torch.cat([r @ net.W.T, r @ net.D.T], 1) + drive - s_ref
            s_prev, s_ref = s_ref, s_ref + 0.5 * f
        assert (s - s_ref).abs().max() < 1e-12
        assert (res - 0.5 * f.norm(dim=1) / s_prev.norm(dim=1)).abs().max() < 1e-12
        slope = 1 - torch.tanh(s0[:, :H]) ** 2
        dL = torch.randn(B, op.n_state, generator=g, dtype=F64)
        lam, _ = native.AdjointSteps(op)(torch.zeros_like(dL), {"lin": slope, "dL": dL, "drive": drive}, 1.0, 6, None)
        lam_ref = torch.zeros_like(dL)
        for _ in range(6):
            back = torch.cat([slope * (lam_ref[:, :H] @ net.W + lam_ref[:, H:] @ net.D), torch.zeros(B, 3, dtype=F64)], 1)
            lam_ref = lam_ref + back - lam_ref + dL
        assert (lam - lam_ref).abs().max() < 1e-12


def test_native_steps_use_the_feedback_weights():
    """With Kolen-Pollack feedback the way back reads B and D̃, not the transposes."""
    net = tiny_rnn()
    method = get_method("lcp-kp")
    method.prepare(net, torch.Generator().manual_seed(0))
    feedback = method._feedback(net)
    op = net.flat_operator(feedback)
    x, y = batch(B=3)
    target = torch.nn.functional.one_hot(y, 3).to(F64)
    settings = dict(alpha=1.0, k_i=2.0, k_p=0.0, inv_B=1 / 3, loss="cross_entropy")
    with torch.no_grad():
        drive = op.drive(net.prepare_input(x))
        z0 = torch.randn(3, 2 * op.n_state, dtype=F64)
        z, _ = native.ControlledSteps(op, **settings)(z0, {"drive": drive, "target": target}, 1.0, 5, None)
        back = tuple(net.pathway(name, getattr(net, name), feedback) for name in ("W", "D"))
        z_ref, _ = euler_reference(net, z0, drive, target, 5, settings, None)
        z_kp = z0
        for _ in range(5):
            z_kp = z_kp + controlled_field(net, z_kp, drive, target, **settings, feedback=back)
    assert (z - z_kp).abs().max() < 1e-12
    assert (z - z_ref).abs().max() > 1e-6   # the feedback weights are not the transposes


@pytest.mark.parametrize("kind", ["lcp-di", "lcp-kp", "rbp"])
def test_native_gives_the_pytorch_update(kind):
    """native=True: the same update and step counts, free phase and second phase, as the PyTorch steps,
    whether every step runs in C (to max_iter, no freezing) or only the tail does (to a tolerance,
    samples freezing one by one)."""
    net = tiny_rnn()
    x, y = batch(B=6)
    gains = {"alpha": 0.5, "k_i": 2.0, "k_p": 0.3} if kind != "rbp" else {}
    # To max_iter; to a tolerance; and under the stall rule, with a controller so slow (leak 0.002)
    # that every sample's residual falls by less than 10 % in 20 steps, far above rounding.
    for settings, native_batch in (({**gains, "tol": 0.0, "max_iter": 37}, 64),
                                   ({**gains, "tol": 1e-9, "max_iter": 400}, 3),
                                   ({**gains, "tol": 1e-6, "max_iter": 47}, 5),   # some settle, some reach max_iter
                                   *([({"alpha": 0.002, "k_i": 0.02, "tol": 1e-30, "warm_start_tol": 1e-8, "max_iter": 600,
                                        "patience": 20}, 4)]
                                     if kind != "rbp" else [])):
        outs = []
        for use_native in (False, True):
            method = get_method(kind, native=use_native, solver_options={"native_batch": native_batch}, **settings)
            method.prepare(net, torch.Generator().manual_seed(0))
            outs.append(method.gradients(net, x, y))
        plain, fast = outs
        assert rel_err(fast.grads, plain.grads) < 1e-10
        assert fast.stats.keys() == plain.stats.keys()
        for key, value in plain.stats.items():   # counts and flags exactly; residuals to rounding
            if "residual" in key or key == "control_norm":
                assert fast.stats[key] == pytest.approx(value, rel=1e-6, abs=1e-14), key
            else:
                assert fast.stats[key] == value, key
    if kind != "rbp":
        assert plain.stats["stalled_fraction_controlled"] == 1.0 and plain.stats["iterations_controlled"] < 600


@pytest.mark.parametrize("mix, native_batch", [
    ({"anderson_memory": 3, "anderson_after": 20}, 3),   # mixing starts in PyTorch, the memory goes to C
    ({"anderson_memory": 4, "anderson_after": 30, "restart": 1.001, "anderson_restarts": 2}, 64),   # returns
    ({"anderson_memory": 4, "anderson_after": 30, "restart": 1.001, "anderson_restarts": 0}, 5),    # mixing stops
])
def test_native_check_level_mix_gives_the_pytorch_update(mix, native_batch):
    """Euler's check-level Anderson mix run inside the C loop gives the PyTorch mix's update and counts,
    on a slow controller where the mix halves the steps and samples jump past the restart factor."""
    net = tiny_rnn(w_scale=1.6)
    x, y = batch(B=6)
    settings = {"alpha": 0.05, "k_i": 0.2, "tol": 1e-9, "max_iter": 800}
    plain_euler = get_method("lcp-di", **settings).gradients(net, x, y)
    outs = [get_method("lcp-di", native=n, solver_options={**mix, "native_batch": native_batch}, **settings)
            .gradients(net, x, y) for n in (False, True)]
    assert outs[0].stats["iterations"] < plain_euler.stats["iterations"]   # the mix is doing something
    assert rel_err(outs[1].grads, outs[0].grads) < 1e-8
    for key in ("iterations", "sample_iterations", "iterations_controlled", "converged_fraction_controlled"):
        assert outs[1].stats[key] == outs[0].stats[key], key


def test_native_steps_without_freezing_give_the_pytorch_update():
    """Euler(freeze=False): the C steps run check by check on the whole batch (no per-sample stops)."""
    net = tiny_rnn()
    x, y = batch(B=5)
    outs = [get_method("lcp-di", native=n, tol=1e-8, solver_options={"freeze": False, "native_batch": 64})
            .gradients(net, x, y) for n in (False, True)]
    assert rel_err(outs[1].grads, outs[0].grads) < 1e-10
    assert outs[1].stats["iterations_controlled"] == outs[0].stats["iterations_controlled"]


def test_native_float32_agrees_with_pytorch_to_rounding():
    net = tiny_rnn().float()
    x, y = batch(B=4)
    grads = [get_method("lcp-di", native=n, tol=1e-5, solver_options={"native_batch": 64}).gradients(net, x.float(), y).grads
             for n in (False, True)]
    assert rel_err(grads[1], grads[0]) < 1e-4


def test_native_reports_a_diverging_solve():
    net = tiny_rnn()
    with torch.no_grad():
        net.W.mul_(400.0)
        net.D.mul_(1e300)
    x, y = batch(B=2)
    with pytest.raises(SolverDivergedError):
        get_method("lcp-di", native=True, tol=0.0, max_iter=50, solver_options={"native_batch": 64}).gradients(net, x, y)


def test_native_residual_is_nan_where_the_state_is_not_finite():
    net = tiny_rnn()
    op = net.flat_operator()
    steps = native.ControlledSteps(op, "cross_entropy", 1.0, 1.0, 0.0, 0.5)
    z = torch.zeros(2, 2 * op.n_state, dtype=F64)
    z[1, 0] = float("inf")
    ctx = {"drive": torch.zeros(2, op.n_state, dtype=F64), "target": torch.zeros(2, 3, dtype=F64)}
    _, res = steps(z, ctx, 1.0, 2, steps.groups)
    assert torch.isfinite(res[0]) and torch.isnan(res[1])


def test_native_settings_fail_early_and_name_the_fix():
    with pytest.raises(ConfigError, match="True or False"):
        get_method("lcp-di", native="yes")
    with pytest.raises(ConfigError, match="solver 'anderson'"):
        get_method("lcp-di", native=True, solver="anderson")
    with pytest.raises(ConfigError, match="impl 'autograd'"):
        get_method("lcp-di", native=True, impl="autograd")
    with pytest.raises(ConfigError, match="LCP-LF"):
        get_method("lcp-lf", native=True)
    with pytest.raises(ConfigError, match="native_batch"):
        get_method("lcp-di", solver_options={"native_batch": -1})
    x, y = batch(B=2)
    with pytest.raises(ConfigError, match="recurrent network"):
        get_method("lcp-di", native=True).gradients(tiny_ff(), x, y)
    args = build_parser().parse_args(["train", "--method", "lcp-di", "--native"])
    assert args.native is True
    assert TrainConfig(method="lcp-di", native=True).build_method().native is True


def test_native_build_failures_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))   # nothing built there yet
    native.library.cache_clear()
    try:
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        with pytest.raises(ConfigError, match="no C compiler"):
            native.library()
        monkeypatch.setenv("CC", shutil.which("false", path="/usr/bin:/bin") or "false")
        with pytest.raises(ConfigError, match="failed.*run without native"):
            native.library()
        assert not list(tmp_path.rglob("*.so*"))   # no partial library left behind
    finally:
        native.library.cache_clear()


def test_native_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    try:
        native.library()
        built = list(tmp_path.rglob("rnn-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        native.library()
        assert built[0].stat().st_mtime_ns == stamp   # loaded, not rebuilt
    finally:
        native.library.cache_clear()


def test_bench_times_native_rows_on_the_cpu_and_leaves_them_out_elsewhere():
    from leastcontrol.bench import BenchConfig, Row, default_rows, rows_for_device, run_bench
    rows = default_rows()
    native_rows = [r for r in rows if r.options.get("native")]
    assert native_rows and rows_for_device(rows, "cpu") == rows
    assert rows_for_device(rows, "cuda") == [r for r in rows if r not in native_rows]
    config = BenchConfig(batch_size=8, hidden=8, batches=2, warmup=1, pretrain=1, memory=False, progress=False)
    result = run_bench(config, [Row("rnn", "rbp", options={"native": True}, label="rbp-native"),
                                Row("rnn", "lcp-di", options={"native": True}, label="lcp-di-native")])
    assert [r["solver"] for r in result["rows"]] == ["euler+native"] * 2
    assert all(r["seconds_per_batch_median"] > 0 for r in result["rows"])


def test_native_steps_refuse_tensors_unlike_the_weights():
    net = tiny_rnn()
    op = net.flat_operator()
    steps = native.FreeSteps(op)
    z = torch.zeros(2, op.n_state)   # float32 beside float64 weights
    with pytest.raises(ConfigError, match="float64 on the CPU"):
        steps(z, {"drive": torch.zeros(2, op.n_state, dtype=F64)}, 1.0, 3, None)
    with pytest.raises(ConfigError, match="do not fit"):
        steps(torch.zeros(2, op.n_state + 1, dtype=F64), {"drive": torch.zeros(2, op.n_state, dtype=F64)}, 1.0, 3, None)
