"""The C steps of the native backend against the fields written from their equations, and whole solves
through the driver against the eager backend."""
import re
import shutil
from pathlib import Path

import pytest
import torch

from leastcontrol import native
from leastcontrol.errors import ConfigError, SolverDivergedError
from leastcontrol.methods import get_method
from leastcontrol.solvers import Anderson, CheckMix, Euler, Field, Status
from leastcontrol.solvers.backends import Native

from .helpers import F64, batch, rel_err, tiny_ff, tiny_rnn

pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
                                reason="the native backend needs a C compiler")


@pytest.fixture(autouse=True, scope="module")
def _private_build_cache(tmp_path_factory):
    """Build the kernels into a cache of this test module's own, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        native.library.cache_clear()
        yield
    native.library.cache_clear()


# --- the fields, from their equations (docs/LCP.md §1, §3; no library code) -----------------------

def rnn_f(net, s, drive):
    """f(s) = [W φ(v), D φ(v)] + drive − s on s = [v | o]."""
    H = net.n_hidden
    r = torch.tanh(s[:, :H])
    return torch.cat([r @ net.W.T, r @ net.D.T], 1) + drive - s


def rnn_vjp(net, slope, a, back=None):
    """(∂_s f)ᵀ a at the slope φ'(v): −a + [φ'(v) ⊙ (a_v W + a_o D) | 0] (W, D replaced by ``back``)."""
    H = net.n_hidden
    W_back, D_back = (net.W, net.D) if back is None else back
    return -a + torch.cat([slope * (a[:, :H] @ W_back + a[:, H:] @ D_back), torch.zeros_like(a[:, H:])], 1)


def free_field(net):
    return lambda s, c: rnn_f(net, s, c["drive"])


def adjoint_field(net):
    return lambda lam, c: rnn_vjp(net, c["lin"], lam) + c["dL"]


def controlled_field(net, alpha, k_i, k_p, inv_B, loss, back=None):
    """ż of LCP's controlled dynamics on z = [v | o | e | u_int]."""
    H, K = net.n_hidden, net.n_out
    N = H + K

    def g(z, c):
        s, e, u_int = z[:, :N], z[:, N:N + H], z[:, N + H:]
        o = s[:, H:]
        grad_o = ((torch.softmax(o, 1) if loss == "cross_entropy" else o) - c["target"]) * inv_B
        psi = torch.cat([e, k_i * u_int - k_p * grad_o], 1)
        slope = 1 - torch.tanh(s[:, :H]) ** 2
        e_dot = rnn_vjp(net, slope, psi, back)[:, :H]
        return torch.cat([rnn_f(net, s, c["drive"]) + psi, e_dot, -(grad_o + alpha * u_int)], 1)
    return g


def euler_reference(g, z, context, dt, n, groups):
    """n Euler steps of g and the relative residual dt·‖g‖/‖z‖ of the last one (largest over the groups)."""
    for _ in range(n):
        step = g(z, context)
        z_prev, z = z, z + dt * step
    parts = [(step, z_prev)] if groups is None else zip(step.split(list(groups), 1), z_prev.split(list(groups), 1))
    return z, dt * torch.stack([gp.norm(dim=1) / zp.norm(dim=1) for gp, zp in parts]).amax(0)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def setup(B, n_hidden=21, n_out=4, loss="cross_entropy", dtype=F64, seed=0, **net_options):
    """A network whose widths are no multiple of a vector (N = 25, 2N = 50), its drive, a dense target
    and a random start."""
    net = tiny_rnn(n_hidden=n_hidden, n_out=n_out, **net_options).to(dtype)
    x, y = batch(n_in=5, n_out=n_out, B=B, seed=B + seed)
    g = torch.Generator().manual_seed(B + seed)
    with torch.no_grad():
        drive = net.flat_operator().drive(net.prepare_input(x.to(dtype)))
    target = (torch.nn.functional.one_hot(y, n_out).to(dtype) if loss == "cross_entropy"
              else torch.rand(B, n_out, generator=g, dtype=F64).to(dtype))
    return net, drive, target, g


