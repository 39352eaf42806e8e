"""The library on a CUDA device against the same computation on the CPU (float64).

Skipped where PyTorch sees no GPU. Every method's update on CUDA must equal the CPU's to
rounding: the solvers, fused steps, convergence checks and per-sample freezing must keep every
tensor on the system's device and take the same decisions there.
"""
import copy

import pytest
import torch

from leastcontrol.bench import BenchConfig, Row, run_bench
from leastcontrol.methods import get_method
from leastcontrol.solvers import Adam, Anderson, CheckMix, Euler, euler_map_radius

from .helpers import batch, rel_err, tiny_ff, tiny_rnn
from .test_conv import images, tiny_conv_ff, tiny_deq

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")

TIGHT = {"solver": Euler(tol=1e-10, max_steps=3000)}
METHODS = {
    "rbp": TIGHT,
    "lcp-di": TIGHT,
    "lcp-kp": TIGHT,
    "lcp-lf": {**TIGHT, "noise_steps": 20},
    "lcp-ebd": {"controlled": Adam(lr=0.01, tol=0.0, max_steps=200), "ff_init": True,
                "solver": Euler(tol=1e-12, max_steps=3000)},
    "bptt": {"steps": 200},
}


def _on_both(name, options, make, x, y):
    """The method's gradients for the same network and batch on the CPU and on CUDA; the
    feedback weights (KP, LF) are drawn once, on the CPU, and copied."""
    cpu_net = make()
    get_method(name, **options).prepare(cpu_net, torch.Generator().manual_seed(3))
    gpu_net = copy.deepcopy(cpu_net).to(CUDA)
    out = {}
    for key, net, xs, ys in (("cpu", cpu_net, x, y), ("cuda", gpu_net, x.to(CUDA), y.to(CUDA))):
        method = get_method(name, **options)
        torch.manual_seed(0)   # LF's noise: drawn on the CPU generator, then moved
        res = method.gradients(net, *method._inputs(net, xs, ys))
        out[key] = res
    return out["cpu"], out["cuda"]


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("make", [tiny_rnn, tiny_ff], ids=["rnn", "ff"])
def test_every_method_gives_the_cpu_update_on_cuda(name, make):
    net = make()
    x, y = batch(n_in=5, n_out=net.n_out, B=6)
    cpu, gpu = _on_both(name, METHODS[name], make, x, y)
    for g in gpu.grads.values():
        assert g.device.type == "cuda"
    assert rel_err({k: v.cpu() for k, v in gpu.grads.items()}, cpu.grads) < 1e-8
    assert gpu.stats.get("iterations") == cpu.stats.get("iterations")


@pytest.mark.parametrize("name, options", [
    ("ep", {"solver": Euler(dt=0.5, tol=1e-10, max_steps=3000)}),
    ("ep-centered", {"solver": Euler(dt=0.5, tol=1e-10, max_steps=3000)}),
    ("pc", {}), ("pc-clamped-momentum", {}), ("ipc", {}),
])
def test_the_peer_rules_give_the_cpu_update_on_cuda(name, options):
    """EP on the Hopfield network (both readouts' linear one, sigmoid rates), PC and iPC on the ff (the
    clamped output with the momentum rule on a GELU rate-form net too)."""
    from leastcontrol.solvers import Momentum
    from leastcontrol.systems import FeedforwardEquilibrium

    from .helpers import tiny_hopfield
    if name.startswith("ep"):
        def make():
            return tiny_hopfield("sigmoid", "linear", sizes=(5, 6, 4, 3))
    elif name == "pc-clamped-momentum":
        name, options = "pc", {"output": "clamped", "loss": "mse", "beta": 6.0,
                               "inference": Momentum(lr=0.05, momentum=0.65, tol=0.0, max_steps=8)}

        def make():
            return FeedforwardEquilibrium([5, 6, 6, 3], activation="gelu", state="rate", dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(1))
    else:
        make = tiny_ff
    x, y = batch(n_in=5, n_out=3, B=6)
    cpu, gpu = _on_both(name, options, make, x, y)
    assert all(g.device.type == CUDA.type for g in gpu.grads.values())
    assert rel_err({k: v.cpu() for k, v in gpu.grads.items()}, cpu.grads) < 1e-8


def test_bp_on_cuda_is_the_cpu_backprop():
    x, y = batch(n_in=5, n_out=3, B=6)
    cpu, gpu = _on_both("bp", {}, tiny_ff, x, y)
    assert rel_err({k: v.cpu() for k, v in gpu.grads.items()}, cpu.grads) < 1e-12


