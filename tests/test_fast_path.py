"""The fast path (flat fused steps, sample freezing, loose warm start) against the autograd reference."""
import json
import statistics

import pytest
import torch
from torch._dynamo.utils import counters

from leastcontrol.bench import BenchConfig, Row, format_table, ratio_interval, run_bench
from leastcontrol.cli import main
from leastcontrol.errors import ConfigError
from leastcontrol.methods import get_method
from leastcontrol.solvers import Adam, Anderson, CheckMix, Euler
from leastcontrol.systems.base import autograd_dynamics_and_state_vjp

from .helpers import F64, batch, rel_err, tiny_ff, tiny_rnn

SYSTEMS = [tiny_rnn, tiny_ff, lambda: tiny_ff(sizes=(5, 4, 6, 3, 2))]
IDS = ["rnn", "ff", "ff-deep"]


def _random_flat(net, B=4, seed=5):
    op = net.flat_operator()
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, op.n_state, generator=g, dtype=F64),
            torch.randn(B, op.n_state, generator=g, dtype=F64))


@pytest.mark.parametrize("make", SYSTEMS, ids=IDS)
def test_flat_operator_equals_autograd(make):
    """f and (∂_s f)ᵀ a of the flat fast path equal one torch.autograd.grad call, to 1e-10 in float64."""
    net = make()
    x, _ = batch(n_in=5, n_out=net.n_out)
    x = net.prepare_input(x)
    op = net.flat_operator()
    s, a = _random_flat(net)
    f_ref, vjp_ref = autograd_dynamics_and_state_vjp(net, op.unpack(s), net.encode(x), op.unpack(a))
    with torch.no_grad():
        f, vjp = op.f_and_vjp(s, op.drive(x), a)
        only_f, only_vjp = op.f(s, op.drive(x)), op.vjp(s, op.drive(x), a)
    assert torch.allclose(f, op.pack(f_ref), atol=1e-12, rtol=0)
    assert torch.allclose(vjp, op.pack(vjp_ref), atol=1e-10, rtol=0)
    assert torch.allclose(only_f, f, atol=0, rtol=0) and torch.allclose(only_vjp, vjp, atol=1e-14, rtol=0)
    with torch.no_grad():   # the adjoint's route: the slopes of a fixed state, then VJPs at it
        at_fixed = op.vjp_at(op.linearize(s, op.drive(x)), op.drive(x), a)
    assert torch.allclose(at_fixed, op.pack(vjp_ref), atol=1e-10, rtol=0)


@pytest.mark.parametrize("make", SYSTEMS, ids=IDS)
def test_flat_operator_with_feedback_uses_the_feedback_weights(make):
    """With Kolen-Pollack feedback set to the exact transposes, the flat VJP is the exact one."""
    net = make()
    fb = net.add_feedback()
    with torch.no_grad():
        params = dict(net.named_parameters())
        for key, name in net.feedback_pathways().items():
            fb[key].copy_(params[name].t())
    x, _ = batch(n_in=5, n_out=net.n_out)
    x = net.prepare_input(x)
    s, a = _random_flat(net)
    with torch.no_grad():
        exact = net.flat_operator().vjp(s, net.flat_operator().drive(x), a)
        via_feedback = net.flat_operator(fb).vjp(s, net.flat_operator(fb).drive(x), a)
        with torch.no_grad():
            for p in fb.values():
                p.mul_(-1.0)
        flipped = net.flat_operator(fb).vjp(s, net.flat_operator(fb).drive(x), a)
    assert torch.allclose(via_feedback, exact, atol=1e-12, rtol=0)
    assert not torch.allclose(flipped, exact, atol=1e-3)