GAINS = dict(alpha=0.7, k_i=3.0, k_p=0.5, inv_B=1 / 7)


# --- each field's C steps ----------------------------------------------------------------------

@pytest.mark.parametrize("B", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_controlled_steps_follow_the_field(B, loss):
    """Every tile shape of the C products (1, 2, 4 samples and remainders; widths that are no multiple
    of a vector) gives the field's Euler iterates and residual to 1e-12 in float64, over the row and
    per population."""
    net, drive, target, g = setup(B, loss=loss)
    op = net.flat_operator()
    kernel = native.field_kernel(op, "controlled", loss=loss, **GAINS)
    ctx = {"drive": drive, "target": target}
    z0 = torch.randn(B, 2 * op.n_state, generator=g, dtype=F64)
    start = z0.clone()
    with torch.no_grad():
        for groups in (None, (25, 21, 4), (50,), (10, 15, 25)):
            assert kernel.supports(groups)
            z, res = kernel(z0, ctx, 0.8, 7, groups)
            z_ref, res_ref = euler_reference(controlled_field(net, loss=loss, **GAINS), z0, ctx, 0.8, 7, groups)
            assert rel(z, z_ref) < 1e-12 and rel(res, res_ref) < 1e-12, groups
    assert torch.equal(z0, start)   # the start is not modified


@pytest.mark.parametrize("B", [1, 2, 3, 5, 9])
def test_free_and_adjoint_steps_follow_their_fields(B):
    """The free dynamics ṡ = f(s), and RBP's adjoint λ̇ = −λ + [φ'(v°) ⊙ (λ_v W + λ_o D) | 0] + ∇_s L at a
    fixed slope, 1e-12 in float64."""
    net, drive, _, g = setup(B)
    op = net.flat_operator()
    s0 = torch.randn(B, op.n_state, generator=g, dtype=F64)
    with torch.no_grad():
        s, res = native.field_kernel(op, "free")(s0, {"drive": drive}, 0.5, 6, None)
        s_ref, res_ref = euler_reference(free_field(net), s0, {"drive": drive}, 0.5, 6, None)
        assert rel(s, s_ref) < 1e-12 and rel(res, res_ref) < 1e-12
        ctx = {"lin": 1 - torch.tanh(s0[:, :net.n_hidden]) ** 2, "dL": torch.randn(B, op.n_state, generator=g, dtype=F64),
               "drive": drive}
        lam0 = torch.randn(B, op.n_state, generator=g, dtype=F64)
        for groups in (None, (21, 4)):
            lam, res = native.field_kernel(op, "adjoint")(lam0, ctx, 1.0, 6, groups)
            lam_ref, res_ref = euler_reference(adjoint_field(net), lam0, ctx, 1.0, 6, groups)
            assert rel(lam, lam_ref) < 1e-12 and rel(res, res_ref) < 1e-12


def test_controlled_steps_use_the_feedback_weights():
    """With Kolen-Pollack feedback the way back reads B and D̃, not the transposes."""
    net, drive, target, g = setup(3)
    method = get_method("lcp-kp")
    method.prepare(net, torch.Generator().manual_seed(0))
    feedback = method._feedback(net)
    op = net.flat_operator(feedback)
    ctx = {"drive": drive, "target": target}
    z0 = torch.randn(3, 2 * op.n_state, generator=g, dtype=F64)
    back = tuple(net.pathway(name, getattr(net, name), feedback).detach() for name in ("W", "D"))
    with torch.no_grad():
        z, _ = native.field_kernel(op, "controlled", loss="cross_entropy", **GAINS)(z0, ctx, 1.0, 5, None)
        z_kp, _ = euler_reference(controlled_field(net, loss="cross_entropy", back=back, **GAINS), z0, ctx, 1.0, 5, None)
        z_di, _ = euler_reference(controlled_field(net, loss="cross_entropy", **GAINS), z0, ctx, 1.0, 5, None)
    assert rel(z, z_kp) < 1e-12
    assert rel(z, z_di) > 1e-6   # the feedback weights are not the transposes


@pytest.mark.parametrize("kind", ["free", "adjoint", "controlled"])
def test_float32_steps_follow_the_float64_field(kind):
    """The float32 build: the same fields to float32 rounding (the residual, a difference of steps, to
    that rounding over its size)."""
    B, n = 5, 6
    net, drive, target, g = setup(B)
    op32 = net.float().flat_operator()
    net.double()
    N = net.n_hidden + net.n_out
    constants = dict(loss="cross_entropy", **GAINS) if kind == "controlled" else {}
    field, width, ctx = {
        "free": (free_field(net), N, {"drive": drive}),
        "adjoint": (adjoint_field(net), N, {"lin": torch.rand(B, net.n_hidden, generator=g, dtype=F64),
                                            "dL": torch.randn(B, N, generator=g, dtype=F64)}),
        "controlled": (controlled_field(net, loss="cross_entropy", **GAINS), 2 * N, {"drive": drive, "target": target}),
    }[kind]
    z0 = torch.randn(B, width, generator=g, dtype=F64)
    kernel = native.field_kernel(op32, kind, **constants)
    with torch.no_grad():
        z, res = kernel(z0.float(), {k: v.float() for k, v in ctx.items()}, 1.0, n, None)
        z_ref, res_ref = euler_reference(field, z0, ctx, 1.0, n, None)
    assert z.dtype == res.dtype == torch.float32
    assert rel(z.double(), z_ref) < 1e-6 and rel(res.double(), res_ref) < 1e-3


def test_residual_is_nan_where_the_state_is_not_finite():
    net, drive, target, _ = setup(2)
    op = net.flat_operator()
    kernel = native.field_kernel(op, "controlled", loss="cross_entropy", **GAINS)
    z = torch.zeros(2, 2 * op.n_state, dtype=F64)
    z[1, 0] = float("inf")
    _, res = kernel(z, {"drive": drive, "target": target}, 1.0, 2, (25, 21, 4))
    assert torch.isfinite(res[0]) and torch.isnan(res[1])


def test_steps_refuse_tensors_unlike_the_system():
    """dtype, device, widths and missing context rows are refused before C reads any memory."""
    net, drive, target, _ = setup(2)
    op = net.flat_operator()
    N = op.n_state
    free = native.field_kernel(op, "free")
    with pytest.raises(ConfigError, match="float64 on the CPU"):
        free(torch.zeros(2, N), {"drive": drive}, 1.0, 3, None)                     # float32 beside float64 weights
    with pytest.raises(ConfigError, match="float64 on the CPU"):
        free(torch.zeros(2, N, dtype=F64), {"drive": drive.float()}, 1.0, 3, None)
    with pytest.raises(ConfigError, match="do not fit"):
        free(torch.zeros(2, N + 1, dtype=F64), {"drive": drive}, 1.0, 3, None)
    with pytest.raises(ConfigError, match="do not fit"):
        free(torch.zeros(3, N, dtype=F64), {"drive": drive}, 1.0, 3, None)          # batch sizes differ
    with pytest.raises(ConfigError, match="do not fit"):
        free(torch.zeros(2, 1, N, dtype=F64), {"drive": drive}, 1.0, 3, None)
    controlled = native.field_kernel(op, "controlled", loss="mse", **GAINS)
    with pytest.raises(ConfigError, match="do not fit"):
        controlled(torch.zeros(2, 2 * N, dtype=F64), {"drive": drive, "target": target[:, :2]}, 1.0, 3, None)
    with pytest.raises(ConfigError, match="read the context drive, target"):
        controlled(torch.zeros(2, 2 * N, dtype=F64), {"drive": drive}, 1.0, 3, None)
    with pytest.raises(ConfigError, match="read the context"):
        controlled(torch.zeros(2, 2 * N, dtype=F64), None, 1.0, 3, None)
    adjoint = native.field_kernel(op, "adjoint")
    with pytest.raises(ConfigError, match="do not fit"):   # a slope as wide as the state
        adjoint(torch.zeros(2, N, dtype=F64), {"lin": torch.zeros(2, N, dtype=F64), "dL": torch.zeros(2, N, dtype=F64)},
                1.0, 3, None)
    assert not controlled.supports((10, 10)) and not free.supports((N - 1,))
    with pytest.raises(ConfigError, match="do not split"):
        free(torch.zeros(2, N, dtype=F64), {"drive": drive}, 1.0, 3, (N - 1, 2))


def test_systems_without_c_kernels_get_none_and_the_rest_fail_early():
    ff = tiny_ff()
    assert native.field_kernel(ff.flat_operator(), "free") is None
    net = tiny_rnn()
    with pytest.raises(ConfigError, match="unknown native field 'controled'"):
        native.field_kernel(net.flat_operator(), "controled")
    with pytest.raises(ConfigError, match="losses cross_entropy, mse.*drop 'native'"):
        native.field_kernel(net.flat_operator(), "controlled", loss="huber", **GAINS)
    with pytest.raises(ConfigError, match="CPU in float32 or float64.*drop 'native'"):
        native.field_kernel(net.to(torch.float16).flat_operator(), "free")
    meta = tiny_rnn().to("meta")
    with pytest.raises(ConfigError, match="CPU in float32 or float64.*drop 'native'"):
        native.field_kernel(meta.flat_operator(), "free")


def test_systems_and_fields_are_registered_explicitly():
    from leastcontrol.systems.networks import _RecurrentFlat

    class Changed(_RecurrentFlat):   # other dynamics than the C kernels': not matched by inheritance
        pass

    net = tiny_rnn()
    assert native.field_kernel(Changed(net), "free") is None
    with pytest.raises(ValueError, match="already registered"):
        native.register_native_system(_RecurrentFlat, native.recurrent_system)
    with pytest.raises(ValueError, match="already registered"):
        native.register_native_field("free", native.FreeField)
    with pytest.raises(ValueError, match="NativeField subclass"):
        native.register_native_field("other", object)
    native.register_native_system(Changed, native.recurrent_system)
    try:
        assert isinstance(native.field_kernel(Changed(net), "free"), native.FreeField)
    finally:
        del native._SYSTEMS[Changed]


def test_the_system_kernels_know_no_learning_rule():
    """rnn.c is the network's dynamics and state VJP only: no controller, loss or adjoint in it."""
    text = (Path(native.__file__).parent / "rnn.c").read_text().lower()
    for word in ("control", "loss", "adjoint", "target", "softmax", "alpha", "lcp", "rbp", "psi"):
        assert not re.search(r"\b" + word, text), word


def test_the_c_sources_ship_with_the_package():
    """Every file the build reads matches a package-data glob of pyproject.toml."""
    import fnmatch
    import tomllib
    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["leastcontrol"]
    package = Path(native.__file__).resolve().parents[1]
    for path in native.SOURCES + native.HEADERS:
        name = path.resolve().relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(name, g) for g in globs), name


