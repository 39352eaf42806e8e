"""How many controlled steps each sample needs, and whether rounding or the controller sets it.

On the bench's starting RNN (weights fixed, its warm-up and timed MNIST batches of 64), LCP-DI's
controlled dynamics run from the free equilibrium (warm start 1e-4) with Euler, every step
checked, each sample frozen at the first step its residual is below tol 1e-6, up to ``--cap``
steps. Per setting it prints the quantiles of the per-sample step counts, the samples that take
more than 150 steps or never settle, and the mean over batches of the slowest sample's count
(what a batch pays without the stall rule). The settings share β = k_i/α + k_p = 10 and so the
controlled equilibrium; they differ in the controller's split of β, and in the precision:

- ``float32``: α 1, k_i 10 (the bench's fast gains);
- ``float64``: the same in double precision (network and inputs): is the tail float32 rounding?
- ``k_p 5`` and ``k_p 9``: part of β moved to the proportional gain, which damps the loop:
  is the tail the controller's oscillation?

Then, in float64, the library's Anderson solver after 100 Euler steps (memory 10) on the same
controlled phases: controlled steps per batch, samples it leaves above tol, and samples that Euler
(cap 5000) settles but whose control it ends more than 1 % away from Euler's.

    python benchmarks/controlled_settling.py --data-dir ../shared/data/mnist --json-out FILE
"""
from __future__ import annotations

import copy
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from leastcontrol.atomic import write_json  # noqa: E402
from leastcontrol.methods import get_method  # noqa: E402
from leastcontrol.solvers import Anderson, Euler  # noqa: E402

import _fixed_network  # noqa: E402  (benchmarks/, on the path as the script's folder)

SETTINGS = {
    "float32": ({"alpha": 1.0, "k_i": 10.0}, torch.float32),
    "float64": ({"alpha": 1.0, "k_i": 10.0}, torch.float64),
    "k_p 5": ({"alpha": 1.0, "k_i": 5.0, "k_p": 5.0}, torch.float32),
    "k_p 9": ({"alpha": 1.0, "k_i": 1.0, "k_p": 9.0}, torch.float32),
}
LONG = 150
HYBRID = {"warmup": 100, "memory": 10, "start_below": math.inf, "restart": 1e6}
WARM = {"tol": 1e-4}   # the free phase, where the controlled dynamics start


def settling(net, batches, gains, dtype, cap):
    """Per-sample controlled step counts (``cap + 1`` for a sample that never reached tol)."""
    method = get_method("lcp-di", **gains, solver=Euler(max_steps=cap, check_every=1), free=WARM)
    net = copy.deepcopy(net).to(dtype)
    steps, slowest = [], []
    for x, y in batches:
        x, y = method._inputs(net, x.to(dtype), y)
        stats = method.controlled_equilibrium(net, x, y, method.free_equilibrium(net, x)).stats
        n = torch.where(stats.sample_residual < method.controlled.tol, stats.sample_steps, cap + 1)
        steps += n.tolist()
        slowest.append(int(n.max()))
    return steps, slowest


def anderson_tail(net, batches):
    """Euler's controlled phase (cap 5000) against Anderson's after an Euler warm-up, float64."""
    gains = {"alpha": 1.0, "k_i": 10.0, "free": WARM}
    euler = get_method("lcp-di", **gains, solver=Euler(max_steps=5000))
    hybrid = get_method("lcp-di", **gains, solver=Anderson(**HYBRID))
    net = copy.deepcopy(net).double()
    out = {"steps_per_batch": [], "unsettled": 0, "settled_by_euler_off": 0}
    for x, y in batches:
        x, y = euler._inputs(net, x.double(), y)
        free = euler.free_equilibrium(net, x)
        a, b = (m.controlled_equilibrium(net, x, y, free) for m in (euler, hybrid))
        psi_a, psi_b = (torch.cat(list(c.control.values()), 1) for c in (a, b))
        off = (psi_a - psi_b).norm(dim=1) > 1e-2 * psi_a.norm(dim=1)
        out["steps_per_batch"].append(b.stats.steps)
        out["unsettled"] += int((b.stats.sample_residual >= hybrid.controlled.tol).sum())
        out["settled_by_euler_off"] += int((off & (a.stats.sample_residual < euler.controlled.tol)).sum())
    out["mean_steps_per_batch"] = statistics.mean(out["steps_per_batch"])
    print(f"anderson after 100 Euler steps, float64: {out['mean_steps_per_batch']:.0f} controlled steps per batch; "
          f"{out['unsettled']} samples above tol; {out['settled_by_euler_off']} that Euler settles end > 1 % away")
    return out


def main(argv=None):
    args, config = _fixed_network.parse(__doc__.splitlines()[0], argv,
                                        lambda p: p.add_argument("--cap", type=int, default=3000))
    _, batches, net = _fixed_network.rows_and_network(["rnn-lcp-di"], config)
    out = {}
    for name, (gains, dtype) in SETTINGS.items():
        steps, slowest = settling(net, batches, gains, dtype, args.cap)
        q = torch.tensor([s for s in steps if s <= args.cap], dtype=torch.float64)
        r = out[name] = {
            "gains": gains, "dtype": str(dtype).removeprefix("torch."),
            "median": float(q.median()), "p90": float(q.quantile(0.9)), "p99": float(q.quantile(0.99)),
            "above_150": sum(s > LONG for s in steps), "never": sum(s > args.cap for s in steps),
            "samples": len(steps), "mean_slowest_per_batch": statistics.mean(slowest), "slowest": slowest,
        }
        print(f"{name:8s} steps per sample: median {r['median']:.0f}, 90 % {r['p90']:.0f}, 99 % {r['p99']:.0f}; "
              f"{r['above_150']} of {r['samples']} above {LONG}, {r['never']} not settled in {args.cap}; "
              f"slowest per batch, mean {r['mean_slowest_per_batch']:.0f}", flush=True)
    tail = anderson_tail(net, batches)
    if args.json_out:
        write_json(args.json_out, {"threads": args.threads, "batches": args.batches, "cap": args.cap, "rows": out,
                                   "anderson_tail": tail})
    return out


if __name__ == "__main__":
    main()
