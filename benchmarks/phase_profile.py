"""Where one RNN training batch spends its time: free phase, second phase (adjoint or controlled).

On the bench's starting RNN (``leastcontrol bench``'s pretraining, MNIST batches of 64), with the
weights held fixed, each bench row named on the command line computes its update on the same
batches; the wall time of the free solve and of the second solve are taken around the method's
own calls (``free_equilibrium``, ``adjoint_equilibrium`` / ``controlled_equilibrium``). Printed
and written: medians over the timed batches of the seconds per phase and of the iterations per
phase (the batch's, which its slowest sample sets, and the mean over its samples, which sets the
arithmetic: a free or adjoint step is one matrix product per sample, a controlled step two).

    python benchmarks/phase_profile.py --data-dir ../shared/data/mnist --json-out FILE \\
        rnn-rbp-compile rnn-lcp-di-gains-tol1e-4-stall-accel-compile
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from leastcontrol import bench  # noqa: E402

import _fixed_network  # noqa: E402  (benchmarks/, on the path as the script's folder)

PHASES = ("free_equilibrium", "adjoint_equilibrium", "controlled_equilibrium", "feedback_covariance")


def _timed(method, name, seconds):
    """Wrap ``method.name`` (on the instance) so that each call adds its wall time to ``seconds[name]``."""
    inner = getattr(method, name)

    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0

    setattr(method, name, call)


def profile(labels, config: bench.BenchConfig):
    rows, batches, net = _fixed_network.rows_and_network(labels, config)
    out = {}
    for label, row in zip(labels, rows):
        method = row.build()
        seconds: dict = {}
        for name in PHASES:
            if hasattr(method, name):
                _timed(method, name, seconds)
        records = []
        for i, (x, y) in enumerate(batches):
            seconds.clear()
            copy_ = copy.deepcopy(net)
            t0 = time.perf_counter()
            result = method.gradients(copy_, *method._inputs(copy_, x, y))
            total = time.perf_counter() - t0
            if i >= config.warmup:
                its = {k: float(v) for k, v in result.stats.items() if k.startswith(("iterations", "sample_iterations"))}
                records.append({"seconds_total": total, **{f"seconds_{k}": v for k, v in seconds.items()}, **its})
        out[label] = {k: statistics.median(r[k] for r in records) for k in records[0]}
        print(label, "  ".join(f"{k} {v:.4g}" for k, v in out[label].items()), flush=True)
    return out


def main(argv=None):
    _fixed_network.run_rows(__doc__.split("\n\n")[0], profile, argv)


if __name__ == "__main__":
    main()