# --- whole solves: the driver with the C steps against the driver with eager steps ---------------

def solve_both(field_fn, populations, kernel, z0, context, groups=None, native_backend=("native",), **settings):
    """The same solve with eager steps and with the C steps; both results."""
    field = Field(field_fn, populations, {"native": kernel})
    with torch.no_grad():
        return [Euler(**settings, backend=backend).solve(field, z0, context, groups=groups)
                for backend in (("eager",), native_backend)]


def assert_same_solve(eager, c, tol=1e-10):
    assert rel(c.state, eager.state) < tol
    assert torch.equal(c.stats.status, eager.stats.status)
    assert torch.equal(c.stats.sample_steps, eager.stats.sample_steps)
    assert c.stats.steps == eager.stats.steps and len(c.stats.trace) == len(eager.stats.trace)
    assert torch.allclose(c.stats.sample_residual, eager.stats.sample_residual, rtol=1e-3, atol=1e-13)   # differences of iterates


def controlled_problem(B=6, alpha=0.5, k_i=2.0, k_p=0.3, seed=0, **net_options):
    """The controlled dynamics from the free equilibrium (e = u_int = 0), per population."""
    net, drive, target, _ = setup(B, seed=seed, **net_options)
    N, H, K = net.n_hidden + net.n_out, net.n_hidden, net.n_out
    with torch.no_grad():
        s0 = Euler(tol=1e-12, max_steps=2000).solve(free_field(net), torch.zeros(B, N, dtype=F64), {"drive": drive}).state
    gains = dict(alpha=alpha, k_i=k_i, k_p=k_p, inv_B=1 / B)
    kernel = native.field_kernel(net.flat_operator(), "controlled", loss="cross_entropy", **gains)
    z0 = torch.cat([s0, torch.zeros(B, N, dtype=F64)], 1)
    populations = {"v": H, "o": K, "e_v": H, "u_int": K}
    return (controlled_field(net, loss="cross_entropy", **gains), populations, kernel, z0,
            {"drive": drive, "target": target}, (N, H, K))