@pytest.mark.parametrize("make, shape", [(tiny_conv_ff, (1, 12, 12)), (tiny_deq, (2, 8, 8))], ids=["conv-ff", "deq"])
@pytest.mark.parametrize("name", ["rbp", "lcp-di"])
def test_conv_systems_give_the_cpu_update_on_cuda(make, shape, name):
    x, y = images(shape)
    cpu, gpu = _on_both(name, TIGHT, make, x, y)
    assert rel_err({k: v.cpu() for k, v in gpu.grads.items()}, cpu.grads) < 1e-7


@pytest.mark.parametrize("solver", [
    Anderson(tol=1e-10, max_steps=3000),
    Euler(tol=1e-10, max_steps=3000, mix=CheckMix(memory=3, after=30), patience=100),
], ids=["anderson", "euler-mix-stall"])
def test_accelerated_solves_give_the_cpu_update_on_cuda(solver):
    x, y = batch(n_in=5, n_out=3, B=6)
    cpu, gpu = _on_both("lcp-di", {"solver": solver}, tiny_rnn, x, y)
    assert rel_err({k: v.cpu() for k, v in gpu.grads.items()}, cpu.grads) < 1e-7


def test_compiled_steps_on_cuda_give_the_eager_iterates():
    net = tiny_rnn().to(CUDA)
    x, y = batch(n_in=5, n_out=3, B=4)
    x, y = x.to(CUDA), y.to(CUDA)
    opts = {"tol": 1e-9, "max_steps": 400, "mix": CheckMix(memory=3, after=30)}
    eager, compiled = (get_method("lcp-di", solver=Euler(backend=b, **opts)).gradients(net, x, y) for b in ("eager", "compile"))
    assert rel_err(compiled.grads, eager.grads) < 1e-9
    assert compiled.stats["iterations"] == eager.stats["iterations"]


def test_stability_estimate_on_cuda_equals_the_cpus():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 10, 10, generator=g, dtype=torch.float64) / 3
    s = torch.randn(3, 10, generator=g, dtype=torch.float64)

    def field(state):
        return torch.einsum("bij,bj->bi", A.to(state.device), torch.tanh(state)) - state

    cpu = euler_map_radius(field, s)
    gpu = euler_map_radius(field, s.to(CUDA))
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-8)


def test_training_on_cuda_learns_and_its_checkpoint_evaluates_on_the_cpu(tmp_path):
    import json

    from leastcontrol.cli import main
    from leastcontrol.train import TrainConfig, train
    ckpt, out = tmp_path / "run.ckpt", tmp_path / "eval.json"
    config = TrainConfig(model="rnn", method="lcp-di", dataset="digits", hidden=64, epochs=3, limit_train=1024,
                         limit_test=300, device="cuda", checkpoint=str(ckpt), progress=False)
    result = train(config)
    assert result["test_accuracy"] > 0.3   # ten digit classes: chance is 0.1 (the CPU reaches 0.58 here)
    # `eval` rebuilds the system on the CPU from the checkpoint the GPU run wrote.
    assert main(["eval", "--checkpoint", str(ckpt), "--limit-test", "300", "--json-out", str(out)]) == 0
    assert abs(json.loads(out.read_text())["test_accuracy"] - result["test_accuracy"]) < 0.01


def test_bench_on_cuda_reads_the_allocators_peak_for_every_row():
    config = BenchConfig(batch_size=16, hidden=32, batches=2, warmup=1, pretrain=1, device="cuda", progress=False)
    rows = [Row("ff", "bp"), Row("rnn", "rbp"), Row("rnn", "lcp-di"),
            Row("rnn", "lcp-di", path={"solver": {"backend": ["compile"]}}, label="rnn-lcp-di-compile")]
    result = run_bench(config, rows)
    for r in result["rows"]:
        assert r["peak_memory_mb"] is not None and r["peak_memory_mb"] > 0, r["label"]
    # Constant memory in the number of iterations for LCP; unrolled BPTT saves one float32 B × hidden
    # tensor per step for its backward pass (1.37 MB over 700 steps here, counted on the CPU with
    # saved-tensor hooks). The allocator's peak on an H200 grew by 1.08 MB: the bound takes half.
    probes = result["memory_probes_mb"]
    assert probes["lcp_di_800"] == pytest.approx(probes["lcp_di_100"], rel=0.1)
    assert probes["bptt_800"] - probes["bptt_100"] >= 0.5 * 700 * config.batch_size * config.hidden * 4 / 2**20
