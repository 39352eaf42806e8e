"""Iterations to convergence of Euler, Anderson and Broyden on the DEQ's free equilibrium.

Runs the published DEQ (48 channels, 64 inner, GroupNorm(8)) at its initialisation on MNIST-
shaped batches (real MNIST with --data-dir, else uniform noise), each solver to the same
tolerance, and prints iterations, seconds and the ratios to Euler; --json-out writes them.

    python benchmarks/deq_solvers.py --data-dir ../shared/data/mnist --json-out docs/runs/deq_solvers.json
"""
import argparse

import statistics
import time

import torch

from leastcontrol.atomic import write_json
from leastcontrol.data import load_dataset
from leastcontrol.methods import RBP
from leastcontrol.solvers import get_solver
from leastcontrol.systems import DEQ


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tol", type=float, nargs="+", default=[1e-4, 1e-6])
    p.add_argument("--max-iter", type=int, default=800)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    n = args.batches * args.batch_size
    if args.data_dir:
        x = load_dataset("mnist", args.data_dir, limit_train=n, limit_test=1).train_x
    else:
        x = torch.rand(n, 1, 28, 28)
    deq = DEQ((1, 28, 28), 10, generator=torch.Generator().manual_seed(0)).to(args.device).eval()
    rows = []
    for tol in args.tol:
        for name in ("euler", "anderson", "broyden"):
            its, secs, conv = [], [], []
            for b in range(args.batches):
                xb = x[b * args.batch_size:(b + 1) * args.batch_size].to(args.device)
                solver = get_solver(name, tol=tol, max_steps=args.max_iter, check_every=1 if name != "euler" else 10)
                t0 = time.perf_counter()
                res = RBP().free_equilibrium(deq, xb, solver=solver)
                secs.append(time.perf_counter() - t0)
                its.append(res.stats.mean_sample_steps)
                conv.append(res.stats.converged_fraction)
            rows.append({"tol": tol, "solver": name, "mean_sample_iterations": statistics.mean(its),
                         "seconds_per_batch": statistics.mean(secs), "converged_fraction": statistics.mean(conv)})
    euler = {r["tol"]: r for r in rows if r["solver"] == "euler"}
    print(f"{'tol':>8} {'solver':>9} {'iterations':>11} {'s/batch':>8} {'converged':>9} {'iters/euler':>11}")
    for r in rows:
        r["iterations_over_euler"] = r["mean_sample_iterations"] / euler[r["tol"]]["mean_sample_iterations"]
        print(f"{r['tol']:>8.0e} {r['solver']:>9} {r['mean_sample_iterations']:>11.1f} {r['seconds_per_batch']:>8.2f} "
              f"{r['converged_fraction']:>9.2f} {r['iterations_over_euler']:>11.2f}")
    if args.json_out:
        write_json(args.json_out, {"config": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
