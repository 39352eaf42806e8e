"""Where the solves of one RNN training batch spend their time: steps, Anderson mixes, check bookkeeping.

On the bench's starting RNN (``leastcontrol bench``'s pretraining, MNIST batches of 64), with the
weights held fixed, each bench row named on the command line computes its update on the same
batches. Wall-clock timers around the solver driver's calls (``leastcontrol.solvers.driver``) split
each batch into:
- ``steps``: the runs of ``check_every`` steps between two convergence checks, on whichever backend
  runs them (eager, compiled, C), also by the number of samples still active
  (``steps_active_le_N``: at most N samples);
- ``mix``: the check-level Anderson mixes (rows with ``-accel``; compiled under ``-compile``);
- ``checks``: the rest of the solves, the bookkeeping at the convergence checks (residual read,
  stall rule, freezing converged samples, subsetting);
- ``outside``: everything outside the solves (encoding, local update, readout).
Printed and written: per row, milliseconds per batch (mean over the timed batches) and calls per
batch. Euler rows only (the other step rules have no check-level split).

    python benchmarks/solve_profile.py --data-dir ../shared/data/mnist --threads 2 --json-out FILE \\
        rnn-rbp-compile rnn-lcp-di-gains-stall-accel-compile
"""
from __future__ import annotations

import collections
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from leastcontrol import bench  # noqa: E402
from leastcontrol.methods.base import EquilibriumMethod  # noqa: E402
from leastcontrol.solvers import backends, driver  # noqa: E402

import _fixed_network  # noqa: E402  (benchmarks/, on the path as the script's folder)

seconds: dict = collections.defaultdict(float)
calls: collections.Counter = collections.Counter()


def _add(name: str, t0: float) -> None:
    seconds[name] += time.perf_counter() - t0
    calls[name] += 1


def _timed(owner, name: str, key: str, bucket_of_active=None, when=None) -> None:
    """Replace ``owner.name`` by a call that adds its wall time to ``seconds[key]`` (only the calls for
    which ``when(args)`` holds, if given).

    ``bucket_of_active(args)`` gives the number of active samples, for the per-size buckets.
    """
    inner = getattr(owner, name)

    def call(*args, **kwargs):
        if torch.compiler.is_compiling() or (when is not None and not when(args)):   # no timer in a graph
            return inner(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            _add(key, t0)
            if bucket_of_active is not None:
                _add(f"{key}_active_le_{1 << (bucket_of_active(args) - 1).bit_length()}", t0)

    setattr(owner, name, call)


def _instrument() -> None:
    # A backend's advance(solver, field, z, ...) runs the steps to the next check (Native has its own);
    # the driver runs the check-level mix as backend.run(check_mix, ...) (Compiled has its own run).
    for cls in (backends.Backend, backends.Native):
        _timed(cls, "advance", "steps", lambda args: args[3].shape[0])
    mix = driver.check_mix
    for cls in (backends.Backend, backends.Compiled):
        _timed(cls, "run", "mix", when=lambda args: args[1] is mix)
    _timed(driver, "solve", "solve")


def _not_euler(rows):
    """The refusal of rows whose method solves a phase with another step rule than Euler (``None``: all Euler)."""
    def euler(method):
        return isinstance(method, EquilibriumMethod) and all(s.name == "euler" for s in method.solvers().values())
    other = [row.name for row in rows if not euler(row.build())]
    if other:
        return (f"solve_profile splits Euler solves only; row(s) {', '.join(other)} use another solver "
                "(time them with benchmarks/phase_profile.py)")
    return None


def profile(labels, config: bench.BenchConfig):
    rows, batches, net = _fixed_network.rows_and_network(labels, config, refuse=_not_euler)
    methods = [row.build() for row in rows]
    _instrument()
    out = {}
    for label, method in zip(labels, methods):
        total = 0.0
        for i, (x, y) in enumerate(batches):
            if i == config.warmup:
                seconds.clear()
                calls.clear()
            copy_ = copy.deepcopy(net)
            t0 = time.perf_counter()
            method.gradients(copy_, *method._inputs(copy_, x, y))
            if i >= config.warmup:
                total += time.perf_counter() - t0
        n = config.batches
        split = {"total": total, "steps": seconds["steps"], "mix": seconds["mix"],
                 "checks": seconds["solve"] - seconds["steps"] - seconds["mix"], "outside": total - seconds["solve"]}
        buckets = sorted((k for k in seconds if k.startswith("steps_active")), key=lambda k: int(k.rsplit("_", 1)[1]))
        split.update({k: seconds[k] for k in buckets})
        out[label] = {"ms_per_batch": {k: 1e3 * v / n for k, v in split.items()},
                      "calls_per_batch": {k: calls[k] / n for k in ("steps", "mix", *buckets)}}
        print(label)
        for k, v in out[label]["ms_per_batch"].items():
            per = out[label]["calls_per_batch"].get(k)
            print(f"  {k:22s} {v:7.2f} ms/batch" + (f"   calls/batch {per:5.1f}" if per is not None else ""))
    return out


def main(argv=None):
    _fixed_network.run_rows(__doc__.split("\n\n")[0], profile, argv)


if __name__ == "__main__":
    main()
