"""Why a few samples per batch make LCP-DI's controlled phase run to max_iter.

On the bench's starting RNN (``leastcontrol bench``'s pretraining, MNIST batches of 64, published
settings), for each batch: the samples whose controlled dynamics end above tol under Euler; for each
of them, Newton's method on the controlled fixed-point equations (float64, exact Jacobian from an
explicit field written here, independent of the library's fused kernels) from the free equilibrium,
and at the root it finds the largest modulus of the Euler map's eigenvalues, ``max |1 + dt·λ|``:
above 1, Euler iterates circle that equilibrium without ever reaching it. Then the same batches with
the Anderson solver after an Euler warm-up (group-weighted least squares), for the fraction of
samples it settles. A sample counts as not settled when it ends above 10·tol.

    python benchmarks/controlled_tail.py --data-dir ../shared/data/mnist --json-out docs/runs/controlled_tail.json

First, at the bench's fastest LCP-DI settings (α 1, k_i 10, warm start 1e-4, patience 100), without and
with Euler's check-level Anderson mixing: how the samples that take more than 150 controlled steps end
(``--composition-only`` stops there).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from leastcontrol.atomic import write_json  # noqa: E402
from leastcontrol.bench import BenchConfig, _batches, _pretrained  # noqa: E402
from leastcontrol.methods import get_method  # noqa: E402
from leastcontrol.solvers import Anderson, CheckMix, Euler, relative_residual  # noqa: E402

TAIL = 10.0   # a sample ending above TAIL·tol counts as not settled
HYBRID = {"warmup": 100, "memory": 10, "start_below": math.inf, "restart": 1e6}
LONG = 150    # controlled steps above which a sample counts as part of the tail
# The bench's fastest LCP-DI setting (-gains-stall), without and with Euler's check-level mixing.
TAIL_SETTINGS = {"gains-stall": {"alpha": 1.0, "k_i": 10.0, "solver": Euler(patience=100), "free": {"tol": 1e-4}},
                 "gains-stall-accel": {"alpha": 1.0, "k_i": 10.0, "free": {"tol": 1e-4},
                                       "solver": Euler(patience=100, mix=CheckMix(memory=3, after=60))}}


def tail_composition(net, batches, settings):
    """How the samples that take more than ``LONG`` controlled steps end: at tol, stalled, or at max_iter."""
    m = get_method("lcp-di", **settings)
    tol, cap = m.controlled.tol, m.controlled.max_steps
    out = {"long": 0, "reached_tol": 0, "stalled": 0, "at_max_iter": 0, "steps_per_batch": []}
    for x, y in batches:
        x, y = m._inputs(net, x, y)
        st = m.controlled_equilibrium(net, x, y, m.free_equilibrium(net, x)).stats
        out["steps_per_batch"].append(st.steps)
        long = st.sample_steps > LONG
        out["long"] += int(long.sum())
        out["reached_tol"] += int((long & (st.sample_residual < tol)).sum())
        out["at_max_iter"] += int((long & (st.sample_residual >= tol) & (st.sample_steps >= cap)).sum())
    out["stalled"] = out["long"] - out["reached_tol"] - out["at_max_iter"]
    out["steps_per_batch"] = statistics.mean(out["steps_per_batch"])
    return out


def explicit_field(net, x, y, alpha, k_i):
    """``ż`` of the controlled RNN for one sample, ``z = [v | o | e | u_int]`` (float64)."""
    W, D, U, b, c = (p.detach().double() for p in (net.W, net.D, net.U, net.b, net.c))
    drive = U @ x.double() + b
    target = torch.nn.functional.one_hot(y, D.shape[0]).double()
    H, O = W.shape[0], D.shape[0]

    def field(z, batch_size):
        v, o, e, u_int = z[:H], z[H:H + O], z[H + O:2 * H + O], z[2 * H + O:]
        r = torch.tanh(v)
        grad_o = (torch.softmax(o, -1) - target) / batch_size
        u = k_i * u_int
        return torch.cat([W @ r + drive - v + e, D @ r + c - o + u,
                          (1 - r * r) * (W.T @ e + D.T @ u) - e, -grad_o - alpha * u_int])
    return field


def relative_residuals(z, g, widths):
    """The per-population relative residual of one sample, the largest over ``widths`` (the solvers' rule)."""
    return float(relative_residual(g[None], z[None], widths))


def newton(field, z0, B, widths, steps=40):
    z = z0.clone()
    for _ in range(steps):
        J = torch.autograd.functional.jacobian(lambda q: field(q, B), z, vectorize=True)
        z = z - torch.linalg.lstsq(J, field(z, B)[:, None]).solution[:, 0]
    J = torch.autograd.functional.jacobian(lambda q: field(q, B), z, vectorize=True)
    euler_modulus = float((1 + torch.linalg.eigvals(J)).abs().max())
    return z, relative_residuals(z, field(z, B), widths), euler_modulus


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--json-out", default=None)
    p.add_argument("--composition-only", action="store_true",
                   help="only the composition of the tail at the bench's fastest settings (no Newton, no Anderson)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = BenchConfig(data_dir=args.data_dir, memory=False, progress=False)
    batches = _batches(config, config.pretrain + config.warmup + config.batches)
    net = _pretrained("rnn", config, batches)
    composition = {}
    for name, settings in TAIL_SETTINGS.items():
        c = composition[name] = tail_composition(net, batches[:args.batches], settings)
        print(f"{name}: {c['long']} samples above {LONG} controlled steps: {c['reached_tol']} reached tol, "
              f"{c['stalled']} stalled, {c['at_max_iter']} at max_iter; {c['steps_per_batch']:.1f} controlled steps per batch")
    if args.composition_only:
        if args.json_out:
            write_json(Path(args.json_out), {"config": {"batches": args.batches}, "tail_composition": composition})
        return composition
    euler = get_method("lcp-di")
    hybrid = get_method("lcp-di", solver=Anderson(**HYBRID))
    H, O = net.n_hidden, net.n_out
    widths = [H + O, H, O]
    tail, summary = [], {"euler": [], "hybrid": []}
    for i, (x, y) in enumerate(batches[:args.batches]):
        x, y = euler._inputs(net, x, y)
        free = euler.free_equilibrium(net, x)
        for name, m in (("euler", euler), ("hybrid", hybrid)):
            ctrl = m.controlled_equilibrium(net, x, y, free)
            summary[name].append({"batch": i, "iterations": ctrl.stats.steps,
                                  "converged_fraction": ctrl.stats.converged_fraction,
                                  "sample_iterations": ctrl.stats.mean_sample_steps})
            if name != "euler":
                continue
            z = torch.cat([ctrl.state["v"], ctrl.state["o"], ctrl.control["v"], ctrl.control["o"] / m.k_i], 1).double()
            for j in range(x.shape[0]):
                field = explicit_field(net, x[j], y[j], m.alpha, m.k_i)
                r = relative_residuals(z[j], field(z[j], x.shape[0]), widths)
                if r < TAIL * m.controlled.tol:   # settled (up to the last step's float32 rounding)
                    continue
                z0 = torch.cat([free.state["v"][j], free.state["o"][j], z.new_zeros(H + O)]).double()
                root, root_res, modulus = newton(field, z0, x.shape[0], widths)
                tail.append({"batch": i, "sample": j, "euler_residual": r, "newton_residual": root_res,
                             "euler_map_max_modulus_at_root": modulus,
                             "distance_v_euler_to_root": float((z[j, :H] - root[:H]).norm()),
                             "distance_v_free_to_root": float((free.state["v"][j].double() - root[:H]).norm())})
                t = tail[-1]
                print(f"batch {i:2d} sample {j:2d}: Euler ends at {r:.1e}; Newton root residual {root_res:.1e}, "
                      f"max|1+λ| there {modulus:.4f}, |v_root − v_free| {t['distance_v_free_to_root']:.2f}")
    result = {"config": {"batches": args.batches, "data_dir": bool(args.data_dir), "hybrid": HYBRID},
              "tail": tail, "batches": summary, "tail_composition": composition}
    for name, rows in summary.items():
        conv = statistics.mean(r["converged_fraction"] for r in rows)
        print(f"{name:6s}: converged fraction {conv:.4f}, batches at max_iter "
              f"{sum(r['iterations'] >= euler.controlled.max_steps for r in rows)}/{len(rows)}, "
              f"steps per sample {statistics.mean(r['sample_iterations'] for r in rows):.1f}")
    outside = sum(t["newton_residual"] < 1e-10 and t["euler_map_max_modulus_at_root"] > 1 for t in tail)
    print(f"{len(tail)} samples end above tol under Euler; Newton finds a root for "
          f"{sum(t['newton_residual'] < 1e-10 for t in tail)}, of which {outside} have Euler eigenvalues outside the unit circle")
    if args.json_out:
        write_json(Path(args.json_out), result)
    return result


if __name__ == "__main__":
    main()