def test_solves_freeze_samples_one_by_one_like_eager():
    """To a tolerance: the samples stop at different checks, each at the eager solve's step and state."""
    fn, populations, kernel, z0, ctx, groups = controlled_problem()
    eager, c = solve_both(fn, populations, kernel, z0, ctx, groups, tol=1e-9, max_steps=600, check_every=7)
    assert eager.stats.converged and len(set(eager.stats.sample_steps.tolist())) > 1
    assert_same_solve(eager, c)


def test_solves_switch_to_the_c_steps_for_the_tail():
    """Native(max_batch=2): eager steps while more than two samples run, then C, as one solve."""
    fn, populations, kernel, z0, ctx, groups = controlled_problem()
    eager, c = solve_both(fn, populations, kernel, z0, ctx, groups, native_backend=(Native(max_batch=2),),
                          tol=1e-9, max_steps=600)
    assert_same_solve(eager, c)


def test_solves_reach_max_steps_like_eager():
    """Some samples settle, the rest run to max_steps (not a multiple of check_every); and with tol 0 all do."""
    fn, populations, kernel, z0, ctx, groups = controlled_problem()
    eager, c = solve_both(fn, populations, kernel, z0, ctx, groups, tol=1e-6, max_steps=20, check_every=7)
    assert {Status.CONVERGED, Status.MAX_STEPS} <= set(eager.stats.status.tolist())
    assert_same_solve(eager, c)
    eager, c = solve_both(fn, populations, kernel, z0, ctx, None, tol=0.0, max_steps=37)
    assert set(eager.stats.status.tolist()) == {Status.MAX_STEPS} and eager.stats.steps == 37
    assert_same_solve(eager, c)