@pytest.mark.parametrize("name", ["lcp-di", "rbp", "lcp-ebd", "lcp-kp"])
@pytest.mark.parametrize("make", [tiny_rnn, tiny_ff], ids=["rnn", "ff"])
def test_fast_and_autograd_paths_give_the_same_update(name, make):
    net = make()
    x, y = batch(n_in=5, n_out=net.n_out)
    options = {"solver": Euler(tol=1e-10, max_steps=3000)}
    if name == "lcp-ebd":
        options = {"controlled": Adam(lr=0.01, tol=0.0, max_steps=300), "ff_init": True,
                   "solver": Euler(tol=1e-12, max_steps=3000)}
    fast = get_method(name, **options)
    ref = get_method(name, impl="autograd", **options)
    fast.prepare(net)
    g_fast = fast.gradients(net, *fast._inputs(net, x, y)).grads
    g_ref = ref.gradients(net, *ref._inputs(net, x, y)).grads
    assert rel_err(g_fast, g_ref) < 1e-6


def test_autograd_path_checks_every_step_and_does_not_freeze():
    net = tiny_rnn()
    x, y = batch()
    m = get_method("lcp-di", impl="autograd")
    assert all(s.check_every == 1 and not s.freeze for s in m.solvers().values())
    out = m.gradients(net, *m._inputs(net, x, y))
    assert out.stats["converged"]


def test_freezing_changes_no_result_beyond_the_tolerance():
    """Frozen samples stop at their own tolerance; the update moves by about tol, not more."""
    net = tiny_rnn(w_scale=0.9)
    x, y = batch(B=16, seed=4)
    tol = 1e-7
    frozen = get_method("lcp-di", solver=Euler(tol=tol, max_steps=5000, check_every=1))
    whole = get_method("lcp-di", solver=Euler(tol=tol, max_steps=5000, check_every=1, freeze=False))
    a = frozen.gradients(net, *frozen._inputs(net, x, y))
    b = whole.gradients(net, *whole._inputs(net, x, y))
    assert a.stats["converged"] and b.stats["converged"]
    assert a.stats["sample_iterations"] < b.stats["iterations"]  # samples did freeze early
    assert rel_err(a.grads, b.grads) < 100 * tol


def test_loose_warm_start_reaches_the_same_controlled_equilibrium():
    net = tiny_rnn(w_scale=0.9)
    x, y = batch(B=8)
    tight = get_method("lcp-di", solver=Euler(tol=1e-10, max_steps=5000))
    loose = get_method("lcp-di", solver=Euler(tol=1e-10, max_steps=5000), free=Euler(max_steps=5000, tol=1e-3))
    a = tight.gradients(net, *tight._inputs(net, x, y))
    b = loose.gradients(net, *loose._inputs(net, x, y))
    assert b.stats["iterations_free"] < a.stats["iterations_free"]
    assert rel_err(b.grads, a.grads) < 1e-7


def test_bptt_tends_to_rbp_on_a_contractive_network():
    net = tiny_rnn(w_scale=0.5)
    x, y = batch()
    rbp = get_method("rbp", solver=Euler(tol=1e-13, max_steps=5000))
    bptt = get_method("bptt", steps=200)
    g_rbp = rbp.gradients(net, *rbp._inputs(net, x, y)).grads
    g_bptt = bptt.gradients(net, *bptt._inputs(net, x, y)).grads
    assert rel_err(g_bptt, g_rbp) < 1e-8


def test_anderson_freezes_and_restarts_without_changing_the_fixed_point():
    A = torch.tensor([[0.5, 0.2], [-0.1, 0.6]], dtype=F64)
    b = torch.tensor([[1.0, -2.0], [0.5, 0.3], [3.0, 1.0]], dtype=F64)
    exact = torch.linalg.solve(torch.eye(2, dtype=F64) - A, b.t()).t()

    def field(s, c):
        return {"x": s["x"] @ A.t() + c["b"] - s["x"]}

    s0 = {"x": torch.zeros(3, 2, dtype=F64)}
    for solver in (Anderson(tol=1e-12, max_steps=500, check_every=1),
                   Anderson(tol=1e-12, max_steps=500, check_every=1, restart=1.0001, start_below=1e9)):
        res = solver.solve(field, s0, {"b": b})
        assert res.stats.converged
        assert torch.allclose(res.state["x"], exact, atol=1e-9)


def test_impl_settings_are_validated():
    with pytest.raises(ConfigError, match="fast, autograd"):
        get_method("lcp-di", impl="compiled")
    with pytest.raises(ConfigError, match="impl 'autograd' is the research-code reference and runs eager Euler steps"):
        get_method("rbp", impl="autograd", solver=Anderson())


