"""Do the bench's fast settings give the method's update, sample by sample?

The bench compares each row's update with its reference path's on the batches where that
reference settles within its own cap (``update_cosine_vs_autograd``). This script looks closer,
with the bench's starting network held fixed (or weights saved from one, ``--weights``): on every
timed batch it compares each named row with a reference that is the same method on its plain
published path (Euler, published gains, no stall rule, no mixing) solved to tol 1e-6 with a cap
of 5000 steps, so that slow samples settle too, and it compares the controls ``ψ*`` per sample.
Compiled rows run the eager iterates (tests/test_fast_path.py), so their eager twins stand for them.

Printed and written, per row: the median and the smallest update cosine over the batches, the
batches below 0.9999, and for LCP rows the same cosines from the samples the reference settles
alone (a sample whose controlled dynamics never settle has no equilibrium to agree on: any step
count gives another snapshot of its orbit), and per sample how many controls ``ψ*`` differ from
the reference's by more than 1 % (relative), split by whether the reference's sample settled.

    python benchmarks/update_agreement.py --data-dir ../shared/data/mnist --json-out FILE \\
        rnn-lcp-di rnn-lcp-di-gains-stall-accel rnn-rbp rnn-rbp-accel
"""
from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from leastcontrol import bench  # noqa: E402
from leastcontrol.atomic import write_json  # noqa: E402
from leastcontrol.methods import get_method  # noqa: E402
from leastcontrol.methods.lcp import LCPDI, ControlledEquilibrium, local_update  # noqa: E402
from leastcontrol.solvers import Euler  # noqa: E402

import _fixed_network  # noqa: E402  (benchmarks/, on the path as the script's folder)

REFERENCE = {"tol": 1e-6, "max_steps": 5000}   # Euler, every phase
OFF = 1e-2          # a sample's control differs when its relative error exceeds this
SETTLED = 10.0      # the reference's sample counts as settled below SETTLED·tol


def _controls(ctrl, B):
    return torch.cat([ctrl.control[k].reshape(B, -1) for k in sorted(ctrl.control)], 1).double()


def _settled_update(net, x, ctrl, settled):
    """The LCP update from the samples in ``settled`` alone (the others' controls set to zero)."""
    keep = settled.to(x.dtype)
    control = {k: c * keep.view(-1, *([1] * (c.dim() - 1))) for k, c in ctrl.control.items()}
    masked = ControlledEquilibrium(ctrl.state, control, ctrl.stats, ctrl.free)
    return bench.flat_update(local_update(net, x, masked)).double()


def agreement(rows, batches, net):
    """Per row, the update cosines and per-sample control errors against the reference."""
    out = {}
    refs = {}
    for row in rows:
        method = row.build()
        if row.method_name not in refs:
            reference = get_method(row.method_name, solver=Euler(**REFERENCE))
            refs[row.method_name] = []
            for x, y in batches:
                torch.manual_seed(0)
                grads = reference.gradients(copy.deepcopy(net), *reference._inputs(net, x, y)).grads
                entry = {"update": bench.flat_update(grads).double()}
                if isinstance(reference, LCPDI):
                    xs, ys = reference._inputs(net, x, y)
                    ctrl = reference.controlled_equilibrium(net, xs, ys)
                    entry["psi"] = _controls(ctrl, len(x))
                    entry["settled"] = ctrl.stats.sample_residual < SETTLED * reference.controlled.tol
                    entry["settled_update"] = _settled_update(net, xs, ctrl, entry["settled"])
                refs[row.method_name].append(entry)
        r = out[row.name] = {"cosines": [], "settled_cosines": [], "samples_off_settled": 0, "samples_off_unsettled": 0,
                             "reference_unsettled": 0, "samples": 0}
        for (x, y), ref in zip(batches, refs[row.method_name]):
            torch.manual_seed(0)
            grads = method.gradients(copy.deepcopy(net), *method._inputs(net, x, y)).grads
            update = bench.flat_update(grads).double()
            r["cosines"].append(float(torch.nn.functional.cosine_similarity(update, ref["update"], dim=0)))
            if "psi" in ref and isinstance(method, LCPDI):
                xs, ys = method._inputs(net, x, y)
                ctrl = method.controlled_equilibrium(net, xs, ys)
                psi = _controls(ctrl, len(x))
                r["settled_cosines"].append(float(torch.nn.functional.cosine_similarity(
                    _settled_update(net, xs, ctrl, ref["settled"]), ref["settled_update"], dim=0)))
                err = (psi - ref["psi"]).norm(dim=1) / ref["psi"].norm(dim=1).clamp_min(1e-30)
                off, settled = err > OFF, ref["settled"].to(err.device)
                r["samples_off_settled"] += int((off & settled).sum())
                r["samples_off_unsettled"] += int((off & ~settled).sum())
                r["reference_unsettled"] += int((~settled).sum())
                r["samples"] += len(x)
        c = r["cosines"]
        r.update(median_cosine=statistics.median(c), min_cosine=min(c), batches_below_0_9999=sum(v < 0.9999 for v in c))
        if r["settled_cosines"]:
            r.update(settled_median_cosine=statistics.median(r["settled_cosines"]),
                     settled_min_cosine=min(r["settled_cosines"]))
        print(f"{row.name:40s} cosine median {r['median_cosine']:.6f} min {r['min_cosine']:.4f} "
              f"below 0.9999 in {r['batches_below_0_9999']}/{len(c)} batches"
              + (f"; settled samples alone: median {r['settled_median_cosine']:.6f} min {r['settled_min_cosine']:.4f}"
                 f"; controls off by >1 %: {r['samples_off_settled']} of the reference's settled samples, "
                 f"{r['samples_off_unsettled']} of its {r['reference_unsettled']} unsettled ones "
                 f"({r['samples']} samples)" if r["samples"] else ""), flush=True)
    return out


def main(argv=None):
    def extra(p):
        p.add_argument("rows", nargs="+", help="bench row labels (see leastcontrol bench)")
        p.add_argument("--weights", default=None,
                       help="a state_dict of the bench's RNN to start from instead of pretraining one")

    args, config = _fixed_network.parse(__doc__.splitlines()[0], argv, extra)
    rows, batches, net = _fixed_network.rows_and_network(args.rows, config, weights=args.weights)
    out = agreement(rows, batches[config.warmup:], net)
    if args.json_out:
        write_json(Path(args.json_out), {"batches": args.batches, "weights": args.weights, "reference": REFERENCE,
                                               "rows": out})


if __name__ == "__main__":
    main()