def test_solves_stall_like_eager():
    """The stall rule: a controller so slow (leak 0.002) that every sample's residual falls by less than
    10 % in 20 steps, far above rounding."""
    fn, populations, kernel, z0, ctx, groups = controlled_problem(alpha=0.002, k_i=0.02, k_p=0.0)
    eager, c = solve_both(fn, populations, kernel, z0, ctx, groups, tol=1e-30, max_steps=600, patience=20)
    assert set(eager.stats.status.tolist()) == {Status.STALLED} and eager.stats.steps < 600
    assert_same_solve(eager, c)


@pytest.mark.parametrize("mix", [CheckMix(memory=3, after=20),
                                 CheckMix(memory=4, after=30, restart=1.001, restarts=2),   # returns to the best point
                                 CheckMix(memory=4, after=30, restart=1.001, restarts=0)])  # mixing stops
def test_solves_with_the_check_level_mix_like_eager(mix):
    """The driver mixes the C runs as it mixes the eager ones: same steps, states and counts, on a slow
    controller where the mix changes the path."""
    fn, populations, kernel, z0, ctx, groups = controlled_problem(alpha=0.05, k_i=0.2, k_p=0.0, w_scale=1.6)
    eager, c = solve_both(fn, populations, kernel, z0, ctx, groups, tol=1e-9, max_steps=800, mix=mix)
    plain, _ = solve_both(fn, populations, kernel, z0, ctx, groups, tol=1e-9, max_steps=800)
    assert not torch.equal(eager.stats.sample_steps, plain.stats.sample_steps)   # the mix is doing something
    assert_same_solve(eager, c, tol=1e-8)


