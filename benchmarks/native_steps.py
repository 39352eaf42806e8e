"""What one Euler step costs by the number of samples it runs on: PyTorch eager, compiled, and in C.

The bench's RNN size (784 inputs, 256 hidden, 10 outputs; random weights: a step's cost does not
depend on them), a batch of B random MNIST-shaped inputs, and each solve run for exactly
``--steps`` steps (tol 0, so no sample stops): the free phase, RBP's adjoint and LCP-DI's
controlled phase, timed through the methods' own calls and the solver driver (a convergence check
every ``--check-every`` steps, in Python, whatever the backend). The three paths are the Euler
solver's backends: ``eager``, ``compile`` and ``native`` (here with no limit on the active samples;
a solver's ``backend=("native", "compile")`` gives the C steps at most 16). Printed and written:
microseconds per step, the median (or with ``--statistic min`` the fastest, the one a busy machine
disturbed least) over ``--repeats`` solves, and the ratio of the compiled step to the C step.

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
from leastcontrol.solvers import Euler  # noqa: E402
from leastcontrol.solvers.backends import Native  # noqa: E402
from leastcontrol.systems import get_system  # noqa: E402

PATHS = {"eager": ("eager",), "compiled": ("compile",), "native": (Native(max_batch=10 ** 6),)}
PHASES = ("free", "adjoint", "controlled")


def per_step_us(phase, path, B, steps, repeats, check_every, net, statistic="median"):
    """Median (or fastest) microseconds per step of the ``phase`` solve on ``B`` samples along ``path`` (the solve
    alone: the free state a second phase starts from is computed once, outside the timing)."""
    solver = Euler(tol=0.0, max_steps=steps, check_every=check_every, backend=PATHS[path])
    method = get_method("rbp" if phase in ("free", "adjoint") else "lcp-di", solver=solver)
    g = torch.Generator().manual_seed(B)
    x, y = method._inputs(net, torch.rand(B, 784, generator=g), torch.randint(0, 10, (B,), generator=g))
    free = method.free_equilibrium(net, x)
    solve = {"free": lambda: method.free_equilibrium(net, x),
             "adjoint": lambda: method.adjoint_equilibrium(net, x, free.state, y),
             "controlled": lambda: method.controlled_equilibrium(net, x, y, free)}[phase]
    times = []
    for i in range(repeats + 2):   # two untimed: compilation, the first build
        t0 = time.perf_counter()
        solve()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1e6 * (min(times) if statistic == "min" else statistics.median(times)) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--check-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--statistic", choices=("median", "min"), default="median")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    net = get_system("rnn", 784, 10, hidden=256, generator=torch.Generator().manual_seed(0))
    out = {}
    names = {"eager": "eager", "compiled": "compiled", "native": "C"}
    print("| phase | samples | " + " | ".join(f"{names[p]} µs/step" for p in args.paths)
          + (" | compiled / C |" if {"compiled", "native"} <= set(args.paths) else " |"))
    print("|---|---|" + "---|" * (len(args.paths) + ({"compiled", "native"} <= set(args.paths))))
    for phase in args.phases:
        for B in args.batches:
            r = {path: per_step_us(phase, path, B, args.steps, args.repeats, args.check_every, net, args.statistic) for path in args.paths}
            cells = [f"{r[path]:.1f}" for path in args.paths]
            if {"compiled", "native"} <= set(r):
                r["compiled_over_native"] = r["compiled"] / r["native"]
                cells.append(f"{r['compiled_over_native']:.2f}")
            out[f"{phase}-{B}"] = {"phase": phase, "samples": B, **r}
            print(f"| {phase} | {B} | " + " | ".join(cells) + " |", flush=True)
    if args.json_out:
        write_json(args.json_out, {"threads": args.threads, "steps": args.steps, "check_every": args.check_every,
                                   "repeats": args.repeats, "statistic": args.statistic, "rows": out})
    return out


if __name__ == "__main__":
    main()