def test_compiled_steps_give_the_eager_iterates():
    """The compile backend runs the same Euler iterates as one graph per check: same update and step counts.

    Once to max_steps (a count that is not a multiple of check_every, so the last graph is shorter), once
    to a tolerance, where samples freeze one by one and the batch shrinks to a single sample.
    """
    net = tiny_rnn()
    x, y = batch(n_in=5, n_out=3, B=4)
    for settings in ({"tol": 0.0, "max_steps": 95}, {"tol": 1e-9, "max_steps": 400}):
        outs = [get_method("lcp-di", solver=Euler(backend=b, **settings)).gradients(net, x, y) for b in ("eager", "compile")]
        eager, compiled = outs
        assert rel_err(compiled.grads, eager.grads) < 1e-10
        for key in ("iterations_free", "iterations_controlled", "sample_iterations"):
            assert compiled.stats[key] == eager.stats[key]
    assert eager.stats["sample_iterations"] < eager.stats["iterations"]  # samples froze


def test_compile_settings_are_validated():
    with pytest.raises(ConfigError, match="'anderson' is not"):
        get_method("lcp-di", solver=Anderson(backend="compile"))
    with pytest.raises(ConfigError, match="impl 'autograd'"):
        get_method("rbp", impl="autograd", solver=Euler(backend="compile"))
    with pytest.raises(ConfigError, match="unknown backend 'yes'"):
        get_method("lcp-di", solver=Euler(backend="yes"))
    with pytest.raises(ConfigError, match="unknown setting.*compile"):
        get_method("lcp-di", solver={"name": "euler", "compile": True})


