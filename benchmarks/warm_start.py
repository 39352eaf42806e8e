"""Where LCP-DI's controlled phase starts, and what that costs against RBP at equal tolerance.

RBP needs the free equilibrium for its adjoint; LCP-DI's controlled dynamics also settle ``v``, so
its free phase is only a starting point. This script takes the bench's fastest equal-tolerance
LCP-DI setting (``rnn-lcp-di-gains-tol1e-4-stall-accel-compile``: tol 1e-4, α 1, k_i 10, patience
100, Euler with check-level Anderson mixing, compiled) and starts its controlled phase from the free
equilibrium to 1e-4 (the bench's setting), to 1e-3, to 1e-2, or from the zero state (the research
code's start, no free phase). On the bench's starting RNN with the weights held fixed, interleaved
batch by batch with ``rnn-rbp-compile``, it prints per setting: median seconds per batch and the
ratio to RBP's, steps per sample (free plus controlled), and the cosine (float64) of the update
with the 1e-4 start's, median and minimum over the batches.

    python benchmarks/warm_start.py --data-dir ../shared/data/mnist --json-out docs/runs/warm_start.json
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from leastcontrol import bench  # noqa: E402
from leastcontrol.atomic import write_json  # noqa: E402
from leastcontrol.config import merge  # noqa: E402
from leastcontrol.methods.lcp import local_update  # noqa: E402
from leastcontrol.solvers import SolveResult, SolveStats  # noqa: E402

import _fixed_network  # noqa: E402  (benchmarks/, on the path as the script's folder)

LCP_ROW, RBP_ROW = "rnn-lcp-di-gains-tol1e-4-stall-accel-compile", "rnn-rbp-compile"
STARTS = (("free 1e-4", 1e-4), ("free 1e-3", 1e-3), ("free 1e-2", 1e-2), ("zero", None))


def _zero_start(method, net, x) -> SolveResult:
    """The zero state as a 'free equilibrium' of no steps: the controlled dynamics start there."""
    op, B = method._flat_operator(net), x.shape[0]
    none = torch.zeros(B, dtype=torch.int64)
    stats = SolveStats(0, none, none, torch.zeros(B, dtype=torch.float64))
    return SolveResult(op.unpack(x.new_zeros(B, op.n_state)), stats)


def _update(method, net, x, y, zero: bool):
    """Flat update and steps per sample of one batch (``zero``: controlled phase from the zero state)."""
    x, y = method._inputs(net, x, y)
    if not zero:
        out = method.gradients(net, x, y)
        grads, steps = out.grads, out.stats["sample_iterations"]
    else:
        ctrl = method.controlled_equilibrium(net, x, y, _zero_start(method, net, x))
        grads, steps = local_update(net, x, ctrl), ctrl.stats.mean_sample_steps
    return bench.flat_update(grads).double(), float(steps)


def measure(config: bench.BenchConfig):
    rows = {r.name: r for r in bench.default_rows()}
    batches = bench._batches(config, config.warmup + config.batches)
    net = bench._pretrained("rnn", config, batches)
    settings = {RBP_ROW: (rows[RBP_ROW].build(), False)}
    for name, tol in STARTS:
        # The zero start runs no free phase, so it takes the row's settings as they are.
        row = rows[LCP_ROW]
        path = row.path if tol is None else merge(row.path, {"free": {"tol": tol}})
        settings[name] = (bench.Row(row.model, row.method, row.impl, path).build(), tol is None)
    records = {name: [] for name in settings}
    for i, (x, y) in enumerate(batches):
        for name, (method, zero) in settings.items():
            copy_ = copy.deepcopy(net)
            t0 = time.perf_counter()
            flat, steps = _update(method, copy_, x, y, zero)
            seconds = time.perf_counter() - t0
            if i >= config.warmup:
                records[name].append((seconds, steps, flat))
    reference = [flat for _, _, flat in records["free 1e-4"]]
    rbp_median = statistics.median(s for s, _, _ in records[RBP_ROW])
    out = {}
    for name, rec in records.items():
        median = statistics.median(s for s, _, _ in rec)
        entry = {"seconds_per_batch_median": median, "ratio_to_rbp": median / rbp_median,
                 "steps_per_sample": statistics.mean(st for _, st, _ in rec)}
        if name != RBP_ROW:
            cos = [float(torch.nn.functional.cosine_similarity(f, r, dim=0)) for (_, _, f), r in zip(rec, reference)]
            entry.update(update_cosine_median=statistics.median(cos), update_cosine_min=min(cos))
        out[name] = entry
        shown = "  ".join(f"{k} {v:.4g}" for k, v in entry.items())
        print(f"{name:16s} {shown}", flush=True)
    return out


def main(argv=None):
    args, config = _fixed_network.parse(__doc__.split("\n\n")[0], argv)
    out = measure(config)
    if args.json_out:
        write_json(args.json_out, {"threads": args.threads, "batches": args.batches, "lcp_row": LCP_ROW,
                                   "rbp_row": RBP_ROW, "settings": out})


if __name__ == "__main__":
    main()
