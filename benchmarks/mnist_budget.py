"""Train the core rows on MNIST under fixed budgets and print a table against the paper's code.

Each run uses the published settings (docs/LCP.md §4), seed 0, a cosine schedule over
the run, and reports test accuracy on the full test set, wall time per epoch, mean
solver iterations per batch and the fraction of batches whose dynamics converged.
Finished runs (their JSON exists in --out) are skipped, so an interrupted sweep resumes.

    python benchmarks/mnist_budget.py --data-dir ../shared/data/mnist --out docs/runs
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from leastcontrol.atomic import atomic_target
from leastcontrol.train import TrainConfig, train

# (budget name, limit_train, model, method, accuracy of the paper's research code on this machine)
ROWS = [
    ("10k", 10_000, "rnn", "rbp", 91.00), ("10k", 10_000, "rnn", "lcp-di", 88.70),
    ("10k", 10_000, "ff", "bp", 90.36), ("10k", 10_000, "ff", "lcp-di", 90.29),
    ("60k", None, "rnn", "rbp", 95.65), ("60k", None, "rnn", "lcp-di", 92.58),
    ("60k", None, "ff", "bp", 94.37), ("60k", None, "ff", "lcp-di", 94.25),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="runs/mnist_budget")
    parser.add_argument("--budgets", nargs="+", default=["10k", "60k"])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| budget | model | method | test acc. (%) | paper code (%) | Δ (pp) | s / epoch | mean iterations | converged batches |",
             "|---|---|---|---|---|---|---|---|---|"]
    for budget, limit, model, method, paper in ROWS:
        if budget not in args.budgets:
            continue
        path = out / f"{budget}_{model}_{method}.json"
        if not path.exists():
            train(TrainConfig(model=model, method=method, dataset="mnist", data_dir=args.data_dir,
                              limit_train=limit, epochs=1, seed=0, json_out=str(path), progress=False))
        result = json.loads(path.read_text())
        h = result["history"][-1]
        acc = 100 * result["test_accuracy"]
        lines.append(f"| {budget} | {model} | {method} | {acc:.2f} | {paper:.2f} | {acc - paper:+.2f} | "
                     f"{h['seconds']:.1f} | {h['mean_iterations']:.1f} | {h['converged_fraction']:.2f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    with atomic_target(out / "table.md") as tmp:
        tmp.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