def test_bench_returns_every_figure_and_ratio(tmp_path):
    config = BenchConfig(batch_size=8, hidden=8, batches=2, warmup=1, pretrain=1, memory=False, progress=False)
    rows = [Row("ff", "bp"), Row("ff", "lcp-di"), Row("rnn", "rbp"), Row("rnn", "lcp-di"),
            Row("rnn", "lcp-di", impl="autograd"),
            Row("rnn", {"name": "lcp-di", "solver": {"tol": 1e-4}}, label="rnn-lcp-di-tol1e-4"),
            Row("rnn", "lcp-di", path={"solver": {"patience": 100}}, label="rnn-lcp-di-stall"),
            # α alone as a path setting: without k_i it changes β, so the update, which the reference shows.
            Row("rnn", "lcp-di", path={"alpha": 1.0}, label="rnn-lcp-di-beta1"),
            Row("rnn", {"name": "rbp", "solver": {"tol": 1e-6, "max_steps": 800}}, label="rnn-rbp-tol1e-6")]
    result = run_bench(config, rows)
    keys = {"model", "method", "impl", "max_iter", "seconds_per_batch_median", "seconds_per_batch_min",
            "mean_iterations", "peak_memory_mb", "inference_seconds_per_batch", "update_cosine_vs_autograd"}
    assert len(result["rows"]) == len(rows)
    for r in result["rows"]:
        assert keys <= set(r)
        assert 0 < r["seconds_per_batch_min"] <= r["seconds_per_batch_median"]
    by = {r["label"]: r for r in result["rows"]}
    assert 0.9999 < by["rnn-lcp-di"]["update_cosine_vs_autograd"] <= 1.0 + 1e-12   # a cosine, computed in float64
    # Agreement is measured on every timed batch; the smallest cosine is the row's figure.
    for label in ("rnn-lcp-di", "rnn-lcp-di-beta1", "rnn-rbp"):
        r = by[label]
        assert len(r["update_cosines"]) == config.batches == r["agreement_batches"]
        assert r["update_cosine_vs_autograd"] == min(r["update_cosines"])
    assert by["rnn-lcp-di"]["agrees"] and by["rnn-lcp-di-stall"]["agrees"]
    assert by["rnn-lcp-di-beta1"]["agrees"] is False and by["rnn-lcp-di-beta1"]["update_cosine_vs_autograd"] < 0.99
    assert by["ff-bp"]["agrees"] is None and by["rnn-lcp-di-autograd"]["agrees"] is None   # nothing to compare
    ratios = result["ratios"]
    for key in ("rnn_lcp_di_autograd_over_fast", "rnn_lcp_di_over_rbp", "rnn_lcp_di_over_rbp_equal_tol",
                "rnn_lcp_di_stall_over_rbp", "ff_lcp_di_over_bp"):
        assert ratios[key] > 0
    sec = {k: r["seconds_per_batch_median"] for k, r in by.items()}
    # Each method's fastest row at the tolerance and cap compared, among the rows that give the
    # method's update; the 1e-6 RBP row is not RBP's best. The "fastest" ratios let every row compete.
    assert ratios["rnn_lcp_di_best_over_rbp"] == pytest.approx(
        min(sec["rnn-lcp-di"], sec["rnn-lcp-di-stall"]) / sec["rnn-rbp"])
    assert ratios["rnn_lcp_di_fastest_over_rbp"] == pytest.approx(
        min(sec["rnn-lcp-di"], sec["rnn-lcp-di-stall"], sec["rnn-lcp-di-beta1"]) / sec["rnn-rbp"])
    assert ratios["rnn_lcp_di_best_over_rbp_equal_tol_1e-6"] == pytest.approx(
        min(sec["rnn-lcp-di"], sec["rnn-lcp-di-stall"]) / sec["rnn-rbp-tol1e-6"])
    assert result["ratio_rows"]["rnn_lcp_di_best_over_rbp"][1] == "rnn-rbp"
    assert "rnn-lcp-di-beta1 " in format_table(result) and "(2) * |" in format_table(result)
    assert ratios["lcp_di_memory_800_over_100"] is None  # memory probes were skipped
    # Intervals resample the same timed rounds for both rows of a ratio.
    for r in result["rows"]:
        assert sorted(r["seconds_per_batch"]) == list(range(config.warmup, config.warmup + config.batches))
        assert statistics.median(r["seconds_per_batch"].values()) == r["seconds_per_batch_median"]
    intervals = result["ratio_intervals_95"]
    assert set(intervals) == {"rnn_lcp_di_autograd_over_fast", "rnn_lcp_di_best_over_rbp",
                              "rnn_lcp_di_best_over_rbp_equal_tol", "rnn_lcp_di_best_over_rbp_equal_tol_1e-6",
                              "rnn_lcp_di_fastest_over_rbp", "rnn_lcp_di_fastest_over_rbp_equal_tol",
                              "rnn_lcp_di_fastest_over_rbp_equal_tol_1e-6", "ff_lcp_di_over_bp"}
    for low, high in intervals.values():
        assert 0 < low <= high
    # Same network, same batches: the fast path checks convergence every `check_every` steps per
    # phase (free, controlled), so it may run up to check_every - 1 more steps in each.
    agreement = result["iteration_agreement"]
    assert agreement["batches"] == config.batches
    check_every = Row("rnn", "lcp-di").build().solver.check_every
    for fast, ref in zip(agreement["iterations"], agreement["reference_iterations"]):
        assert ref <= fast <= ref + 2 * (check_every - 1)
    assert ratios["rnn_lcp_di_iterations_autograd_over_fast_same_network"] == pytest.approx(
        sum(agreement["reference_iterations"]) / sum(agreement["iterations"]))


def test_ratio_interval_pairs_the_rounds_and_brackets_the_ratio():
    # Every round's numerator is exactly twice its denominator: each paired resample gives 2.
    den = {r: 0.01 * (1 + r % 7) for r in range(3, 40)}
    assert ratio_interval({r: 2 * t for r, t in den.items()}, den) == pytest.approx([2.0, 2.0])
    # A ratio of 3 with ±1 % noise per round: the interval holds 3 and stays within the noise;
    # a round only one row has is left out of the pairing.
    g = torch.Generator().manual_seed(0)
    noise = 1 + 0.01 * (2 * torch.rand(len(den), generator=g, dtype=torch.float64) - 1)
    num = {r: 3 * t * float(e) for (r, t), e in zip(den.items(), noise)}
    low, high = ratio_interval({**num, 99: 1.0}, den)
    assert 2.97 <= low < 3.0 < high <= 3.03
    assert ratio_interval({3: 1.0, 4: 1.0}, {4: 1.0, 5: 1.0}) is None   # one common round