def test_solves_without_freezing_like_eager():
    """freeze=False: every row runs to the check where all are done."""
    fn, populations, kernel, z0, ctx, groups = controlled_problem()
    eager, c = solve_both(fn, populations, kernel, z0, ctx, groups, tol=1e-9, max_steps=600, freeze=False)
    assert len(set(eager.stats.sample_steps.tolist())) == 1
    assert_same_solve(eager, c)


def test_free_and_adjoint_solves_like_eager():
    net, drive, _, g = setup(5)
    op = net.flat_operator()
    N = op.n_state
    eager, c = solve_both(free_field(net), op.sizes, native.field_kernel(op, "free"), torch.zeros(5, N, dtype=F64),
                          {"drive": drive}, tol=1e-10, max_steps=300, dt=0.7)
    assert eager.stats.converged
    assert_same_solve(eager, c)
    ctx = {"lin": 1 - torch.tanh(eager.state[:, :net.n_hidden]) ** 2, "dL": torch.randn(5, N, generator=g, dtype=F64)}
    eager, c = solve_both(adjoint_field(net), op.sizes, native.field_kernel(op, "adjoint"), torch.zeros(5, N, dtype=F64),
                          ctx, groups="populations", tol=1e-10, max_steps=300)
    assert eager.stats.converged
    assert_same_solve(eager, c)


def test_solves_without_the_context_are_refused():
    """The C fields read their rows from the context: a solve without one says so."""
    fn, populations, kernel, z0, ctx, groups = controlled_problem()
    field = Field(lambda z, _: fn(z, ctx), populations, {"native": kernel})
    with pytest.raises(ConfigError, match="read the context drive, target"):
        Euler(backend=("native",)).solve(field, z0)


def test_a_diverging_solve_names_the_population_like_eager():
    net, drive, target, _ = setup(2)
    with torch.no_grad():
        net.W.mul_(400.0)
        net.D.mul_(1e300)
    gains = dict(alpha=0.5, k_i=2.0, k_p=0.0, inv_B=0.5)
    N, H, K = net.n_hidden + net.n_out, net.n_hidden, net.n_out
    field = Field(controlled_field(net, loss="cross_entropy", **gains), {"v": H, "o": K, "e_v": H, "u_int": K},
                  {"native": native.field_kernel(net.flat_operator(), "controlled", loss="cross_entropy", **gains)})
    z0 = torch.zeros(2, 2 * N, dtype=F64)
    names = []
    for backend in (("eager",), ("native",)):
        with pytest.raises(SolverDivergedError) as err, torch.no_grad():
            Euler(tol=0.0, max_steps=50, backend=backend).solve(field, z0, {"drive": drive, "target": target})
        names.append((err.value.population, err.value.step))
    assert names[0] == names[1] and names[0][0] in field.populations


# --- through the methods -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lcp-di", "lcp-kp", "rbp"])
def test_methods_give_the_eager_update(kind):
    """backend ("native",): the same update, step counts and flags, in every phase, as the eager steps:
    to max_steps (no sample stops), to a tolerance (samples freezing one by one), with the C steps
    for the tail only, and under the stall rule."""
    net = tiny_rnn()
    x, y = batch(B=6)
    gains = {"alpha": 0.5, "k_i": 2.0, "k_p": 0.3} if kind != "rbp" else {}
    cases = [({**gains}, dict(tol=0.0, max_steps=37), ("native",)),
             ({**gains}, dict(tol=1e-9, max_steps=400), (Native(max_batch=3),)),
             ({**gains}, dict(tol=1e-12, max_steps=16, check_every=3), ("native",))]   # some settle, some reach max_steps
    if kind != "rbp":
        cases.append(({"alpha": 0.002, "k_i": 0.02, "free": Euler(tol=1e-8, max_steps=600)},
                      dict(tol=1e-30, max_steps=600, patience=20), (Native(max_batch=4),)))
    for options, settings, backend in cases:
        outs = []
        for be in (("eager",), backend):
            options = {**options, **({"free": options["free"].replace(backend=be)} if "free" in options else {})}
            method = get_method(kind, solver=Euler(**settings, backend=be), **options)
            method.prepare(net, torch.Generator().manual_seed(0))
            outs.append(method.gradients(net, x, y))
        eager, c = outs
        if settings["max_steps"] == 16:
            assert 0 < eager.stats["converged_fraction_free"] < 1
        assert rel_err(c.grads, eager.grads) < 1e-10
        assert c.stats.keys() == eager.stats.keys()
        for key, value in eager.stats.items():   # counts and flags exactly; residuals to rounding
            if "residual" in key or key == "control_norm":
                assert c.stats[key] == pytest.approx(value, rel=1e-6, abs=1e-14), key
            else:
                assert c.stats[key] == value, key
    if kind != "rbp":
        assert eager.stats["stalled_fraction_controlled"] == 1.0 and eager.stats["iterations_controlled"] < 600


