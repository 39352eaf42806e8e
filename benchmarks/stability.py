"""Which free equilibria are ones the Euler dynamics leave: ``check_stability`` against the dense Jacobian.

On the bench's starting RNN (``leastcontrol bench``'s pretraining, MNIST batches of 64), with the
weights held fixed, RBP's free phase runs with Euler and with the Anderson solver (the settings of
the bench rows ``rnn-rbp`` and ``rnn-rbp-anderson``). At each free equilibrium the Krylov estimate
of every sample's Euler-map spectral radius (``euler_map_radius``, 30 Jacobian-vector products) is
compared with the largest eigenvalue modulus of the dense Jacobian ``I + ∂f`` (float64). Printed
and written, per solver: samples flagged unstable (radius > ``UNSTABLE_RADIUS``) and the batches
they are in, the same count from the dense Jacobian, the largest radius, the estimate's largest
error, and the median seconds of the free solve and of the check.

    python benchmarks/stability.py --data-dir ../shared/data/mnist --threads 2 --json-out docs/runs/stability.json
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from leastcontrol.atomic import write_json  # noqa: E402
from leastcontrol.solvers import UNSTABLE_RADIUS, euler_map_radius  # noqa: E402

import _fixed_network  # noqa: E402  (benchmarks/, on the path as the script's folder)

ROWS = ("rnn-rbp", "rnn-rbp-anderson")


def _dense_radius(op, s: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
    """Per sample, max |eig(I + ∂f)| from the Jacobian formed column by column (float64)."""
    radii = []
    for i in range(s.shape[0]):
        J = torch.func.jacfwd(lambda z: op.f(z[None], drive[i:i + 1])[0])(s[i]).double()
        radii.append(torch.linalg.eigvals(torch.eye(J.shape[0], dtype=torch.float64) + J).abs().max())
    return torch.stack(radii)


def profile(config):
    rows, batches, net = _fixed_network.rows_and_network(list(ROWS), config)
    out = {}
    for label, row in zip(ROWS, rows):
        method = row.build()
        solve_s, check_s, flagged, dense_flagged, worst_err, top = [], [], [], 0, 0.0, 0.0
        for b, (x, _) in enumerate(batches[config.warmup:]):
            system = copy.deepcopy(net)
            x = system.prepare_input(x)
            t0 = time.perf_counter()
            free = method.free_equilibrium(system, x)
            solve_s.append(time.perf_counter() - t0)
            op = method._flat_operator(system)
            drive, s = op.drive(x), op.pack(free.state)
            t0 = time.perf_counter()
            radius = euler_map_radius(lambda z, c: op.f(z, c["drive"]), s, {"drive": drive}, dt=method.free.dt)
            check_s.append(time.perf_counter() - t0)
            dense = _dense_radius(op, s, drive)
            flagged += [(b, int(i)) for i in (radius > UNSTABLE_RADIUS).nonzero().squeeze(1)]
            dense_flagged += int((dense > UNSTABLE_RADIUS).sum())
            worst_err = max(worst_err, float((radius - dense).abs().max()))
            top = max(top, float(dense.max()))
        out[label] = {
            "solver": method.free.name, "batches": len(solve_s), "samples": len(solve_s) * config.batch_size,
            "unstable_samples": len(flagged), "unstable_samples_dense": dense_flagged,
            "unstable_at_batch_sample": flagged, "largest_radius_dense": top,
            "largest_estimate_error": worst_err,
            "seconds_free_solve_median": statistics.median(solve_s),
            "seconds_check_median": statistics.median(check_s),
        }
        print(f"{label} ({method.free.name}): unstable {len(flagged)} of {out[label]['samples']} samples "
              f"(dense Jacobian: {dense_flagged}) at {flagged}; largest radius {top:.4f}; estimate error "
              f"≤ {worst_err:.2e}; free solve {1e3 * out[label]['seconds_free_solve_median']:.1f} ms, "
              f"check {1e3 * out[label]['seconds_check_median']:.1f} ms", flush=True)
    return out


def main(argv=None):
    args, config = _fixed_network.parse(__doc__.split("\n\n")[0], argv)
    out = profile(config)
    if args.json_out:
        write_json(args.json_out, {"threads": args.threads, "batches": args.batches, "rows": out})


if __name__ == "__main__":
    main()