def test_bench_rows_with_random_draws_repeat_their_steps():
    """KP's and LF's random feedback and LF's noise come from seeded generators: two bench runs
    give each row the same step counts even though the global generator moved in between."""
    config = BenchConfig(batch_size=8, hidden=8, batches=3, warmup=1, pretrain=1, memory=False, progress=False)
    rows = [Row("rnn", "lcp-kp"), Row("rnn", "lcp-lf")]
    counts = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        trainers = {r["label"]: r for r in run_bench(config, rows)["rows"]}
        counts.append({k: (r["mean_iterations"], r["update_cosine_vs_autograd"]) for k, r in trainers.items()})
    assert counts[0] == counts[1]


def test_bench_reports_a_row_whose_solves_diverge_and_times_the_others():
    config = BenchConfig(batch_size=8, hidden=8, batches=2, warmup=1, pretrain=1, memory=False, progress=False)
    rows = [Row("rnn", "rbp"), Row("rnn", {"name": "rbp", "solver": {"dt": 100.0}}, label="rnn-rbp-diverging")]
    result = run_bench(config, rows)
    by = {r["label"]: r for r in result["rows"]}
    bad, good = by["rnn-rbp-diverging"], by["rnn-rbp"]
    assert "| rnn-rbp-diverging | euler | 0.0001 | – |" in format_table(result)
    assert bad["diverged_batches"] == config.batches and bad["seconds_per_batch_median"] is None
    assert bad["inference_seconds_per_batch"] is None
    assert good["diverged_batches"] == 0 and good["seconds_per_batch_median"] > 0


