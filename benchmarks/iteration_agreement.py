"""Solver steps of the fast and the autograd LCP-DI paths on the same RNN and the same batches.

The bench's timed rows each train their own copy of the network, so after a few steps their
iteration counts come from different weights. This script holds the weights fixed: the bench's
starting RNN (its pretraining), then both paths on the same batches, at the published settings
(tol 1e-6, max 800 per phase). It prints the per-batch counts and the ratio autograd / fast;
--json-out writes them (the bench's ``iteration_agreement`` is the same measurement).

    python benchmarks/iteration_agreement.py --data-dir ../shared/data/mnist --json-out docs/runs/iteration_agreement.json
"""
import argparse
import dataclasses

from leastcontrol.atomic import write_json
from leastcontrol.bench import BenchConfig, Row, _batches, _pretrained, paired_iterations
from leastcontrol.methods.lcp import CONTROLLED_RESIDUALS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--controlled-residual", default="per-population", choices=CONTROLLED_RESIDUALS)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    config = BenchConfig(data_dir=args.data_dir, batches=args.batches, progress=False, memory=False)
    batches = _batches(config, max(config.pretrain, args.batches))
    net = _pretrained("rnn", config, batches)
    options = {"controlled_residual": args.controlled_residual}
    method = {"name": "lcp-di", **options}
    result = paired_iterations(Row("rnn", method), Row("rnn", method, impl="autograd"), net, batches[:args.batches])
    for i, (a, b) in enumerate(zip(result["iterations"], result["reference_iterations"])):
        print(f"batch {i:2d}: fast {a:6.0f}  autograd {b:6.0f}")
    print(f"iterations autograd / fast: {result['ratio']:.4f}")
    if args.json_out:
        write_json(args.json_out, {"config": dataclasses.asdict(config), **options, **result})


if __name__ == "__main__":
    main()
