"""What one Euler step costs by the number of samples it runs on: PyTorch eager, compiled, and in C.

The bench's RNN size (784 inputs, 256 hidden, 10 outputs; random weights: a step's cost does not
depend on them), a batch of B random MNIST-shaped inputs, and each solve run for exactly
``--steps`` steps (tol 0, so no sample stops): the free phase, RBP's adjoint and LCP-DI's
controlled phase, timed through the methods' own calls. Printed and written: microseconds per
step, the median over ``--repeats`` solves, and the ratio of the compiled step to the C step.
The C path (``native=True``) takes over a solve's tail once at most 16 samples are active; this
shows where that pays.

    python benchmarks/native_steps.py --threads 2 --json-out docs/runs/native_steps.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from leastcontrol.atomic import write_json  # noqa: E402
from leastcontrol.methods import get_method  # noqa: E402
from leastcontrol.systems import get_system  # noqa: E402

PATHS = {"eager": {}, "compiled": {"compile": True}, "native": {"native": True, "solver_options": {"native_batch": 10 ** 6}}}
PHASES = ("free", "adjoint", "controlled")


def per_step_us(phase, path, B, steps, repeats, net):
    """Median microseconds per step of the ``phase`` solve on ``B`` samples along ``path`` (the solve
    alone: the free state a second phase starts from is computed once, outside the timing)."""
    method = get_method("rbp" if phase in ("free", "adjoint") else "lcp-di", tol=0.0, max_iter=steps, **PATHS[path])
    g = torch.Generator().manual_seed(B)
    x, y = method._inputs(net, torch.rand(B, 784, generator=g), torch.randint(0, 10, (B,), generator=g))
    free = method.free_equilibrium(net, x)
    solve = {"free": lambda: method.free_equilibrium(net, x),
             "adjoint": lambda: method.adjoint(net, x, free.state, y),
             "controlled": lambda: method.controlled_equilibrium(net, x, y, free)}[phase]
    times = []
    for i in range(repeats + 2):   # two untimed: compilation, the first build
        t0 = time.perf_counter()
        solve()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    net = get_system("rnn", 784, 10, hidden=256, generator=torch.Generator().manual_seed(0))
    out = {}
    print("| phase | samples | eager µs/step | compiled µs/step | C µs/step | compiled / C |")
    print("|---|---|---|---|---|---|")
    for phase in PHASES:
        for B in args.batches:
            r = {path: per_step_us(phase, path, B, args.steps, args.repeats, net) for path in PATHS}
            r["compiled_over_native"] = r["compiled"] / r["native"]
            out[f"{phase}-{B}"] = {"phase": phase, "samples": B, **r}
            print(f"| {phase} | {B} | {r['eager']:.1f} | {r['compiled']:.1f} | {r['native']:.1f} | "
                  f"{r['compiled_over_native']:.2f} |", flush=True)
    if args.json_out:
        write_json(args.json_out, {"threads": args.threads, "steps": args.steps, "repeats": args.repeats, "rows": out})
    return out


if __name__ == "__main__":
    main()