def test_bench_runs_the_rows_asked_for_and_names_the_valid_ones(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--rows", "rnn-rbp", "rnn-lcp-di", "--batch-size", "8", "--hidden", "8", "--batches", "2",
                 "--warmup", "1", "--pretrain", "1", "--no-memory", "--quiet", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["label"] for r in result["rows"]] == ["rnn-rbp", "rnn-lcp-di"]
    ratios = result["ratios"]
    assert ratios["rnn_lcp_di_over_rbp"] > 0 and ratios["ff_lcp_di_over_bp"] is None
    assert main(["bench", "--rows", "rnn-rbp", "rnn-lcp-dj", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown bench row(s) rnn-lcp-dj" in err and "rnn-lcp-di-gains-stall300-accel-compile" in err


def test_bench_cli_rejects_a_missing_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--device", "cuda", "--quiet"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_check_level_anderson_gives_the_converged_update_eager_and_compiled():
    """LCP-DI with Euler's check-level Anderson mixing reaches the same controlled equilibrium, so the
    same update as plain Euler solved tightly (float64), and the compiled steps give the eager iterates."""
    net = tiny_rnn()
    x, y = batch(n_in=5, n_out=3, B=4)
    reference = get_method("lcp-di", solver=Euler(tol=1e-12, max_steps=6000)).gradients(net, x, y)
    opts = {"mix": CheckMix(memory=3, after=30), "tol": 1e-10, "max_steps": 2000}
    eager = get_method("lcp-di", solver=Euler(backend="eager", **opts)).gradients(net, x, y)
    counters.clear()
    compiled = get_method("lcp-di", solver=Euler(backend="compile", **opts)).gradients(net, x, y)
    # The steps and the mix compile without graph breaks.
    assert not counters["graph_break"]
    assert eager.stats["converged"]
    assert rel_err(eager.grads, reference.grads) < 1e-7
    assert rel_err(compiled.grads, eager.grads) < 1e-9
    assert compiled.stats["iterations"] == eager.stats["iterations"]


def test_bench_plan_holds_the_rows_and_ratios_of_the_table_of_record():
    """The shipped plan (configs/bench.toml, also benchmarks/bench.toml) has every row label and ratio
    name of the table of record, in its order, and its rows build the settings their labels name."""
    from pathlib import Path

    from leastcontrol.bench import load_plan
    root = Path(__file__).resolve().parents[1]
    record = json.loads((root / "docs/runs/bench-2026-12-04-p.json").read_text())
    plan = load_plan()
    assert load_plan(root / "benchmarks" / "bench.toml").rows.keys() == plan.rows.keys()
    recorded = [r["label"] for r in record["rows"]]
    assert [label for label in plan.rows if label in recorded] == recorded
    assert [name for name in plan.ratios if name in record["ratios"]] == list(record["ratios"])
    row = plan.rows["rnn-lcp-di-gains-stall300-accel-native"]
    m = row.build()
    assert (m.alpha, m.k_i, m.free.tol, m.controlled.tol, m.controlled.max_steps) == (1.0, 10.0, 1e-4, 1e-6, 800)
    assert m.controlled.patience == 300 and m.controlled.mix == CheckMix(memory=3, after=60, restarts=0)
    assert [b.name for b in m.controlled._backends] == ["native", "compile"]
    # The reference drops the path settings: the published gains and warm start, Euler at every step.
    ref = row.reference().build()
    assert (ref.impl, ref.alpha, ref.k_i, ref.free.tol, ref.controlled.check_every, ref.controlled.mix) == \
        ("autograd", 0.1, 1.0, 1e-6, 1, None)
    # The published settings come from configs/mnist-*.toml: LCP-EBD's differ by model.
    assert plan.rows["ff-lcp-ebd"].build().controlled.max_steps == 800
    assert plan.rows["rnn-lcp-ebd"].build().controlled.max_steps == 200
    assert plan.rows["rnn-lcp-di-autograd"].reference() is None and plan.rows["ff-bp"].reference() is None


@pytest.mark.parametrize("text, message", [
    ('[row.a]\nmodel = "rnn"\nmethod = { name = "lcp-di" }\npath = ["fast"]', "'fast' is no \\[path\\]"),
    ('[row.a]\nmodel = "rnn"\nmethod = { name = "lcp-di", solver = { tol = "x" } }', "row.a: method.solver: tol"),
    ('[row.a]\nmodel = "rnn"\nmethod = { name = "rbp" }\n[ratio]\nr = { numerator = "a", denominator = { best = "b" } }',
     "ratio.r.denominator"),
    ('[probe.p]\nmodel = "rnn"\nmethod = { name = "bptt" }\n[ratio]\nr = { numerator = "p", denominator = "p", '
     'of = "memory", headline = true }', "true for seconds ratios only"),
    ('[rows.a]\nmodel = "rnn"', "unknown section 'rows'"),
])
def test_bench_plan_errors_name_the_file_and_the_key(tmp_path, text, message):
    from leastcontrol.bench import load_plan
    path = tmp_path / "plan.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_plan(path)
    assert str(path) in str(err.value)


def test_bench_pretrains_on_batches_it_does_not_time():
    from leastcontrol.bench import split_batches
    config = BenchConfig(batch_size=8, batches=4, warmup=1, pretrain=6, memory=False, progress=False)
    timed, pretraining = split_batches(config, config.warmup + config.batches)
    assert len(timed) == 5 and len(pretraining) == 6
    seen = {tuple(row.tolist()) for x, _ in pretraining for row in x}
    assert not any(tuple(row.tolist()) in seen for x, _ in timed for row in x)


def test_agreement_skips_batches_where_the_reference_does_not_settle():
    """A reference stopped at max_iter is one snapshot of an orbit, not an update to agree with: such a
    batch gets no cosine, and a row with no batch to compare on is not counted as agreeing."""
    from leastcontrol.bench import References, update_agreement
    net = tiny_rnn()
    batches = [batch(B=4, seed=s) for s in (2, 3)]
    refs = References({"rnn": net}, batches)
    settled = update_agreement(Row("rnn", {"name": "lcp-di", "solver": {"tol": 1e-9, "max_steps": 3000}}), refs)
    assert settled["agreement_batches"] == 2 and settled["agrees"]
    cut = update_agreement(Row("rnn", {"name": "lcp-di", "solver": {"tol": 1e-9, "max_steps": 5}}), refs)
    assert cut["update_cosines"] == [None, None] and cut["update_cosine_vs_autograd"] is None
    assert cut["agrees"] is False