def test_methods_with_the_check_level_mix_give_the_eager_update():
    net = tiny_rnn(w_scale=1.6)
    x, y = batch(B=6)
    mix = CheckMix(memory=3, after=20)
    outs = [get_method("lcp-di", alpha=0.05, k_i=0.2, solver=Euler(tol=1e-9, max_steps=800, mix=mix, backend=be))
            .gradients(net, x, y) for be in (("eager",), ("native",))]
    assert rel_err(outs[1].grads, outs[0].grads) < 1e-8
    for key in ("iterations", "sample_iterations", "iterations_controlled", "converged_fraction_controlled"):
        assert outs[1].stats[key] == outs[0].stats[key], key


def test_methods_in_float32_agree_with_eager_to_rounding():
    net = tiny_rnn().float()
    x, y = batch(B=4)
    grads = [get_method("lcp-di", solver=Euler(tol=1e-5, backend=be)).gradients(net, x.float(), y).grads
             for be in (("eager",), ("native",))]
    assert rel_err(grads[1], grads[0]) < 1e-4


def test_native_settings_fail_early_and_name_the_fix():
    with pytest.raises(ConfigError, match="plain Euler steps"):
        Anderson(backend=("native",))
    x, y = batch(B=2)
    with pytest.raises(ConfigError, match="drop 'native'"):
        get_method("lcp-di", solver=Euler(backend=("native",))).gradients(tiny_ff(), x, y)


# --- the build -----------------------------------------------------------------------------------

def test_build_failures_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))   # nothing built there yet
    native.library.cache_clear()
    try:
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        with pytest.raises(ConfigError, match="no C compiler.*drop 'native' from the solver's backend"):
            native.library()
        monkeypatch.setenv("CC", shutil.which("false", path="/usr/bin:/bin") or "false")
        with pytest.raises(ConfigError, match="failed.*drop 'native' from the solver's backend \\(method.solver.backend\\)"):
            native.library()
        assert not list(tmp_path.rglob("*.so*"))   # no partial library left behind
    finally:
        native.library.cache_clear()


def test_library_is_built_once_per_source_into_the_cache(monkeypatch, tmp_path):
    """Built on first use, loaded (not rebuilt) afterwards; a changed source, header included, builds anew."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        native.library()
        built = list(tmp_path.rglob("*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        native.library()
        assert [p.stat().st_mtime_ns for p in tmp_path.rglob("*.so")] == [stamp]   # loaded, not rebuilt
        copy = tmp_path / "src"
        shutil.copytree(native.HERE, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        (copy / "precisions.h").write_text((copy / "precisions.h").read_text() + "/* changed */\n")
        monkeypatch.setattr(native, "HERE", copy)
        monkeypatch.setattr(native, "SOURCES", tuple(copy / p.name for p in native.SOURCES))
        monkeypatch.setattr(native, "HEADERS", tuple(copy / p.name for p in native.HEADERS))
        native.library.cache_clear()
        native.library()
        assert len(list(tmp_path.rglob("*.so"))) == 2
    finally:
        native.library.cache_clear()
